"""ReplaceMe (Shopkhoev et al., arXiv 2505.02819, NeurIPS 2025): delete the
block of n consecutive layers whose input and output hidden states are closest,
and fold a linear map that stands in for the block into the down_proj of the
layer just before it. No training, no new parameters.

The rule, with L layers, hidden states x_0 (embeddings) .. x_L at the layer
boundaries (x_l enters layer l; x_L after the final norm, as Hugging Face's
``hidden_states[-1]`` and the release's ``hidden_states[1:]``):

1. Block choice. For every start s, the distance between x_s and x_{s+n}
   (the block removes layers s .. s+n-1), averaged over calibration tokens;
   the smallest distance wins, ties to the lower s. Start s = 0 is refused:
   no layer precedes it to take the map (its distance is still reported).
   This is the release's candidate set: it scores ``hidden_states[1:]``,
   i.e. blocks starting at 1-based layer 1 = 0-based layer 1 at the earliest
   (``select_non_overlapping_blocks`` turns distance index i into the
   0-based block i+1 .. i+n and ``truncate_model`` deletes exactly those).
2. The fit, on the layer f = s-1 before the block: Y_f is its residual stream
   after attention (the input of ``post_attention_layernorm``, taken with a
   pre-hook), M_f its MLP output before the residual add (a forward hook on
   the MLP), and the teacher L = the output of layer s+n-1, the last removed
   one. T = argmin ||M_f T - (L - Y_f)||^2 over all calibration tokens,
   from the normal equations M^T M T = M^T R, R = L - Y_f (the release's
   ``a1t_a1 @ A = a1t_a2`` with a2 = L + M - out_f, equal to R).
3. The fold: nn.Linear computes a @ W^T, so M T = a @ (T^T W)^T and the new
   down_proj weight is T^T W (bias b -> T^T b, none in these families), the
   product taken in float64 and cast back to the weight's dtype, as the
   release does. Then layers s .. s+n-1 are deleted. Provenance: the kept
   original layers (like the other deletion methods), so ``distill_steps``
   matches the fold layer to the original output of layer s-1, not of s+n-1.

What is followed and where this deviates:

- Distance. The paper calls it cosine distance; the release
  (``distance.py``) uses the angular distance arccos(cos)/pi of the LAST
  non-padded token of each sequence (Gromov et al.'s metric), averaged per
  batch. Default here: 1 - cos averaged over ALL calibration tokens (plain
  cosine, not clamped). ``replaceme_tokens="last"`` and
  ``replaceme_distance="angular"`` give the release's choice (rows are never
  padded here, so the last token is position T-1).
- Teacher for a block that ends at the last layer: the release takes
  ``hidden_states[L]``, which is after the final norm, and the pruned model
  then applies the final norm again. Here the teacher is the raw output of
  the last layer (the stream re-runs that one layer); the distance still uses
  the normed x_L, as the release and ShortGPT here do.
- Normal equations: M^T M (d x d) and M^T R accumulated in float64, batch by
  batch (the release too, in float64); no row matrix is kept beyond one
  stream batch. Solve: Cholesky of M^T M + ridge I (``replaceme_ridge``,
  default 0 like the release's ``alpha``); where the factorisation fails
  (a singular M^T M: fewer independent tokens than d) the pseudo-inverse
  (minimum-norm least squares) instead, reported as ``solver: "pinv"``. The
  release inverts (``torch.linalg.inv``) without a fallback.
- Only the paper's main variant: one block, least-squares (L2) map. Not
  here: the cosine-loss map fitted with Adam, several blocks (``num_A``),
  the diagonal map, the release's 4-bit activations.
- Y_f is read at the post-attention norm's input, so it is exact; the
  release forms it as out_f - M_f, the same up to rounding.
- ``faithful`` is not read: the two options above reproduce the release's
  block choice; its final-norm teacher is not reproduced.

Step report: ``removed`` (layers s .. s+n-1), ``start`` s, ``fold_layer``
s-1, ``distances`` (indexed by start, 0 .. L-n), ``refused`` ([0]),
``residual_before`` = ||R - M||^2 / ||R||^2 (the block simply deleted, T =
I), ``residual_after`` = ||R - M T||^2 / ||R||^2 (both from the float64
sums), ``cholesky`` (whether it succeeded) and ``solver``.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import layerops as ops
from ..calibration import LayerStream
from ..merge import replace_window, sublayer_modules
from . import Context, Outcome, number, one_of, register

TOKENS = ("all", "last")
DISTANCES = ("cosine", "angular")


def _distance(x: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-row distance of matching [.., d] rows: 1 - cos or arccos(cos)/pi (float64)."""
    d = x.shape[-1]
    c = F.cosine_similarity(x.reshape(-1, d).float(), y.reshape(-1, d).float(), dim=-1).double()
    if kind == "cosine":
        return 1 - c
    return torch.arccos(c.clamp(-1, 1)) / math.pi


