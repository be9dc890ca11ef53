"""The CUDA kernel of come_fast::swiglu_mlp compiles wherever nvcc exists,
GPU or not.

setup.py builds csrc/merged_mlp_cuda.cu only with a CUDA build of torch, so
a machine with a CPU torch would never compile it. This test does what
BuildExtension does for that file (torch's include paths, torch's nvcc flags,
``-std=c++20``) and stops at the object file, for the GPU we serve on (sm_90,
H200/H100) and sm_80 (A100): no CUDA torch, no GPU and no linking needed.
The object must hold the elementwise kernel for every dtype the dispatch
names (float, double, half, bfloat16; vectorised and scalar) and the CUDA
registration of the op.

nvcc is looked up in ``COME_FAST_NVCC`` (a path), then torch's CUDA_HOME,
then ``.cuda-toolkit/`` (where the README's test section's pip command puts
one), then PATH. Skipped, with the reason, when none is found.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch.utils.cpp_extension as cpp_extension

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "csrc" / "merged_mlp_cuda.cu"


def find_nvcc() -> str | None:
    candidates = [os.environ.get("COME_FAST_NVCC"),
                  cpp_extension.CUDA_HOME and os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"),
                  str(ROOT / ".cuda-toolkit" / "nvidia" / "cu13" / "bin" / "nvcc"),
                  shutil.which("nvcc")]
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


NVCC = find_nvcc()
pytestmark = pytest.mark.skipif(
    NVCC is None, reason="no nvcc: set COME_FAST_NVCC, CUDA_HOME or PATH, or install the toolkit the README's "
                         "test section names into .cuda-toolkit/")


def include_dirs(tmp_path: Path) -> list[str]:
    dirs = cpp_extension.include_paths() + [str(ROOT / "csrc")]
    # A CPU wheel of torch ships c10/cuda's headers but not the one header its
    # CUDA build generates at configure time; give its CUDA-build content.
    if not any((Path(d) / "c10/cuda/impl/cuda_cmake_macros.h").exists() for d in dirs):
        shim = tmp_path / "shim" / "c10" / "cuda" / "impl"
        shim.mkdir(parents=True)
        (shim / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        dirs.append(str(tmp_path / "shim"))
    return dirs


def test_cuda_kernel_compiles_for_sm90_and_sm80(tmp_path):
    obj = tmp_path / "merged_mlp_cuda.o"
    cmd = [NVCC, "-c", str(SOURCE), "-o", str(obj), "-std=c++20", "-O3", "-Xcompiler", "-fPIC",
           "-gencode", "arch=compute_90,code=sm_90", "-gencode", "arch=compute_80,code=sm_80",
           *cpp_extension.COMMON_NVCC_FLAGS, *[f"-I{d}" for d in include_dirs(tmp_path)]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"nvcc failed:\n{' '.join(cmd)}\n{proc.stderr[-4000:]}"
    assert obj.stat().st_size > 0
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("compiled; no `nm` to list the object's symbols")
    symbols = subprocess.run([nm, "-C", str(obj)], capture_output=True, text=True, check=True).stdout
    kernels = set(re.findall(r"silu_mul_inplace_kernel<([\w:]+), (\d+)>", symbols))
    # kVec = 16 bytes / sizeof(dtype) for aligned buffers, 1 for the rest.
    assert kernels >= {("float", "4"), ("float", "1"), ("double", "2"), ("double", "1"),
                       ("c10::Half", "8"), ("c10::Half", "1"), ("c10::BFloat16", "8"),
                       ("c10::BFloat16", "1")}, sorted(kernels)
    assert "TORCH_LIBRARY_IMPL_static_init_come_fast_CUDA" in symbols
