"""Optional C++/CUDA extension ``come_fast._C`` (merged SwiGLU MLP op).

Everything else (metadata, packages) comes from pyproject.toml. Install with::

    pip install torch==2.13.0            # or any CUDA torch on a GPU machine
    pip install --no-build-isolation -e ".[dev]"

Switches (environment variables read at build time):

* ``COME_FAST_SKIP_EXT=1``   build nothing: pure-Python install.
* ``COME_FAST_FORCE_CUDA=0`` build the CPU kernel only; ``=1`` insist on the
  CUDA kernel (a warning if torch has no CUDA or no CUDA_HOME). Default: CUDA
  kernel too when torch is a CUDA build and CUDA_HOME (nvcc) is found; no GPU
  has to be visible (then set TORCH_CUDA_ARCH_LIST, e.g. "9.0"). If only the
  CUDA part fails to compile, the CPU-only extension is built instead.
* ``COME_FAST_EXT_STRICT=1`` make a failed compile fail the install (CI); by
  default a failed or impossible build prints a warning and the pure-Python
  package is installed anyway (come_fast.runtime then uses plain PyTorch).

Modelled on flash-attention's setup.py (optional build, env switches) and
torchao (TORCH_LIBRARY-only extension, no pybind, Python-limited-API module).
"""

import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _warn(msg):
    bar = "=" * 78
    print(f"\n{bar}\ncome_fast setup.py WARNING: {msg}\n{bar}\n", file=sys.stderr, flush=True)


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _remove_stale_inplace_ext():
    """Delete come_fast/_C*.so left in the source tree by an earlier editable
    build, so that a skipped/failed build really gives the pure-Python package
    (otherwise `import come_fast._C` would load an outdated binary)."""
    import glob

    for path in glob.glob(os.path.join(HERE, "come_fast", "_C.*so")) + glob.glob(
        os.path.join(HERE, "come_fast", "_C.*pyd")
    ):
        try:
            os.remove(path)
            print(f"come_fast: removed stale {path}", file=sys.stderr)
        except OSError:
            pass


def _extension_config():
    """Return (ext_modules, cmdclass); ([], {}) for a pure-Python install."""
    if _flag("COME_FAST_SKIP_EXT"):
        print("come_fast: COME_FAST_SKIP_EXT=1, not building come_fast._C", file=sys.stderr)
        _remove_stale_inplace_ext()
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except Exception as exc:  # torch absent (e.g. isolated build env) or broken
        _warn(
            f"torch is not importable at build time ({exc!r}); installing come_fast without the "
            "C++ extension. Install torch first and use `pip install --no-build-isolation -e .` "
            "to build it."
        )
        _remove_stale_inplace_ext()
        return [], {}

    # ninja from the active venv is not on PATH unless the venv is activated.
    bindir = os.path.dirname(sys.executable)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")

    force = os.environ.get("COME_FAST_FORCE_CUDA", "").strip()
    if force in ("0", "1"):
        with_cuda = force == "1"
    else:
        # A CUDA build of torch plus a CUDA toolkit (nvcc) suffice; no GPU has
        # to be visible (set TORCH_CUDA_ARCH_LIST then, e.g. "9.0").
        with_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    if with_cuda and (torch.version.cuda is None or CUDA_HOME is None):
        _warn("COME_FAST_FORCE_CUDA=1 but torch has no CUDA or CUDA_HOME is unset; CPU kernel only")
        with_cuda = False

    sources = ["csrc/merged_mlp.cpp"]
    cxx_flags = ["-O3", "-g0", "-fopenmp"]  # -fopenmp: at::parallel_for is inlined OpenMP; -g0: faster build
    ext_kwargs = dict(
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_link_args=["-fopenmp"],
        py_limited_api=True,  # no libtorch_python, no pybind: `import come_fast._C` via PyInit__C
    )
    if with_cuda:
        sources.append("csrc/merged_mlp_cuda.cu")
        ext = CUDAExtension(
            "come_fast._C",
            sources,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
            **ext_kwargs,
        )
    else:
        ext = CppExtension("come_fast._C", sources, extra_compile_args={"cxx": cxx_flags}, **ext_kwargs)
    print(f"come_fast: building come_fast._C ({'CPU+CUDA' if with_cuda else 'CPU'})", file=sys.stderr)

    strict = _flag("COME_FAST_EXT_STRICT")

    class OptionalBuildExt(BuildExtension):
        """BuildExtension whose failure is a warning, not a failed install."""

        def run(self):
            try:
                super().run()
            except Exception as exc:
                if strict:
                    raise
                self._give_up(exc)

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
                return
            except Exception as exc:
                if strict:
                    raise
                error = exc
            if any(src.endswith(".cu") for src in ext.sources):
                # Keep at least the CPU kernel when only the CUDA part fails.
                _warn(f"the CUDA kernel of come_fast._C failed to build ({error}); retrying CPU-only")
                ext.sources = [src for src in ext.sources if not src.endswith(".cu")]
                ext.libraries = [lib for lib in ext.libraries if lib not in ("cudart", "c10_cuda", "torch_cuda")]
                try:
                    super().build_extension(ext)
                    return
                except Exception as exc:
                    error = exc
            self._give_up(error)

        def _give_up(self, exc):
            _warn(
                f"building come_fast._C failed ({type(exc).__name__}: {exc}); installing the "
                "pure-Python package. come_fast.runtime will fall back to plain PyTorch. "
                "Set COME_FAST_EXT_STRICT=1 to see the failure as an error."
            )
            _remove_stale_inplace_ext()
            # Forget the extension so that the in-place copy (editable installs)
            # and the output listing do not look for a file that was never built.
            self.extensions = []
            self.distribution.ext_modules = []

        def copy_extensions_to_source(self):
            if self.extensions:
                super().copy_extensions_to_source()

    return [ext], {"build_ext": OptionalBuildExt}


ext_modules, cmdclass = _extension_config()

setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    # .so named _C.abi3.so: one binary for every CPython >= 3.10 (the module is
    # an empty limited-API stub; the op goes through the torch dispatcher).
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {},
)
