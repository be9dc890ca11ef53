"""Closed-form compensation: refit a layer's output projection by ridge least squares.

After a merge or a deletion, student layer k stands for the original layers
of its span: from its first original layer up to (not including) the first
original layer of the next student layer, so a gap left by deleted layers
belongs to the kept layer before it (as ReplaceMe folds its map into the
layer before the cut). Its output should be the teacher's hidden state after
that span, t. With the layer's real input x (the compressed model's, errors of
the layers below included), the residual stream before the MLP h1 and the
MLP's hidden activations a (the input of ``down_proj``), the MLP output is
linear in W = ``down_proj.weight``, so

    W' = argmin_W  ||t - h1 - b - a W^T||^2 + lam ||W - W0||^2
       = (C + lam W0^T)^T (G + lam I)^-1,   G = sum a^T a,  C = sum a^T (t - h1 - b)

(ridge toward the current weight W0: a heavy ridge changes nothing). G and C
are accumulated in float64 over calibration batches, O(I^2 + I d) memory,
never tokens x I (each batch's products in float32, the sums in float64).
lam = alpha * mean(diag G); alpha is chosen on calibration
rows held apart from the fit (the held-out residual has a closed form in the
held-out G, C and ||R||^2), among ``alphas`` and "keep W0" (no refit), then
the refit uses all rows. Solved by Cholesky; where it fails (G + lam I not
numerically positive definite) by ``torch.linalg.lstsq`` (stated in the report).

``TeacherStates`` holds the teacher's hidden states at every layer boundary on
the calibration rows, in memory up to a byte budget and in memory-mapped files
beyond it, so a model with many wide layers does not need them all in RAM.
"""
from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from .adapters import Adapter

ALPHAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # ridge candidates, relative to mean(diag G)
HOLDOUT = 0.25                      # share of calibration rows held apart to choose the ridge


class CompensationError(ValueError):
    pass


# -- where each student layer's target lies ---------------------------------------------

def leaves(item) -> list[int]:
    """The original layers a provenance entry (an int or a nested list) stands for."""
    if isinstance(item, (list, tuple)):
        return [x for it in item for x in leaves(it)]
    return [int(item)]


def spans(provenance: list, n_original: int) -> list[tuple[int, int]]:
    """[start, end) in original layers for every student layer: from its first
    original layer to the next student layer's first (a gap of deleted layers
    belongs to the layer before it; the last layer runs to the end)."""
    starts = [min(leaves(p)) for p in provenance]
    ends = starts[1:] + [n_original]
    out = list(zip(starts, ends))
    for (s, e), p in zip(out, provenance):
        if e <= s or max(leaves(p)) >= e:
            raise CompensationError(f"provenance {provenance} is not in layer order")
    return out


def changed_layers(provenance: list, n_original: int) -> list[int]:
    """Student layers that stand for more than their own original layer (merged,
    or followed by a gap): the ones whose output is refit."""
    return [k for k, (s, e) in enumerate(spans(provenance, n_original)) if e - s > 1 or isinstance(provenance[k], list)]


# -- the teacher's boundaries -----------------------------------------------------------

