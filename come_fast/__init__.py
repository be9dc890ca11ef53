"""come_fast: depth compression of Hugging Face causal LMs (CoMe and baselines)."""
from .api import CompressionResult, compress, evaluate, load, save
from .models import load_model

__all__ = ["compress", "save", "load", "load_model", "evaluate", "CompressionResult"]
__version__ = "0.1.0"
