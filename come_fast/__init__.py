"""come_fast: depth compression of Hugging Face causal LMs (CoMe and baselines)."""
import logging as _logging

# the library logs its long steps on "come_fast" (come_fast/logs.py) and never configures logging itself
_logging.getLogger("come_fast").addHandler(_logging.NullHandler())

from .api import CompressionResult, compress, evaluate, export, load, save  # noqa: E402
from .hub import push_to_hub  # noqa: E402
from .models import load_model  # noqa: E402

__all__ = ["compress", "save", "load", "load_model", "evaluate", "export", "push_to_hub", "optimize_for_inference",
           "CompressionResult"]
__version__ = "0.1.0"


def __getattr__(name):
    # Lazy: come_fast.runtime loads the optional C++ extension, which a plain
    # ``import come_fast`` should not do.
    if name == "optimize_for_inference":
        from .runtime import optimize_for_inference

        return optimize_for_inference
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
