"""Calibration: token batches in, per-layer running statistics out.

Two pieces:
- ``calibration_tokens``: turns whatever the caller passes (a LongTensor, a
  safetensors/.txt/.jsonl path, a list of strings, a ``datasets.Dataset`` or
  ``IterableDataset``, a hub dataset name or spec, or None for the embedded
  default) into a fixed LongTensor [n, seq_len].
- ``LayerStream``: runs the decoder one layer at a time over those batches
  (the GPTQ-style streaming order) and keeps the hidden states at layer
  boundaries, so that after a merge at layer l only layers l.. are re-run:
  everything below sees unchanged inputs. Statistics are running sums filled
  by forward pre-hooks on o_proj and down_proj; no activations inside a layer
  are kept, and no logits are computed.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .adapters import Adapter
from .devicemap import home_device, layer_device, to_device
from .dispatch import Ops
from .logs import get as _get_logger

log = _get_logger("calibration")
# the progress label of the default calibration's sampling (one count per token position)
SAMPLING_LABEL = "calibration sampled (tokens per row)"


class CalibrationError(ValueError):
    pass


# -- tokens -----------------------------------------------------------------------------

def _tokens_from_text(text: str, tokenizer, n: int, seq_len: int, source: str) -> torch.Tensor:
    if tokenizer is None:
        raise CalibrationError(f"calibration from text ({source}) needs the model's tokenizer")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    need = n * seq_len
    if len(ids) < need:
        raise CalibrationError(
            f"calibration data {source} is too short: {len(ids)} tokens, need {n} x {seq_len} = {need}; "
            "pass fewer or shorter sequences (n_samples, seq_len) or more text"
        )
    # consecutive, non-overlapping rows, the layout of the reference fixture
    return torch.tensor(ids[:need], dtype=torch.long).reshape(n, seq_len)


def _check_text_file(path: Path) -> None:
    """A .txt must be UTF-8 text: say where it is not (random bytes, a binary)."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CalibrationError(f"calibration file {path} is not UTF-8 text (byte {e.start}: "
                               f"{data[e.start:e.start + 1]!r}); give a text file or tokens (.safetensors)") from None
    if "\x00" in text:
        raise CalibrationError(f"calibration file {path} holds NUL bytes: a binary file, not text")


def _describe(value) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r:.40}"


