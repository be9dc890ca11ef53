"""Compressing a model larger than memory: decoder layers streamed from disk.

``compress(folder, ..., offload="disk")`` builds the model on the meta device
and materialises only the embeddings, the final norm and the head; each
decoder layer is read from the folder's safetensors files when it is used
(plain reads into tensors the process owns: no memory map keeps pages
resident) and released again when more than ``capacity`` layers are resident
(``capacity_for``: 4 for a merge, 2 for a deletion), least recently used
first, its freed pages handed back to the system. Layers a method makes
(merges, refits) are adopted when they enter the model's layer list and, when
released, written to a temporary safetensors file and read back from there.
``save`` then writes the result one layer at a time (one shard per layer).
The decisions and the tensors are the ones the in-memory run makes in the same
dtype (``compress(..., dtype=)``, float32 by default; a bfloat16 checkpoint
streamed in bfloat16 needs half the memory): the layers compute on the same
CPU tensors, in the same order.

What makes it work without touching the methods: the model's layer list is a
``LazyLayers`` (a ``ModuleList`` that materialises layer i on ``layers[i]``),
every layer carries a forward pre-hook that materialises it before it runs and
a ``__deepcopy__`` that materialises it before it is copied, and the parent's
module table re-wraps any new layer list ``Adapter.set_layers`` installs.
A method that reads the weights of every layer at once (gradients over the
whole model, magnitudes iterated over ``adapter.layers``, distillation)
cannot run this way and is refused before any work (``SUPPORTED``).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import weakref
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

MODES = ("disk",)
# the methods checked bit for bit against the in-memory run (tests/test_offload.py)
SUPPORTED = ("come", "come-p", "shortgpt", "reverse", "sleb", "ppl", "laco", "replaceme")
DEFAULT_CAPACITY = 4  # resident decoder layers (CoMe's merge holds two sources and the merge at once)


def capacity_for(method: str, options: dict) -> int:
    """Decoder layers a method needs resident at once: a merge holds its
    sources and the merged layer (LaCo: ``laco_layers`` sources), a deletion
    or a refit one layer and the next; fewer layers, less peak memory (at 3B
    in bfloat16 each layer is 192 MiB)."""
    if method == "laco":
        return int(options.get("laco_layers", 4)) + 1
    return DEFAULT_CAPACITY if method in ("come", "come-p") else 2


class OffloadError(ValueError):
    """A request ``offload="disk"`` cannot serve."""


# every layer a store manages -> its store (module-level: hooks and deepcopy must not copy a store)
_OWNER: "weakref.WeakKeyDictionary[nn.Module, LayerStore]" = weakref.WeakKeyDictionary()


def _pre_hook(module, args):
    store = _OWNER.get(module)
    if store is not None:
        store.ensure(module)
    return None


def _nbytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters() if not p.is_meta)


class LazyLayers(nn.ModuleList):
    """The model's decoder layers; ``layers[i]`` materialises layer i. Iterating
    yields the modules as they are (a forward materialises each); a slice is a
    plain ``ModuleList`` of the same modules."""

    _store = None

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return nn.ModuleList(list(self._modules.values())[idx])
        m = super().__getitem__(idx)
        if self._store is not None:
            self._store.ensure(m)
        return m


class _Modules(dict):
    """The module table of the layers' parent: a new layer list is adopted."""

    def __init__(self, items, store, name):
        super().__init__(items)
        self._store_ref = weakref.ref(store)
        self._name = name

    def __setitem__(self, key, value):
        store = self._store_ref()
        if key == self._name and store is not None and isinstance(value, nn.ModuleList):
            value = store.wrap(value)
        super().__setitem__(key, value)


class _Slot:
    __slots__ = ("source", "loaded", "dirty", "hook", "device")

    def __init__(self, source, hook, device=None):
        self.source = source      # prefix in the checkpoint, a spilled file, or a mapping of the layer's tensors
        self.loaded = None        # {param name: (tensor, version)} while resident
        self.dirty = False
        self.hook = hook
        self.device = device      # where the layer is materialised (None: the store's device)