def block_distances(stream: LayerStream, n: int, tokens: str = "all", kind: str = "cosine") -> list[float]:
    """D[s] = mean over calibration tokens (``"all"``) or over sequences'
    last tokens (``"last"``) of the distance between x_s and x_{s+n}, for
    s = 0 .. L-n. Boundaries not cached are recomputed by the stream."""
    if tokens not in TOKENS:
        raise ValueError(f"replaceme_tokens must be one of {TOKENS}, got {tokens!r}")
    if kind not in DISTANCES:
        raise ValueError(f"replaceme_distance must be one of {DISTANCES}, got {kind!r}")
    L = len(stream.adapter.layers)
    out = []
    with torch.inference_mode():
        for s in range(L - n + 1):
            if tokens == "last":
                out.append(float(_distance(stream.last_token[s], stream.last_token[s + n], kind).mean()))
                continue
            x, y = stream.input_of(s), stream.input_of(s + n)
            total, count = 0.0, 0
            for i in range(0, stream.n, stream.bs):
                dist = _distance(x[i:i + stream.bs], y[i:i + stream.bs], kind)
                total += float(dist.sum())
                count += dist.numel()
            out.append(total / count)
    return out


@dataclass
class Fit:
    T: torch.Tensor          # [d, d] float64
    cholesky: bool           # whether the Cholesky factorisation succeeded
    residual_before: float   # ||R - M||^2 / ||R||^2
    residual_after: float    # ||R - M T||^2 / ||R||^2
    rows: int                # calibration tokens in the fit


def solve(mtm: torch.Tensor, mtr: torch.Tensor, ridge: float = 0.0) -> tuple[torch.Tensor, bool]:
    """T = (M^T M + ridge I)^-1 M^T R by Cholesky; where that fails, the
    pseudo-inverse (the minimum-norm least-squares T). Returns (T, cholesky ok)."""
    a = mtm + ridge * torch.eye(mtm.shape[0], dtype=mtm.dtype, device=mtm.device) if ridge else mtm
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        t = torch.cholesky_solve(mtr, chol)
        if torch.isfinite(t).all():
            return t, True
    return torch.linalg.pinv(a, hermitian=True) @ mtr, False