class TeacherStates:
    """Hidden states x_0 .. x_L of the original model on the calibration rows
    (raw: x_L before the final norm). ``max_bytes``: kept in memory up to that
    much, the rest written to a temporary folder and read back memory-mapped."""

    def __init__(self, max_bytes: Optional[int] = None):
        self.max_bytes = max_bytes
        self.mem: dict[int, torch.Tensor] = {}
        self.files: dict[int, Path] = {}
        self.bytes_in_memory = 0
        self._dir: Optional[Path] = None

    def put(self, j: int, x: torch.Tensor) -> None:
        nbytes = x.numel() * x.element_size()
        if self.max_bytes is None or self.bytes_in_memory + nbytes <= self.max_bytes:
            self.mem[j] = x
            self.bytes_in_memory += nbytes
            return
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="come_fast-teacher-"))
        path = self._dir / f"x{j}.pt"
        torch.save(x.detach().cpu().contiguous(), path)
        self.files[j] = path

    def __getitem__(self, j: int) -> torch.Tensor:
        if j in self.mem:
            return self.mem[j]
        return torch.load(self.files[j], mmap=True, weights_only=True)

    def __len__(self) -> int:
        return len(self.mem) + len(self.files)

    def close(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        self.mem.clear()
        self.files.clear()

    def __del__(self):
        self.close()

    @classmethod
    def from_stream(cls, stream, max_bytes: Optional[int] = None) -> "TeacherStates":
        """Run the stream's (still uncompressed) model once, keeping every boundary."""
        ts = cls(max_bytes)
        for j, x in stream.boundaries():
            ts.put(j, x)
        return ts


# -- normal equations -------------------------------------------------------------------

@dataclass
class NormalEquations:
    """sum a^T a, sum a^T R and per output column sum R^2 over tokens, in float64."""

    G: torch.Tensor
    C: torch.Tensor
    s_cols: torch.Tensor
    tokens: int = 0

    @classmethod
    def zeros(cls, n_in: int, n_out: int, device) -> "NormalEquations":
        z = dict(dtype=torch.float64, device=device)
        return cls(torch.zeros(n_in, n_in, **z), torch.zeros(n_in, n_out, **z), torch.zeros(n_out, **z))

    @property
    def s(self) -> float:
        return float(self.s_cols.sum())

    def add(self, a: torch.Tensor, R: torch.Tensor) -> None:
        """Add one batch: its products in float32 (a batch's few hundred tokens
        lose nothing a ridge of 1e-3 of the diagonal would notice), summed into
        the float64 totals, so that many batches do not accumulate rounding."""
        a = a.reshape(-1, a.shape[-1]).float()
        R = R.reshape(-1, R.shape[-1]).float()
        self.G += (a.T @ a).double()
        self.C += (a.T @ R).double()
        self.s_cols += R.double().pow(2).sum(0)
        self.tokens += a.shape[0]

    def __add__(self, other: "NormalEquations") -> "NormalEquations":
        return NormalEquations(self.G + other.G, self.C + other.C, self.s_cols + other.s_cols,
                               self.tokens + other.tokens)

    def residual_cols(self, Wt: torch.Tensor) -> torch.Tensor:
        """sum over tokens of (R - a Wt)^2 per output column, from the sums alone."""
        Wt = Wt.double()
        return self.s_cols - 2 * (Wt * self.C).sum(0) + (Wt * (self.G @ Wt)).sum(0)

    def residual(self, Wt: torch.Tensor) -> float:
        """sum ||R - a Wt||^2 for Wt [n_in, n_out], from the sums alone."""
        return float(self.residual_cols(Wt).sum())


def solve_ridge(eq: NormalEquations, W0t: torch.Tensor, lam: float) -> tuple[torch.Tensor, str]:
    """(G + lam I)^-1 (C + lam W0t) and the solver used ("cholesky" or "lstsq")."""
    n = eq.G.shape[0]
    A = eq.G + lam * torch.eye(n, dtype=torch.float64, device=eq.G.device)
    B = eq.C + lam * W0t.double()
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        return torch.cholesky_solve(B, L), "cholesky"
    return torch.linalg.lstsq(A.cpu(), B.cpu(), driver="gelsd").solution.to(A.device), "lstsq"


# -- the refit ----------------------------------------------------------------------------

def holdout_rows(n: int, share: float = HOLDOUT) -> list[int]:
    """The last ceil(share * n) rows. Calibration rows are usually consecutive
    pieces of a few documents, so a row next to a fitted one shares its
    document: held-out rows taken in one block at the end share at most one
    document with the fitted ones, and judge how the refit generalises.
    Empty when n < 4. (Every fourth row instead, tried first, judged the
    refit on rows whose documents it was fit on, and did worse on held-out C4.)"""
    if share <= 0 or n < 4:
        return []
    k = max(1, math.ceil(share * n))
    return list(range(n - k, n))


@dataclass
class RefitReport:
    layer: int
    target_boundary: int
    alpha: Optional[float]            # the ridge (relative to mean diag G) most columns took; None: kept as it was
    ridge: Optional[float]            # alpha * mean(diag G)
    solver: Optional[str]
    residual_before: float            # ||target - output||^2 / ||target - input||^2 on all rows, before the refit
    residual_after: float             # the same after
    heldout_before: Optional[float]   # the same on the held-out rows, with the fit on the others
    heldout_after: Optional[float]
    tokens: int
    alphas_tried: dict = field(default_factory=dict)  # held-out residual per ridge, every column taking it
    alpha_columns: dict = field(default_factory=dict)  # output columns per ridge chosen ("keep": as it was)
    space: Optional[str] = None       # "down" (all of down_proj) or "map" (a d x d map on the MLP output)
    part: str = "down"                # the projection refit: "down" or "o"
    earlier: list = field(default_factory=list)  # reports of the passes before this one (``refit_parts``)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


WEIGHTINGS = ("none", "rms")


def down_equations(adapter: Adapter, stream, layer, x: torch.Tensor, target: torch.Tensor,
                   heldout: Sequence[int], weighting: str = "none", maps: bool = False, part: str = "down"):
    """Run ``layer`` on inputs ``x`` [n, T, d] batch by batch and accumulate the
    equations of its down_proj (or of ``part``, another output projection whose
    output adds to the residual stream: "o") for targets ``target``: (fit rows, held-out rows,
    sum of ||target - x||^2 (the layer's job, for relative residuals), outputs,
    and with ``maps`` the same two for the map: features the MLP output m,
    residual target - (y - m), else None).
    ``weighting="rms"``: each token's squared error divided by its target's mean
    square, the scale the next layer's RMSNorm removes (otherwise the few tokens
    with massive activations decide the fit)."""
    if weighting not in WEIGHTINGS:
        raise CompensationError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    down = adapter.part(layer, part)
    I, d = down.in_features, down.out_features
    dev = down.weight.device
    fit, held = NormalEquations.zeros(I, d, dev), NormalEquations.zeros(I, d, dev)
    mfit, mheld = (NormalEquations.zeros(d, d, dev), NormalEquations.zeros(d, d, dev)) if maps else (None, None)
    held_set = set(heldout)
    seen = {}

    def hook(module, args, out):
        seen["a"], seen["m"] = args[0], out

    h = down.register_forward_hook(hook)
    bias = down.bias
    job = 0.0
    outs = []
    try:
        with torch.inference_mode():
            for i in range(0, x.shape[0], stream.bs):
                xb = x[i:i + stream.bs]
                y = stream.forward_layer(layer, xb)
                outs.append(y)
                tb = target[i:i + stream.bs].to(dev).float()
                m = seen["m"].float()
                Rm = tb - (y.to(dev).float() - m)  # y on the stream's device, m where the layer ran (device map)
                R = Rm - bias.float() if bias is not None else Rm
                a_ = seen["a"].float()
                D = tb - xb.to(dev).float()
                if weighting == "rms":
                    w = tb.pow(2).mean(-1, keepdim=True).clamp_min(1e-12).rsqrt()
                    a_, R, D, m, Rm = a_ * w, R * w, D * w, m * w, Rm * w
                job += float(D.double().pow(2).sum())
                rows = [i + j in held_set for j in range(xb.shape[0])]
                for part, mpart, keep in ((held, mheld, True), (fit, mfit, False)):
                    sel = [j for j, h in enumerate(rows) if h == keep]
                    if sel:
                        part.add(a_[sel], R[sel])
                        if maps:
                            mpart.add(m[sel], Rm[sel])
    finally:
        h.remove()
    return fit, held, job, torch.cat(outs), (mfit, mheld) if maps else None


SELECTS = ("column", "layer")
FITS = ("down", "map", "best")
PARTS = ("down", "o")
# which projections are refit, in order: "down" alone, or "down+o": down_proj,
# then o_proj (target: the teacher's state minus the refit MLP's output, held),
# then down_proj again on the MLP input the new o_proj gives
PART_SEQUENCES = {"down": ("down",), "down+o": ("down", "o", "down")}


def refit_down(adapter: Adapter, stream, layer, x: torch.Tensor, target: torch.Tensor, *,
               alphas: Sequence[float] = ALPHAS, holdout: float = HOLDOUT, weighting: str = "none",
               select: str = "layer", index: int = -1, target_boundary: int = -1,
               solve_on: str = "all", fit: str = "down", part: str = "down") -> RefitReport:
    """Refit ``layer``'s down_proj in place (see the module docstring) and
    return the report; residuals are relative to ||target - x||^2, the part of
    the target the layer has to produce.

    ``select="layer"``: one ridge (or no refit) for the whole layer, the one
    with the smallest held-out residual. ``"column"``: every output column
    (hidden dimension) takes the ridge its own held-out residual prefers (each
    column is its own least-squares problem, and a few dimensions with massive
    activations decide the layer-wide choice); measured on SmolLM2 with
    ShortGPT at 30% it did not help (C4 perplexity 80.9 against 80.4).

    ``solve_on="all"``: once the ridge is chosen, solve on every row (the
    held-out ones too). ``"fit"``: solve on the fit rows only, so that the
    held-out rows stay unseen by the refit (CoMe's search judges candidates on
    them).

    ``fit``: which weights are free. "down": all of down_proj (I unknowns per
    output column). "map": ReplaceMe's d x d map on the MLP output, folded
    into down_proj (W' = T^T W, ridge toward T = I: d unknowns per column, a
    smaller space that can only recombine the directions the layer already
    writes). "best": both offered, the held-out residual chooses (the two
    residuals are the same quantity, ||target - output||^2).

    ``part``: the projection refit, "down" or "o" (the attention's o_proj: the
    layer's output is linear in it too, with the MLP's output on the new
    residual held at its current value, so an o_proj refit is followed by a
    down_proj refit; see ``refit_parts``)."""
    if any(not (isinstance(al, (int, float)) and al > 0 and math.isfinite(al)) for al in alphas) or not alphas:
        raise CompensationError(f"ridge values must be positive and finite, got {list(alphas)!r}")
    if select not in SELECTS:
        raise CompensationError(f"select must be one of {SELECTS}, got {select!r}")
    if solve_on not in ("all", "fit"):
        raise CompensationError(f"solve_on must be 'all' or 'fit', got {solve_on!r}")
    if fit not in FITS:
        raise CompensationError(f"fit must be one of {FITS}, got {fit!r}")
    if part not in PARTS:
        raise CompensationError(f"part must be one of {PARTS}, got {part!r}")
    heldout = holdout_rows(x.shape[0], holdout)
    fitq, held, job, _, meqs = down_equations(adapter, stream, layer, x, target, heldout, weighting,
                                              maps=fit != "down", part=part)
    down = adapter.part(layer, part)
    W0t = down.weight.detach().T.double()
    d = W0t.shape[1]
    eye = torch.eye(d, dtype=torch.float64, device=W0t.device)
    allq = fitq + held
    job = max(job, 1e-30)
    # the choices: (key, space, alpha); space "down" solves for W^T, "map" for T (W^T = W0^T T)
    spaces = [sp for sp in ("down", "map") if fit in (sp, "best")]
    scales = {"down": float(allq.G.diagonal().mean())}
    if meqs is not None:
        mall = meqs[0] + meqs[1]
        scales["map"] = float(mall.G.diagonal().mean())
    systems = {"down": (fitq, held, W0t), "map": (meqs[0], meqs[1], eye) if meqs is not None else None}
    choices = [(f"{'map:' if sp == 'map' else ''}{float(al)}", sp, al) for sp in spaces for al in sorted(alphas)]
    before = allq.residual(W0t) / job

    def as_down(sp: str, sol: torch.Tensor) -> torch.Tensor:
        return sol if sp == "down" else W0t @ sol

    if not heldout:  # too few rows to hold any apart: the smallest ridge offered, for every column
        choice = torch.zeros(W0t.shape[1], dtype=torch.long)
        choices = [c for c in choices if c[2] == min(alphas)][:1]
        tried = {}
        held_before = held_after = None
    else:
        cols = [held.residual_cols(W0t)]
        for _, sp, al in choices:
            f_, h_, init = systems[sp]
            cols.append(h_.residual_cols(solve_ridge(f_, init, al * scales[sp])[0]))
        cols = torch.stack(cols)  # [choices, columns]
        tried = {k: float(c.sum()) / job for k, c in zip(["keep"] + [c[0] for c in choices], cols)}
        # a refit must beat the weight as it is by more than rounding (1e-9 of the column's target energy)
        margin = torch.zeros_like(cols)
        margin[0] = -1e-9 * held.s_cols
        if select == "column":
            pick = (cols + margin).argmin(0)
        else:
            pick = torch.full((cols.shape[1],), int((cols + margin).sum(1).argmin()), dtype=torch.long)
        held_before = tried["keep"]
        held_after = float(cols.gather(0, pick[None]).sum()) / job
        choice = pick - 1  # -1: keep, else an index into choices
    names = ["keep"] + [c[0] for c in choices]
    counts = {names[i + 1]: int((choice == i).sum()) for i in sorted(set(choice.tolist()))}
    top = max(counts, key=counts.get)
    top_choice = None if top == "keep" else next(c for c in choices if c[0] == top)
    rep = RefitReport(layer=index, target_boundary=target_boundary, part=part,
                      alpha=None if top_choice is None else float(top_choice[2]), ridge=None, solver=None,
                      residual_before=before, residual_after=before, heldout_before=held_before,
                      heldout_after=held_after, tokens=allq.tokens, alphas_tried=tried, alpha_columns=counts,
                      space=None if top_choice is None else top_choice[1])
    if all(k == "keep" for k in counts):
        return rep
    Wt = W0t.clone()
    bias = down.bias
    b_new = None if bias is None else bias.detach().double().clone()
    after_cols = allq.residual_cols(W0t)  # per output column, on all rows; the refit columns replaced below
    solvers = set()
    for i in sorted(set(choice.tolist()) - {-1}):
        _, sp, al = choices[i]
        f_, h_, init = systems[sp]
        system = f_ if solve_on == "fit" and heldout else f_ + h_
        sol, solver = solve_ridge(system, init, al * scales[sp])
        solvers.add(solver)
        cols_i = choice == i
        Wt[:, cols_i] = as_down(sp, sol)[:, cols_i]
        after_cols[cols_i] = (f_ + h_).residual_cols(sol)[cols_i]
        if sp == "map" and bias is not None:  # the map acts on the MLP output, bias included
            b_new[cols_i] = (bias.detach().double() @ sol)[cols_i]
    rep.ridge = None if top_choice is None else top_choice[2] * scales[top_choice[1]]
    rep.solver = "+".join(sorted(solvers))
    rep.residual_after = float(after_cols.sum()) / job
    with torch.no_grad():
        down.weight.copy_(Wt.T.to(down.weight.dtype))
        if b_new is not None:
            down.bias.copy_(b_new.to(down.bias.dtype))
    return rep


def refit_parts(adapter: Adapter, stream, layer, x: torch.Tensor, target: torch.Tensor, *,
                parts: str = "down", **kw) -> RefitReport:
    """``refit_down`` for each projection of ``PART_SEQUENCES[parts]`` in turn
    (each pass sees the weights the one before left); the last pass's report,
    the earlier ones under ``earlier``. The residuals of every pass are the
    same quantity, so ``earlier[0].residual_before`` is the layer's before any
    refit."""
    if parts not in PART_SEQUENCES:
        raise CompensationError(f"parts must be one of {tuple(PART_SEQUENCES)}, got {parts!r}")
    reps = []
    for part in PART_SEQUENCES[parts]:
        kw_part = dict(kw) if part == "down" else {**kw, "fit": "down"}  # the map option is down_proj's
        reps.append(refit_down(adapter, stream, layer, x, target, part=part, **kw_part))
    last = reps[-1]
    last.earlier = [r.as_dict() for r in reps[:-1]]
    return last


def refit_settings(options: dict) -> dict:
    """``refit_parts``'s keyword settings from compress's ``ls_*`` options (validated there)."""
    return {"alphas": tuple(options.get("ls_alphas", ALPHAS)), "weighting": options.get("ls_weighting", "none"),
            "select": options.get("ls_select", "layer"), "fit": options.get("ls_fit", "down"),
            "parts": options.get("ls_parts", "down")}


def compensate_model(adapter: Adapter, stream, teacher: TeacherStates, provenance: list, n_original: int, *,
                     layers: Optional[Sequence[int]] = None, alphas: Sequence[float] = ALPHAS,
                     holdout: float = HOLDOUT, weighting: str = "none", select: str = "layer",
                     fit: str = "down", parts: str = "down", originals: Optional[Sequence] = None,
                     progress=None) -> list[dict]:
    """Refit, bottom-up, the down_proj of each changed student layer (or of
    ``layers``) on its real input in the compressed model, toward the teacher's
    state after its span. ``stream``: a LayerStream over the compressed model
    (its boundary 0, the embeddings, is all that is used). ``originals``: the
    original model's layers; when given, every merged layer (a nested
    provenance entry) chooses its MLP channels again among those of the
    original layers it stands for, before its refit
    (come_fast.channel_ls.reselect_mlp). Returns the reports."""
    import copy

    sp = spans(provenance, n_original)
    todo = set(changed_layers(provenance, n_original) if layers is None else layers)
    reports = []
    x = stream.boundary[0]
    L = len(adapter.layers)
    stack = list(adapter.layers)
    for k, layer in enumerate(stack):
        if k in todo:
            layer = stack[k] = copy.deepcopy(layer)  # a kept layer may be the caller's own object: refit a copy
            end = sp[k][1]
            chosen = None
            if originals is not None and isinstance(provenance[k], list):
                from .channel_ls import reselect_mlp

                # a layer streamed from disk (offload, device_map) has its weights on the meta device
                # until it runs: a copy materialises it for as long as the choice needs it
                srcs = [copy.deepcopy(s) if any(p.is_meta for p in s.parameters()) else s
                        for s in (originals[j] for j in leaves(provenance[k]))]
                chosen = reselect_mlp(adapter, stream, layer, srcs, x, teacher[end])
                del srcs
            rep = refit_parts(adapter, stream, layer, x, teacher[end], alphas=alphas, holdout=holdout,
                              weighting=weighting, select=select, index=k, target_boundary=end, fit=fit,
                              parts=parts)
            reports.append(rep.as_dict() if chosen is None else {**rep.as_dict(), "reselected": chosen})
        if k + 1 < L:
            with torch.inference_mode():
                x = stream.forward_layer(layer, x)
        if progress is not None:
            progress("layers refit", k + 1, L)
    adapter.set_layers(stack)
    return reports