class LayerStore:
    """Decoder layers read on demand from a safetensors checkpoint (or, for a
    model dispatched by accelerate, from its offload hooks' weights maps, each
    layer onto its own execution device: come_fast/devicemap.py).

    ``resident_bytes``: bytes of the layers materialised now; ``peak_bytes``:
    the most at any time (``fixed_bytes``: embeddings, final norm and head,
    always resident, not included)."""

    def __init__(self, folder: Path, weight_map: dict, dtype: torch.dtype, device, capacity: int = DEFAULT_CAPACITY):
        self.folder = Path(folder)
        self.weight_map = weight_map          # tensor name -> file name
        self.dtype = dtype
        self.device = torch.device(device)
        self.capacity = max(2, int(capacity))
        self.slots: "weakref.WeakKeyDictionary[nn.Module, _Slot]" = weakref.WeakKeyDictionary()
        self.lru: "OrderedDict[int, nn.Module]" = OrderedDict()   # id -> module, resident ones
        self.resident_bytes = 0
        self.peak_bytes = 0
        self.fixed_bytes = 0
        self.loads = 0
        self.spills = 0
        self._handles: dict[str, object] = {}
        self._tmp: Path | None = None
        self._finalizer = weakref.finalize(self, shutil.rmtree, "", True)  # replaced once there is a folder
        # a layer list may hold modules the store must leave alone (a dispatched model's layers that stay
        # on their device, come_fast/devicemap.py): ``keep(module)`` True for those
        self.keep = None

    # files --------------------------------------------------------------------------
    def _open(self, path: Path) -> "_SafetensorsFile":
        key = str(path)
        h = self._handles.get(key)
        if h is None:
            h = self._handles[key] = _SafetensorsFile(key)
        return h

    def read(self, name: str, path: Path | None = None, device=None, convert: bool = True) -> torch.Tensor:
        """One tensor, converted as ``from_pretrained(dtype=...)`` converts it
        (``convert=False``: as stored, e.g. a spilled layer)."""
        path = path or self.folder / self.weight_map[name]
        t = self._open(path).read(name)
        if convert and t.is_floating_point() and t.dtype != self.dtype:
            t = t.to(self.dtype)
        return t.to(self.device if device is None else device)

    def _spill_dir(self) -> Path:
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="come_fast-layers-"))
            self._finalizer.detach()
            self._finalizer = weakref.finalize(self, shutil.rmtree, str(self._tmp), True)
        return self._tmp

    def close(self) -> None:
        self._handles.clear()
        self._finalizer()

    # bookkeeping --------------------------------------------------------------------
    def register(self, module: nn.Module, source, device=None) -> None:
        """Manage ``module``: ``source`` is its weights' prefix in the checkpoint,
        a mapping of its tensors by parameter name (read on demand onto
        ``device``), or None for a layer a method made (resident now, on the
        device of its parameters)."""
        if module in _OWNER:
            return
        if source is None and device is None:
            device = next((p.device for p in module.parameters() if not p.is_meta), None)
        handle = module.register_forward_pre_hook(_pre_hook)
        slot = _Slot(source, handle.id, None if device is None else torch.device(device))
        self.slots[module] = slot
        _OWNER[module] = self
        store = self

        def deepcopy(memo):  # materialise, then copy as a plain module (no hook, no store)
            import copy

            store.ensure(module)
            saved = module.__dict__.pop("__deepcopy__")
            try:
                new = copy.deepcopy(module, memo)
            finally:
                module.__dict__["__deepcopy__"] = saved
            new._forward_pre_hooks.pop(slot.hook, None)
            return new

        module.__dict__["__deepcopy__"] = deepcopy
        if source is None:  # a layer a method made: resident (and not on disk) from the start
            self._evict(room=1)
            slot.loaded = self._snapshot(module)
            slot.dirty = True
            self._touch(module, _nbytes(module))

    def wrap(self, layers: nn.ModuleList) -> LazyLayers:
        if isinstance(layers, LazyLayers) and layers._store is self:
            return layers
        out = LazyLayers(list(layers))
        out._store = self
        for m in out:
            if m not in _OWNER and not (self.keep is not None and self.keep(m)):
                self.register(m, None)
        self._evict()
        return out

    @staticmethod
    def _snapshot(module) -> dict:
        return {n: (p, p._version) for n, p in module.named_parameters()}

    def _changed(self, module, slot) -> bool:
        now = dict(module.named_parameters())
        if set(now) != set(slot.loaded):
            return True
        return any(now[n] is not t or t._version != v for n, (t, v) in slot.loaded.items())

    def _touch(self, module, added: int = 0) -> None:
        self.lru[id(module)] = module
        self.lru.move_to_end(id(module))
        self.resident_bytes += added
        self.peak_bytes = max(self.peak_bytes, self.resident_bytes)

    # loading and releasing ----------------------------------------------------------
    def ensure(self, module: nn.Module) -> None:
        slot = self.slots.get(module)
        if slot is None:
            return
        if slot.loaded is not None:
            self.lru.move_to_end(id(module))
            return
        self._evict(room=1)  # make room first: never more than ``capacity`` layers at once
        with torch.inference_mode(False), torch.no_grad():
            params = dict(module.named_parameters())
            dev = slot.device
            if isinstance(slot.source, Path):  # spilled by this store
                tensors = {n: self.read(n, slot.source, dev, convert=False) for n in params}
            else:
                if isinstance(slot.source, str):  # the checkpoint
                    prefix = slot.source
                    tensors = {n: self.read(prefix + n, device=dev) for n in params}
                else:  # a mapping (an accelerate-offloaded layer's weights), as stored
                    prefix = getattr(slot.source, "prefix", "")
                    tensors = {n: slot.source[n].to(self.device if dev is None else dev) for n in params}
                for n, t in tensors.items():
                    if t.is_floating_point() and not torch.isfinite(t).all():
                        raise ValueError(f"model parameter {prefix + n} holds NaN or Inf: refusing to compress")
            for n, t in tensors.items():
                _set_param(module, n, nn.Parameter(t, requires_grad=params[n].requires_grad))
        self._handles.clear()
        del tensors
        _trim()  # the stored-dtype copies just converted
        self.loads += 1
        slot.loaded = self._snapshot(module)
        slot.dirty = False
        self._touch(module, _nbytes(module))

    def forget(self, module: nn.Module) -> None:
        """Stop managing ``module`` as it is now (resident or not): its
        materialising pre-hook and ``__deepcopy__`` go."""
        slot = self.slots.pop(module, None)
        if slot is None:
            return
        module._forward_pre_hooks.pop(slot.hook, None)
        module.__dict__.pop("__deepcopy__", None)
        _OWNER.pop(module, None)
        if self.lru.pop(id(module), None) is not None:
            self.resident_bytes -= _nbytes(module)

    def _evict(self, room: int = 0) -> None:
        """Release least recently used layers until ``room`` more fit."""
        while self.lru and len(self.lru) > self.capacity - room:
            self.release(next(iter(self.lru.values())))

    def release(self, module: nn.Module) -> None:
        slot = self.slots[module]
        if slot.loaded is None:
            return
        if slot.dirty or self._changed(module, slot):
            from safetensors.torch import save_file

            path = self._spill_dir() / f"layer-{id(module)}-{self.spills}.safetensors"
            save_file({n: p.detach().contiguous() for n, p in module.named_parameters()}, str(path))
            self.spills += 1
            slot.source = path
        nbytes = _nbytes(module)
        with torch.no_grad():
            for n, p in list(module.named_parameters()):
                _set_param(module, n, nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                                   requires_grad=p.requires_grad))
        slot.loaded = None
        slot.dirty = False
        self.lru.pop(id(module), None)
        self.resident_bytes -= nbytes
        _trim()


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