def _check_json_lines(path: Path, column: str = "text") -> None:
    """Each non-blank line of a .jsonl must be a JSON object whose ``column``
    (``text``) is a string: name the first line that is not."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise CalibrationError(f"{path}, line {n}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise CalibrationError(f"{path}, line {n}: invalid JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(row, dict):
                raise CalibrationError(f"{path}, line {n}: expected a JSON object with a {column!r} field, "
                                       f"got {type(row).__name__}")
            if column not in row:
                raise CalibrationError(f"{path}, line {n}: no {column!r} field (fields: {sorted(row)})")
            if not isinstance(row[column], str):
                raise CalibrationError(f"{path}, line {n}: {column!r} must be a string, got {_describe(row[column])}")


def _read_docs(path: Path, column: str = "text") -> list[str]:
    import datasets

    kind = "json" if path.suffix in (".jsonl", ".json") else "text"
    # checked here first: datasets' own errors name neither the line nor the mistake
    if path.suffix == ".jsonl":
        _check_json_lines(path, column)
    elif kind == "text":
        _check_text_file(path)
    kwargs = {} if kind == "json" else {"sample_by": "document"}
    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train", **kwargs)
    except Exception as e:  # datasets wraps the reader's error in its own (DatasetGenerationError, ...)
        cause = e.__cause__ or e.__context__ or e
        raise CalibrationError(f"could not read calibration file {path} as {kind}: "
                               f"{cause.__class__.__name__}: {str(cause)[:200]}") from None
    # a .txt is read into the column "text" whatever text_column says
    return _docs_of_dataset(ds, column if kind == "json" else "text", str(path))


def _docs_of_dataset(ds, column: str, source: str) -> list[str]:
    """The non-empty strings of ``ds[column]`` (a ``datasets.Dataset``), or a
    CalibrationError naming the columns there are / the first record that is not a string."""
    if column not in ds.column_names:
        raise CalibrationError(f"calibration {source} has no column {column!r} (columns: {ds.column_names}); "
                               "pass text_column= (CLI: --text-column)")
    texts = ds[column]
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise CalibrationError(f"calibration {source}, record {bad + 1}: {column!r} must be a string, "
                               f"got {_describe(texts[bad])}")
    return [t for t in texts if t]


def _docs_of_strings(texts, source: str) -> list[str]:
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise CalibrationError(f"calibration {source}: item {bad} must be a string, got {_describe(texts[bad])}")
    return [t for t in texts if t]


def _tokens_from_stream(rows, column: str, tokenizer, n: int, seq_len: int, source: str) -> torch.Tensor:
    """Rows of an iterable dataset (dicts): documents are read until their text
    holds the rows asked for (about 8 characters a token, more if that falls
    short), then cut exactly as a list of the same documents would be."""
    if tokenizer is None:
        raise CalibrationError(f"calibration from text ({source}) needs the model's tokenizer")
    need = n * seq_len
    docs: list[str] = []
    chars, want = 0, need * 8
    it = iter(rows)
    exhausted = False
    while True:
        while chars <= want:
            try:
                row = next(it)
            except StopIteration:
                exhausted = True
                break
            if not isinstance(row, dict) or column not in row:
                names = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise CalibrationError(f"calibration {source}, record {len(docs) + 1}: no column {column!r} "
                                       f"(columns: {names}); pass text_column= (CLI: --text-column)")
            text = row[column]
            if not isinstance(text, str):
                raise CalibrationError(f"calibration {source}, record {len(docs) + 1}: {column!r} must be a "
                                       f"string, got {_describe(text)}")
            docs.append(text)
            chars += len(text)
        if exhausted:
            break
        # the documents after the last one read only extend the token stream past
        # ``need``; tokenized together they give the same first ``need`` tokens
        if len(tokenizer("\n\n".join(d for d in docs if d), add_special_tokens=False)["input_ids"]) > need + 8:
            break
        want *= 2
    return _tokens_from_text("\n\n".join(d for d in docs if d), tokenizer, n, seq_len, source)


HUB_KEYS = ("path", "name", "split", "column")


def _hub_tokens(spec: dict, text_column: str, tokenizer, n: int, seq_len: int) -> torch.Tensor:
    """A dataset on the Hugging Face hub, streamed: ``spec`` holds ``path``
    (required), ``name`` (the config), ``split`` (default "train"), ``column``
    (default ``text_column``) and any other ``datasets.load_dataset`` keyword
    (``data_files``, ``revision``, ...)."""
    spec = dict(spec)
    if not isinstance(spec.get("path"), str) or not spec["path"]:
        raise CalibrationError(f"a hub calibration spec needs 'path' (the dataset id), got {spec!r}; "
                               "e.g. {'path': 'allenai/c4', 'name': 'en', 'split': 'validation', 'column': 'text'}")
    path = spec.pop("path")
    name = spec.pop("name", None)
    split = spec.pop("split", None) or "train"
    column = spec.pop("column", None) or text_column
    source = f"{path}" + (f" ({name})" if name else "") + f", split {split!r}"
    try:
        import datasets

        ds = datasets.load_dataset(path, name, split=split, streaming=True, **spec)
    except Exception as e:
        raise CalibrationError(f"calibration dataset {source} could not be loaded: not an existing file, and the "
                               f"hub could not provide it (offline? wrong id, config or split?) "
                               f"({e.__class__.__name__}: {str(e)[:200]})") from None
    return _tokens_from_stream(ds, column, tokenizer, n, seq_len, source)


def sample_from_model(model, tokenizer, n: int, seq_len: int, seed: int = 0, progress=None) -> torch.Tensor:
    """Sequences sampled from the model itself (temperature 1, no top-k/top-p),
    each started from the BOS token, which is then dropped. Deterministic for a
    seed. Needs no data at all; cached on disk by ``default_calibration``.
    ``progress``: True for a tqdm bar, or a callable ``(label, done, total)``
    called after every token position (label ``SAMPLING_LABEL``)."""
    bos = _bos_id(tokenizer)
    g = torch.Generator().manual_seed(seed)
    from .devicemap import home_device

    device = home_device(model)  # a dispatched model's first parameter may be offloaded (meta)
    out = torch.empty(n, seq_len, dtype=torch.long)
    from transformers import DynamicCache

    import inspect

    # transformers 5.24 renamed past_key_values to cache (the old name warns)
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    bar = None
    if progress is True:
        from tqdm.auto import tqdm

        bar = tqdm(total=seq_len, desc=SAMPLING_LABEL)
    try:
        with torch.inference_mode():
            cache = DynamicCache(config=model.config)
            cur = torch.full((n, 1), bos, dtype=torch.long, device=device)
            for t in range(seq_len):
                logits = model(input_ids=cur, use_cache=True, **{key: cache}).logits[:, -1].float()
                probs = torch.softmax(logits, -1).cpu()
                nxt = torch.multinomial(probs, 1, generator=g)
                out[:, t] = nxt[:, 0]
                cur = nxt.to(device)
                if bar is not None:
                    bar.update(1)
                elif callable(progress):
                    progress(SAMPLING_LABEL, t + 1, seq_len)
    finally:
        if bar is not None:
            bar.close()
    return out


# config entries that do not change what the model computes: where it was loaded
# from (``_name_or_path``), the library version, come_fast's own metadata, the
# dtype (the parameters' own is hashed) and runtime switches
_FINGERPRINT_SKIP = {"transformers_version", "come_fast", "dtype", "torch_dtype", "use_cache", "return_dict",
                     "output_attentions", "output_hidden_states"}
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits_sum(t: torch.Tensor, chunk: int = 1 << 22) -> int:
    """Sum of the tensor's elements' bit patterns as integers (int64, wrapping):
    exact and independent of the order of the summation, on any device, and
    changed by any change of any one element."""
    flat = t.detach().reshape(-1).view(_INT_VIEW[t.element_size()])
    total = 0
    for i in range(0, flat.numel(), chunk):  # int64 copies a chunk at a time
        total += int(flat[i:i + chunk].to(torch.int64).sum())
    return total


def model_fingerprint(model, tokenizer=None) -> str:
    """A key for the weights: the same for the same weights whatever folder
    (or none) they were loaded from, different when any parameter differs.
    Hashes the config (less the entries in ``_FINGERPRINT_SKIP`` and those
    starting with ``_``), every parameter's name, shape, dtype and the sum of
    its bit patterns, and the BOS id sampling starts from."""
    h = hashlib.sha256()
    cfg = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_") and k not in _FINGERPRINT_SKIP}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    h.update(repr(_bos_id(tokenizer)).encode())
    with torch.inference_mode():
        for name, p in model.named_parameters():
            h.update(f"{name}|{tuple(p.shape)}|{p.dtype}|{_bits_sum(p)};".encode())
    return h.hexdigest()[:16]


def _bos_id(tokenizer) -> int:
    bos = None
    if tokenizer is not None:
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return 0 if bos is None else bos


def default_calibration(model, tokenizer, n: int, seq_len: int, seed: int = 0, progress=None) -> torch.Tensor:
    """``n`` rows of ``seq_len`` tokens sampled from the model (``sample_from_model``;
    ``progress`` as there), cached under a key of its weights."""
    import time

    from .models import cache_dir
    from safetensors.torch import load_file, save_file

    # keyed by the weights, not by where they came from: the same weights from
    # another folder (or a copy in memory) hit the same cache entry
    key = model_fingerprint(model, tokenizer)
    path = cache_dir() / "calibration" / f"sampled-{key}-{n}x{seq_len}-s{seed}.safetensors"
    if path.is_file():
        log.info("calibration: %d sampled rows x %d tokens read from the cache %s", n, seq_len, path)
        return load_file(str(path))["input_ids"]
    log.info("calibration: sampling %d rows x %d tokens from the model (no calib given; cached in %s)",
             n, seq_len, path.parent)
    t0 = time.perf_counter()
    ids = sample_from_model(model, tokenizer, n, seq_len, seed, progress=progress)
    log.info("calibration: sampled in %.1f s", time.perf_counter() - t0)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"input_ids": ids.contiguous()}, str(tmp))
    os.replace(tmp, path)
    return ids


def check_calibration_sizes(n_samples, seq_len) -> None:
    """``n_samples`` >= 1 and ``seq_len`` >= 2, integers (not bools), or CalibrationError naming the one that is not."""
    for name, v, lo in (("n_samples", n_samples, 1), ("seq_len", seq_len, 2)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            what = "a positive integer" if lo == 1 else f"an integer >= {lo} (a next-token loss needs 2 tokens)"
            raise CalibrationError(f"{name} must be {what}, got {v!r}")


def _datasets_types():
    """``(Dataset, IterableDataset, DatasetDict, IterableDatasetDict)`` when
    ``datasets`` is installed, else empty: it is imported only for a calibration
    source that is none of the built-in kinds."""
    try:
        import datasets
    except ImportError:
        return ()
    return datasets.Dataset, datasets.IterableDataset, datasets.DatasetDict, datasets.IterableDatasetDict


def calibration_tokens(calib, model, tokenizer, n_samples: int = 32, seq_len: int = 256, seed: int = 0,
                       text_column: str = "text", progress=None) -> torch.Tensor:
    """Fixed calibration batches as a LongTensor [n, seq_len].

    calib:
    - a LongTensor [n, seq_len] (used as is), or a path to a .safetensors file
      with key ``input_ids`` (as is);
    - text: a .txt file, a .jsonl file (field ``text_column``), a list of
      strings, a ``datasets.Dataset`` or ``datasets.IterableDataset`` (column
      ``text_column``), a hub dataset id (its ``train`` split, streamed) or a
      dict ``{"path": id, "name": config, "split": split, "column": column,
      **other load_dataset keywords}``. Documents are joined by a blank line,
      tokenized whole without special tokens and cut into ``n_samples``
      consecutive rows of ``seq_len`` tokens, so that the same documents give
      the same rows whichever way they come (an iterable is read only as far
      as the rows need);
    - None for the embedded default: sequences sampled from the model itself,
      cached under a key of its weights (``model_fingerprint``); ``progress``
      (True, or a callable ``(label, done, total)``) follows the sampling.
    """
    check_calibration_sizes(n_samples, seq_len)
    if not isinstance(text_column, str) or not text_column:
        raise CalibrationError(f"text_column must be a column name, got {text_column!r}")
    if calib is None:
        return default_calibration(model, tokenizer, n_samples, seq_len, seed, progress=progress)
    n, T = n_samples, seq_len
    if isinstance(calib, torch.Tensor):
        ids = calib
    elif isinstance(calib, (list, tuple)):
        if not calib:
            raise CalibrationError(f"calibration is an empty {type(calib).__name__}: give strings (documents)")
        docs = _docs_of_strings(calib, type(calib).__name__)
        return _tokens_from_text("\n\n".join(docs), tokenizer, n, T, f"(a list of {len(calib)} documents)")
    elif isinstance(calib, dict) and not type(calib).__module__.startswith("datasets"):  # not a DatasetDict
        return _hub_tokens(calib, text_column, tokenizer, n, T)
    elif not isinstance(calib, (str, os.PathLike)):
        kinds = _datasets_types()
        if kinds and isinstance(calib, kinds[:2]):
            kind = type(calib).__name__
            names = calib.column_names  # None for an IterableDataset whose features are not known before reading
            if names is not None and text_column not in names:
                raise CalibrationError(f"calibration {kind} has no column {text_column!r} "
                                       f"(columns: {names}); pass text_column= (CLI: --text-column)")
            rows = calib.select_columns([text_column]) if names is not None else calib
            return _tokens_from_stream(rows, text_column, tokenizer, n, T, kind)
        if kinds and isinstance(calib, kinds[2:]):
            raise CalibrationError(f"calibration is a {type(calib).__name__} (splits: {sorted(calib)}): "
                                   "pass one split, e.g. ds['train']")
        raise CalibrationError(
            f"calibration of type {type(calib).__name__} is not understood: give a token tensor, a path "
            "(.safetensors, .txt, .jsonl), a list of strings, a datasets.Dataset or IterableDataset, "
            "a hub dataset id or {'path', 'name', 'split', 'column'}, or None")
    else:
        p = Path(os.fspath(calib)).expanduser()
        if p.suffix == ".safetensors":
            if not p.is_file():
                raise CalibrationError(f"calibration file {p} does not exist")
            from safetensors.torch import load_file

            try:
                d = load_file(str(p))
            except Exception as e:  # safetensors' SafetensorError: a truncated or foreign file
                raise CalibrationError(f"calibration file {p} is not a readable safetensors file "
                                       f"({str(e)[:200]}); write it with safetensors.torch.save_file"
                                       "({'input_ids': tokens})") from None
            if "input_ids" not in d:
                raise CalibrationError(f"{p} has no tensor 'input_ids' (keys: {sorted(d)})")
            ids = d["input_ids"]
        elif p.suffix in (".txt", ".jsonl", ".json"):
            if not p.is_file():
                raise CalibrationError(f"calibration file {p} does not exist")
            docs = _read_docs(p, text_column)
            return _tokens_from_text("\n\n".join(docs), tokenizer, n, T, str(p))
        elif p.exists():
            raise CalibrationError(f"calibration file {p}: unknown type (use .safetensors, .txt or .jsonl)")
        else:
            return _hub_tokens({"path": str(calib)}, text_column, tokenizer, n, T)
    if ids.dtype not in (torch.int64, torch.int32) or ids.dim() != 2:
        raise CalibrationError(f"calibration tokens must be an integer tensor [n, seq_len], got {tuple(ids.shape)} {ids.dtype}")
    if ids.shape[0] < 1 or ids.shape[1] < 2:
        raise CalibrationError(f"calibration tokens {tuple(ids.shape)}: need at least 1 sequence of 2 tokens")
    vocab = model.get_input_embeddings().weight.shape[0]
    if int(ids.max()) >= vocab or int(ids.min()) < 0:
        raise CalibrationError(f"calibration token ids outside the model's vocabulary [0, {vocab})")
    return ids.long()


# -- streaming statistics -----------------------------------------------------------------

@dataclass
class LayerStats:
    """Running sums of one layer over all calibration tokens."""

    n_tokens: int = 0
    att_abs: Optional[torch.Tensor] = None  # [H*h] sum |o_c|, input of o_proj
    mlp_abs: Optional[torch.Tensor] = None  # [I]   sum |a_j|, input of down_proj
    bi_sum: float = 0.0                     # sum over tokens of 1 - clamp(cos(x_l, x_l+1))


def cosine_rows(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """cos of matching rows of [.., d] tensors, NaN (zero vectors) read as 0.5,
    clamped to [0, 1], as the release's block influence does."""
    x = x.reshape(-1, x.shape[-1]).float()
    y = y.reshape(-1, y.shape[-1]).float()
    sim = (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))
    return sim.nan_to_num(nan=0.5).clamp(0, 1)


