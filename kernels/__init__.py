"""Triton kernels of come_fast (installed as ``come_fast.kernels``).

* ``channel_score``: ``accumulate_abs_``, ``finalize_scores``, ``column_l1_norm``
  (CoMe's MLP-channel and attention-group sensitivities);
* ``gather_concat``: ``gather_concat``, ``gather_concat_many`` (building a
  merged layer's weights from two source layers, bit-exact copies);
* ``linear_kl``: ``linear_kl`` (the chunked linear + KL distillation loss, an
  autograd op; never the full [tokens, vocab] logits).

Importing this package never raises: when triton (or a kernel module) cannot
be imported, ``TRITON_AVAILABLE`` is False, ``TRITON_IMPORT_ERROR`` holds the
reason and the public names are None.  The kernels need CUDA tensors, or
``TRITON_INTERPRET=1`` set before this package is imported (CPU, float32 math).
Which path runs on which device is decided in ``come_fast.dispatch``.
"""

TRITON_AVAILABLE = False
TRITON_IMPORT_ERROR = None

accumulate_abs_ = None
finalize_scores = None
column_l1_norm = None
gather_concat = None
gather_concat_many = None
linear_kl = None

try:
    import triton  # noqa: F401

    from .channel_score import accumulate_abs_, column_l1_norm, finalize_scores
    from .gather_concat import gather_concat, gather_concat_many
    from .linear_kl import linear_kl

    TRITON_AVAILABLE = True
except Exception as _exc:  # ImportError, or a broken triton install
    TRITON_IMPORT_ERROR = f"{type(_exc).__name__}: {_exc}"


def interpreted() -> bool:
    """True when the kernels were defined under TRITON_INTERPRET (CPU interpreter)."""
    if not TRITON_AVAILABLE:
        return False
    from . import channel_score

    return bool(channel_score._INTERPRET)


__all__ = [
    "TRITON_AVAILABLE",
    "TRITON_IMPORT_ERROR",
    "accumulate_abs_",
    "finalize_scores",
    "column_l1_norm",
    "gather_concat",
    "gather_concat_many",
    "linear_kl",
    "interpreted",
]