class _SafetensorsFile:
    """A safetensors file read tensor by tensor with plain reads into tensors
    this process owns. Not ``safe_open``: its tensors are views of a memory
    map, and while one lives (the embeddings) every page read through that
    map (every layer of the shard) stays in the process's RSS; a read copies
    each tensor once and keeps no page of the file mapped."""

    def __init__(self, path: str):
        import struct

        self.path = path
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            self.header = json.loads(f.read(n))
        self.base = 8 + n

    def read(self, name: str) -> torch.Tensor:
        info = self.header[name]
        begin, end = info["data_offsets"]
        t = torch.empty(info["shape"], dtype=_ST_DTYPES[info["dtype"]])
        view = memoryview(t.view(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")
        if len(view) != end - begin:
            raise ValueError(f"{self.path}: tensor {name} holds {end - begin} bytes, its shape needs {len(view)}")
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.base + begin)
            got = 0
            while got < len(view):
                k = f.readinto(view[got:])
                if not k:
                    raise ValueError(f"{self.path}: the file ends inside tensor {name}")
                got += k
        return t


def _libc():
    import ctypes
    import ctypes.util

    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return lib if hasattr(lib, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _libc() if sys.platform.startswith("linux") else None


def _trim() -> None:
    """Hand the freed layer's pages back to the system: a layer's tensors are
    below glibc's mmap threshold once it has grown, so they come from the heap,
    and freeing them leaves the heap's pages resident (at 0.5B a third of the
    peak RSS); ``malloc_trim`` returns every free page (glibc only)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _set_param(module: nn.Module, name: str, value: nn.Parameter) -> None:
    owner_path, _, pname = name.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    owner._parameters[pname] = value


def store_of(model) -> LayerStore | None:
    return getattr(model, "_come_fast_offload", None)


def is_lazy(model) -> bool:
    return store_of(model) is not None


# -- requests -------------------------------------------------------------------------

def check_request(model, offload, method: str, *, calib=None, distill_steps=0, teacher=None, on_step=None,
                  exact=False) -> None:
    """Everything ``offload=`` refuses, before any work."""
    if offload not in MODES:
        raise OffloadError(f"offload must be one of {', '.join(map(repr, MODES))} or None, got {offload!r}")
    if not isinstance(model, (str, os.PathLike)):
        raise OffloadError("offload='disk' reads the layers from a checkpoint folder: pass the folder's path "
                           "(e.g. compress('path/to/model', offload='disk')), not a loaded model")
    if method not in SUPPORTED:
        raise OffloadError(f"method {method!r} needs the whole model at once (gradients or weights of every layer "
                           f"together, or training): it cannot run with offload='disk'; methods that stream: "
                           f"{', '.join(SUPPORTED)}")
    if distill_steps or teacher is not None:
        raise OffloadError("distillation trains the whole model against a teacher copy: not with offload='disk'")
    if exact:
        raise OffloadError("exact=True is not supported with offload='disk' yet")
    if on_step is not None:
        raise OffloadError("on_step is not supported with offload='disk' (its snapshots copy the whole model)")
    if calib is None:
        raise OffloadError("offload='disk' needs calibration data (calib=: tokens, a file, text or a dataset): "
                           "the default samples text from the model, which needs it whole")


def checkpoint_files(folder) -> tuple[Path, dict]:
    """The folder and its tensor name -> safetensors file map (sharded or not)."""
    from .models import CheckpointError, ModelNotFoundError, check_checkpoint_folder

    p = Path(os.fspath(folder)).expanduser()
    if not p.is_dir():
        raise ModelNotFoundError(f"offload='disk' needs a local checkpoint folder; {folder} is not a folder")
    if not (p / "config.json").is_file():
        raise ModelNotFoundError(f"{p} is a folder but holds no config.json: not a Hugging Face checkpoint")
    config = check_checkpoint_folder(p)  # architecture, safetensors only (pickles refused with how to convert)
    if config.get("come_fast_sublayers") is not None or config.get("come_fast_mlp_widths") is not None:
        raise OffloadError(f"{p} has layers of different shapes (a FinerCut or exact=True result): "
                           "not supported with offload='disk'")
    index = p / "model.safetensors.index.json"
    if index.is_file():
        with open(index, encoding="utf-8") as f:
            weight_map = dict(json.load(f)["weight_map"])
        missing = sorted({v for v in weight_map.values() if not (p / v).is_file()})
        if missing:
            raise CheckpointError(f"{index} names shards that are not there: {', '.join(missing[:3])}")
        return p, weight_map
    from safetensors import safe_open

    weight_map = {}
    for f in sorted(p.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as h:
                weight_map.update({k: f.name for k in h.keys()})
        except Exception as e:
            raise CheckpointError(f"could not read the weights of {f}: {str(e)[:300]}") from None
    return p, weight_map


def lazy_model(folder, dtype: torch.dtype = torch.float32, device="cpu", capacity: int = DEFAULT_CAPACITY):
    """``(model, tokenizer)``: the model of ``folder`` on the meta device with
    its embeddings, final norm, head and rotary tables materialised and its
    decoder layers served by a ``LayerStore``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .adapters import adapter_for
    from .models import CheckpointError

    p, weight_map = checkpoint_files(folder)
    config = AutoConfig.from_pretrained(p)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    a = adapter_for(model)
    store = LayerStore(p, weight_map, dtype, device, capacity)
    fam = a.family
    layers_prefix = fam.layers + "."
    names = dict(model.named_parameters(remove_duplicate=False))
    want = {n for n in names}
    tied = getattr(config, "tie_word_embeddings", False) and a.lm_head.weight is a.embed.weight
    have = set(weight_map)
    missing = sorted(n for n in want - have if not (tied and n == fam.lm_head + ".weight"))
    extra = sorted(have - want)
    if missing or extra:
        parts = [f"{len(v)} {k} (e.g. {', '.join(v[:3])})" for k, v in (("missing", missing), ("unexpected", extra))
                 if v]
        raise CheckpointError(f"{p}: the weights do not match the config: {'; '.join(parts)}. "
                              "A missing weight would be re-created at random; refusing to load")
    # everything outside the decoder layers, materialised now
    with torch.no_grad():
        for n, prm in model.named_parameters():
            if n.startswith(layers_prefix):
                continue
            t = store.read(n)
            _set_param(model, n, nn.Parameter(t, requires_grad=prm.requires_grad))
            store.fixed_bytes += t.numel() * t.element_size()
        if tied:
            model.tie_weights()
        # non-persistent buffers (rotary inv_freq) are computed, not stored: rebuild them off the meta device
        for mname, mod in model.named_modules():
            if any(b is not None and b.is_meta for b in mod._buffers.values()):
                if mname.startswith(layers_prefix):
                    raise OffloadError(f"decoder layer buffer in {mname}: not supported with offload='disk'")
                with torch.device(store.device):
                    fresh = type(mod)(config=config)
                parent_path, _, child = mname.rpartition(".")
                parent = model.get_submodule(parent_path) if parent_path else model
                setattr(parent, child, fresh.to(store.device))
    store._handles.clear()
    parent_path, _, list_name = fam.layers.rpartition(".")
    parent = model.get_submodule(parent_path)
    layers = a.layers
    for i, layer in enumerate(layers):
        store.register(layer, f"{fam.layers}.{i}.")
    parent.__dict__["_modules"] = _Modules(parent._modules, store, list_name)
    parent._modules[list_name] = layers  # wrapped by the table itself
    model._come_fast_offload = store
    try:
        tok = AutoTokenizer.from_pretrained(p)
    except Exception:
        tok = None
    return model, tok


# -- writing ----------------------------------------------------------------------------

def save_streaming(model, folder: Path) -> None:
    """``save_pretrained`` for a lazy model: config, generation config, and the
    weights one decoder layer per safetensors shard (plus one shard for the
    rest) with the standard index, each layer materialised in turn. Weights
    offloaded by an accelerate device map are materialised on the CPU the same
    way, a layer at a time (``devicemap.materialised``)."""
    from safetensors.torch import save_file

    from .adapters import adapter_for
    from .devicemap import materialised

    store = store_of(model)
    a = adapter_for(model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    gen = getattr(model, "generation_config", None)
    if gen is not None and model.can_generate():
        gen.save_pretrained(folder)
    prefix = a.family.layers + "."
    rest = {}
    seen = set()
    with materialised(model, exclude=prefix):
        for n, prm in model.named_parameters():  # tied weights: the first name only, as save_pretrained keeps
            if n.startswith(prefix) or id(prm) in seen:
                continue
            seen.add(id(prm))
            rest[n] = prm.detach().to("cpu").contiguous()
    L = len(a.layers)
    total = L + 1
    name = "model-{:05d}-of-{:05d}.safetensors".format
    weight_map, size = {}, 0
    save_file(rest, str(folder / name(1, total)), metadata={"format": "pt"})
    for n, t in rest.items():
        weight_map[n] = name(1, total)
        size += t.numel() * t.element_size()
    for i in range(L):
        layer = a.layers[i]  # materialised
        with materialised(layer):
            tensors = {f"{prefix}{i}.{n}": p.detach().to("cpu").contiguous() for n, p in layer.named_parameters()}
        save_file(tensors, str(folder / name(i + 2, total)), metadata={"format": "pt"})
        for n, t in tensors.items():
            weight_map[n] = name(i + 2, total)
            size += t.numel() * t.element_size()
        del tensors, layer
        if store is not None:
            store._evict()
    with open(folder / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