def run_layers(adapter: Adapter, layers, x: torch.Tensor, position_ids: torch.Tensor,
               position_embeddings=None, on_output=None) -> torch.Tensor:
    """Run decoder ``layers`` in order on hidden states ``x`` [b, T, d] and
    return the last output. No attention mask: calibration rows are full, and
    the layers attend causally without one. ``position_embeddings`` may be
    passed when cached; ``on_output(i, h)`` sees the output of each layer."""
    p = position_ids.expand(x.shape[0], -1)
    pe = position_embeddings if position_embeddings is not None else adapter.rotary(x, p)
    for i, layer in enumerate(layers):
        x = layer(x, attention_mask=None, position_ids=p, position_embeddings=pe)
        if on_output is not None:
            on_output(i, x)
    return x


class LayerStream:
    """Layer-by-layer forward over fixed calibration batches with cached boundaries.

    ``final_norm_last``: the boundary after the last layer is taken after the
    model's final norm, as ``hidden_states[-1]`` is in Hugging Face (the
    release's scores use it; faithful mode keeps it).

    A model dispatched over several devices (accelerate ``device_map``): each
    layer runs on its own execution device (``devicemap.layer_device``; the
    inputs are moved, never the weights) and its output comes back to the
    stream's ``device`` (where the embeddings run), so every cached boundary,
    score and comparison lives on that one device. On one device nothing moves.
    """

    def __init__(self, adapter: Adapter, tokens: torch.Tensor, batch_size: int = 2, ops: Ops | None = None,
                 final_norm_last: bool = True, max_cache_bytes: int | None = None, progress=None):
        self.adapter = adapter
        self.tokens = tokens
        self.bs = batch_size
        self.ops = ops or Ops("torch")
        self.final_norm_last = final_norm_last
        self.progress = progress
        model = adapter.model
        self.device = home_device(model)
        n, T = tokens.shape
        self.n, self.T = n, T
        with torch.inference_mode():
            x0 = torch.cat([to_device(adapter.embed(tokens[i:i + batch_size].to(self.device)), self.device)
                            for i in range(0, n, batch_size)])
            pos = torch.arange(T, device=self.device)[None]
            self.position_embeddings = {}
            for b in sorted({min(batch_size, n - i) for i in range(0, n, batch_size)}):
                self.position_embeddings[b] = to_device(adapter.rotary(x0[:b], pos.expand(b, -1)), self.device)
            self.position_ids = pos
        self._moved: dict = {}  # (batch rows, device) -> (position ids, position embeddings) there
        per = x0.numel() * x0.element_size()
        L = len(adapter.layers)
        if max_cache_bytes is None:
            self.cache_every = 1
        else:
            self.cache_every = max(1, math.ceil(per * (L + 1) / max(max_cache_bytes, per)))
        self.boundary: dict[int, torch.Tensor] = {0: x0}
        self.last_token: list[Optional[torch.Tensor]] = [x0[:, -1].float().clone()] + [None] * L
        self.stats: list[Optional[LayerStats]] = [None] * L
        self.layer_seconds = 0.0
        self.layers_run = 0

    def copy(self) -> "LayerStream":
        """A stream over the same adapter that shares the cached tensors (never
        changed in place: a re-run stores new ones) with its own containers, so
        that either can be merged and re-run without the other seeing it (CoMe's
        beam keeps one per path)."""
        import copy

        new = copy.copy(self)
        new.boundary, new.stats, new.last_token = dict(self.boundary), list(self.stats), list(self.last_token)
        return new

    # structure changes ------------------------------------------------------------
    def merged(self, l: int) -> None:
        """Layers l and l+1 became one layer l: forget what depended on them."""
        L = len(self.stats)
        self.stats = self.stats[:l] + [None] + self.stats[l + 2:]
        self.last_token = self.last_token[:l + 1] + [None] * (L - 1 - l)
        self.boundary = {k: v for k, v in self.boundary.items() if k <= l}

    def spliced(self, start: int, n_old: int, n_new: int) -> None:
        """Layers start..start+n_old-1 became n_new layers (0: deleted, 1:
        merged or replaced, ...): keep what lies below ``start``, forget the rest.
        ``merged(l)`` is ``spliced(l, 2, 1)``."""
        L = len(self.stats)
        L_new = L - n_old + n_new
        self.stats = self.stats[:start] + [None] * (L_new - start)
        self.last_token = self.last_token[:start + 1] + [None] * (L_new - start)
        self.boundary = {k: v for k, v in self.boundary.items() if k <= start}

    # running ------------------------------------------------------------------------
    def forward_layer(self, layer, x: torch.Tensor) -> torch.Tensor:
        """``layer`` on hidden states ``x`` [rows, T, d], in the stream's batches
        (no autograd), run on the layer's device; the output on the stream's device."""
        outs = []
        dev = layer_device(layer)
        with torch.inference_mode():
            for i in range(0, x.shape[0], self.bs):
                xb = x[i:i + self.bs]
                b = xb.shape[0]
                if b not in self.position_embeddings:
                    self.position_embeddings[b] = to_device(
                        self.adapter.rotary(xb, self.position_ids.expand(b, -1)), self.device)
                pos, pe = self.position_ids, self.position_embeddings[b]
                if dev is not None and dev != xb.device:
                    if (b, dev) not in self._moved:
                        self._moved[(b, dev)] = (to_device(pos, dev), to_device(pe, dev))
                    pos, pe = self._moved[(b, dev)]
                    xb = xb.to(dev)
                outs.append(to_device(run_layers(self.adapter, [layer], xb, pos, pe), self.device))
            return torch.cat(outs)

    def boundaries(self):
        """(j, x_j) for j = 0 .. L on the current model, raw (x_L before the
        final norm), computed afresh and not cached: one layer's worth at a time."""
        x = self.boundary[0]
        yield 0, x
        with torch.inference_mode():
            for j, layer in enumerate(self.adapter.layers):
                x = self.forward_layer(layer, x)
                yield j + 1, x

    def _accumulator(self, acc: torch.Tensor):
        def hook(module, args):
            self.ops.accumulate_abs_(args[0], acc)
            return None  # a pre-hook that returns a value would replace the module's input

        return hook

    def run(self, start: int = 0, stop: int | None = None, collect: bool = True) -> None:
        """(Re)compute boundaries and statistics of layers start..stop-1."""
        import time

        a = self.adapter
        layers = a.layers
        L = len(layers)
        stop = L if stop is None else stop
        begin = max(k for k in self.boundary if k <= start)
        x = self.boundary[begin]
        with torch.inference_mode():
            for l in range(begin, stop):
                t0 = time.perf_counter()
                layer = layers[l]
                st = LayerStats(n_tokens=self.n * self.T)
                handles = []
                if collect:  # summed where the layer runs (channel_scores reads them with its weights)
                    o, down = a.part(layer, "o"), a.part(layer, "down")
                    dev = layer_device(layer) or self.device
                    st.att_abs = torch.zeros(o.in_features, dtype=torch.float32, device=dev)
                    st.mlp_abs = torch.zeros(down.in_features, dtype=torch.float32, device=dev)
                    handles.append(o.register_forward_pre_hook(self._accumulator(st.att_abs)))
                    handles.append(down.register_forward_pre_hook(self._accumulator(st.mlp_abs)))
                try:
                    y = self.forward_layer(layer, x)
                finally:
                    for h in handles:
                        h.remove()
                y_b = to_device(a.final_norm(y), self.device) if (l == L - 1 and self.final_norm_last) else y
                if collect:
                    bi = 0.0
                    for i in range(0, self.n, self.bs):
                        # per batch, summed in float64 like the release
                        bi += float((1 - cosine_rows(x[i:i + self.bs], y_b[i:i + self.bs])).sum())
                    st.bi_sum = bi
                    self.stats[l] = st
                self.last_token[l + 1] = y_b[:, -1].float().clone()
                if (l + 1) % self.cache_every == 0 or l + 1 == L:
                    self.boundary[l + 1] = y_b if l + 1 == L else y
                x = y
                self.layer_seconds += time.perf_counter() - t0
                self.layers_run += 1
                if self.progress is not None:
                    self.progress(l)

    def input_of(self, l: int) -> torch.Tensor:
        """The hidden state entering layer l, from the nearest cached boundary."""
        begin = max(k for k in self.boundary if k <= l)
        x = self.boundary[begin]
        with torch.inference_mode():
            for k in range(begin, l):
                x = self.forward_layer(self.adapter.layers[k], x)
        return x

    def loss_with(self, start: int, layers: list) -> float:
        """Calibration LM loss (mean next-token cross-entropy) when layers
        start.. are replaced by ``layers``; the stream itself is not changed."""
        a = self.adapter
        x = self.input_of(start)
        total, count = 0.0, 0
        with torch.inference_mode():
            for layer in layers:
                x = self.forward_layer(layer, x)
            for i in range(0, self.n, self.bs):
                h = a.final_norm(x[i:i + self.bs])[:, :-1]
                logits = a.lm_head(h).float()
                tgt = self.tokens[i:i + self.bs, 1:].to(logits.device)
                total += float(torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="sum"))
                count += tgt.numel()
        return total / count

    def hidden_with(self, start: int, layers: list, final_norm: bool = True) -> torch.Tensor:
        """The last hidden state (after the final norm unless ``final_norm`` is
        False) when layers start.. are replaced by ``layers``; the stream itself
        is not changed. ``loss_with``'s forward, without the head."""
        x = self.input_of(start)
        with torch.inference_mode():
            for layer in layers:
                x = self.forward_layer(layer, x)
            return to_device(self.adapter.final_norm(x), self.device) if final_norm else x

    def output(self) -> torch.Tensor:
        """The last boundary (after the final norm when final_norm_last)."""
        return self.boundary[len(self.adapter.layers)]

    def pair_distance(self, tokens: str = "last") -> list[float]:
        """D[l] = sum over sequences of arccos(clamp(cos(x_l, x_l+2)))/pi, on the
        last token (``tokens="last"``, the release) or averaged over all
        tokens of each sequence (``"all"``; needs every boundary cached)."""
        L = len(self.adapter.layers)
        if tokens == "last":
            pairs = [(self.last_token[l], self.last_token[l + 2]) for l in range(L - 1)]
            return [float((torch.arccos(cosine_rows(x, y)) / math.pi).sum()) for x, y in pairs]
        if tokens != "all":
            raise ValueError(f"pair distance tokens must be 'last' or 'all', got {tokens!r}")
        if self.cache_every != 1:
            raise ValueError("an all-token pair distance needs every layer boundary cached (no max_cache_bytes)")
        out = []
        with torch.inference_mode():
            for l in range(L - 1):
                x, y = self.boundary[l], self.boundary[l + 2]
                ang = torch.arccos(cosine_rows(x, y)) / math.pi
                out.append(float(ang.reshape(self.n, self.T).double().mean(1).sum()))
        return out