@torch.no_grad()
def fit_block(stream: LayerStream, start: int, n: int, ridge: float = 0.0) -> Fit:
    """The least-squares map for deleting layers start .. start+n-1, to be
    folded into layer start-1's down_proj, from the stream's (uncompressed)
    hidden states. The model is not changed."""
    a = stream.adapter
    layers = a.layers
    L = len(layers)
    if not 1 <= start <= L - n:
        raise ValueError(f"replaceme: a block of {n} layers must start in 1 .. {L - n}, got {start}")
    f = start - 1
    layer = layers[f]
    mlp = getattr(layer, sublayer_modules(a)[1])
    norm = a.part(layer, "post_attn_norm")
    end = start + n
    if end < L:
        teacher = stream.input_of(end)  # a raw boundary
    else:  # x_L in the stream is after the final norm: re-run the last layer for its raw output
        teacher = stream.hidden_with(L - 1, [layers[L - 1]], final_norm=False)
    x = stream.input_of(f)
    d = teacher.shape[-1]
    dev = teacher.device
    mtm = torch.zeros(d, d, dtype=torch.float64, device=dev)
    mtr = torch.zeros(d, d, dtype=torch.float64, device=dev)
    rtr = before = 0.0
    seen = {}

    def take_y(module, args):
        seen["y"] = args[0]

    def take_m(module, args, out):
        seen["m"] = out

    handles = [norm.register_forward_pre_hook(take_y), mlp.register_forward_hook(take_m)]
    try:
        for i in range(0, stream.n, stream.bs):
            xb = x[i:i + stream.bs]
            seen.clear()
            stream.forward_layer(layer, xb)  # on the layer's own device (device_map); the hooks take y and m
            m = seen["m"].reshape(-1, d).to(dev).double()  # where the layer ran: its device (device_map)
            r = teacher[i:i + stream.bs].reshape(-1, d).double() - seen["y"].reshape(-1, d).to(dev).double()
            mtm.addmm_(m.T, m)
            mtr.addmm_(m.T, r)
            rtr += float((r * r).sum())
            before += float(((r - m) ** 2).sum())
    finally:
        for h in handles:
            h.remove()
    t, ok = solve(mtm, mtr, ridge)
    # ||R - M T||^2 = R.R - 2 <T, M^T R> + <T, M^T M T>, from the float64 sums
    after = rtr - 2 * float((t * mtr).sum()) + float((t * (mtm @ t)).sum())
    scale = rtr if rtr > 0 else 1.0
    return Fit(T=t, cholesky=ok, residual_before=before / scale, residual_after=max(after, 0.0) / scale,
               rows=stream.n * stream.T)


@torch.no_grad()
def fold(adapter, layer, t: torch.Tensor) -> None:
    """down_proj <- T^T W (and bias b <- T^T b): its output becomes M T."""
    down = adapter.part(layer, "down")
    w = down.weight
    down.weight.data = (t.T.to(w.device) @ w.double()).to(w.dtype)
    if getattr(down, "bias", None) is not None:
        down.bias.data = (down.bias.double() @ t.to(w.device)).to(down.bias.dtype)


@register("replaceme", options={"replaceme_tokens": one_of(*TOKENS), "replaceme_distance": one_of(*DISTANCES),
                               "replaceme_ridge": number(0)})
def replaceme(ctx: Context, n_remove: int) -> Outcome:
    t0 = ops.Timer()
    a = ctx.adapter
    o = ctx.options
    L = len(a.layers)
    n = n_remove
    tokens = o.get("replaceme_tokens", "all")
    kind = o.get("replaceme_distance", "cosine")
    ridge = float(o.get("replaceme_ridge", 0.0))
    if not 1 <= n <= L - 1:
        raise ValueError(f"replaceme: removes 1 .. {L - 1} layers of {L} (one layer must precede the block), got {n}")
    if ridge < 0:
        raise ValueError(f"replaceme_ridge must be >= 0, got {ridge}")
    stream = ops.open_stream(ctx)
    dist = block_distances(stream, n, tokens, kind)
    s = min(range(1, L - n + 1), key=lambda k: (dist[k], k))  # start 0 refused: no layer before it
    ops.tick(ctx, "fit", 0, 1)
    fit = fit_block(stream, s, n, ridge)
    ops.tick(ctx, "fit", 1, 1)
    # fold into a copy: compress restores the caller's layer objects when a later step
    # fails (compensation, distillation), so an original layer is never changed in place
    folded = copy.deepcopy(a.layers[s - 1])
    fold(a, folded, fit.T)
    replace_window(a, s - 1, 1, folded)
    drop = list(range(s, s + n))
    prov = ops.delete(a, None, list(range(L)), drop)
    step = {"removed": drop, "start": s, "fold_layer": s - 1, "distances": dist, "refused": [0],
            "residual_before": fit.residual_before, "residual_after": fit.residual_after,
            "cholesky": fit.cholesky, "solver": "cholesky" if fit.cholesky else "pinv", "fit_rows": fit.rows,
            "seconds": t0()}
    return Outcome(provenance=prov, steps=[step],
                   settings={"score": f"{kind} distance, {tokens} tokens", "tokens": tokens, "distance": kind,
                             "ridge": ridge, "map": "least squares, folded into down_proj",
                             "layers_run": stream.layers_run})
