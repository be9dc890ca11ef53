"""Compressing a model dispatched by accelerate (``from_pretrained(...,
device_map=...)`` or ``accelerate.dispatch_model``): layers on several GPUs,
offloaded to CPU memory or to disk.

What ``compress`` does with such a model (``Placement``):

* before any work it records where each decoder layer runs (its hook's
  execution device), whether its weights are offloaded (meta parameters that
  an ``AlignDevicesHook`` with ``offload=True`` loads) and where to (CPU memory
  or disk); a parameter on the meta device that no hook can load, or a device
  map that splits a decoder layer over devices, is refused
  (``DeviceMapError``) with the model untouched;
* layers that are resident on their device keep their accelerate hooks: a
  forward moves its inputs there, and a copy (a merge starts as a copy of its
  first layer) carries a copy of the hooks, so it runs where its source ran;
* offloaded decoder layers are handed, for the run, to a
  ``come_fast.offload.LayerStore`` that reads their weights from the hooks'
  weights map onto their execution device when a method uses them and
  releases them again (a few at a time), exactly as ``offload="disk"``
  streams layers from a checkpoint; their hooks are set aside meanwhile;
* the calibration stream (come_fast.calibration.LayerStream) runs every layer
  on its own execution device and brings its output back to the home device
  (the embeddings' execution device), so scores and comparisons between
  layers see tensors of one device (``layer_device``);
* at the end, failed or not, the caller's offloaded layers get back their own
  parameters and hooks; on success every new layer (a merge, a refit copy) is
  placed where the first original layer of its span was (``provenance``):
  moved to that device and given hooks by
  ``accelerate.hooks.attach_align_device_hook_on_blocks`` as
  ``dispatch_model`` gives them, its weights offloaded to CPU memory or to a
  folder on disk (beside the model's own offload folder) where that layer's
  were; ``hf_device_map`` is rewritten for the new layer indices.

``come_fast.save`` writes a model with offloaded weights one layer at a time,
each materialised on the CPU by ``accelerate.utils.align_module_device``
(come_fast.offload.save_streaming).
"""
from __future__ import annotations

import contextlib
import itertools
import shutil
import tempfile
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

# the attributes accelerate's add_hook_to_module sets on a module
_HOOK_ATTRS = ("_hf_hook", "_old_forward", "forward")


class DeviceMapError(ValueError):
    """A dispatched model (device map, accelerate hooks) compress cannot serve."""


# -- hooks --------------------------------------------------------------------------------

def align_hook(module: nn.Module):
    """The ``AlignDevicesHook`` accelerate attached to ``module`` (inside a
    ``SequentialHook`` too), or None."""
    h = module.__dict__.get("_hf_hook")
    if h is None:
        return None
    from accelerate.hooks import AlignDevicesHook, SequentialHook

    if isinstance(h, SequentialHook):
        return next((x for x in h.hooks if isinstance(x, AlignDevicesHook)), None)
    return h if isinstance(h, AlignDevicesHook) else None


def offload_hook(module: Optional[nn.Module]):
    """The hook that loads ``module``'s offloaded tensors before a forward, or None."""
    h = align_hook(module) if module is not None else None
    return h if h is not None and h.offload and h.weights_map is not None else None


def is_dispatched(model: nn.Module) -> bool:
    """Whether accelerate hooks are attached anywhere in ``model``."""
    return any("_hf_hook" in m.__dict__ for m in model.modules())


def _device(d) -> Optional[torch.device]:
    return None if d is None else torch.device(d)


def execution_device(module: nn.Module) -> Optional[torch.device]:
    """The device ``module``'s own accelerate hook runs it on (None: no hook)."""
    h = align_hook(module)
    return None if h is None else _device(h.execution_device)


def home_device(model: nn.Module) -> torch.device:
    """Where the embeddings run: the device calibration activations are kept
    on. The first parameter's device for a model without hooks."""
    emb = model.get_input_embeddings()
    d = execution_device(emb) if emb is not None else None
    if d is not None:
        return d
    return next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))


def layer_device(layer: nn.Module) -> Optional[torch.device]:
    """Where ``layer`` runs: its accelerate hook's execution device, the device
    an offload store materialises it on, else its parameters' device (None
    when it has none off the meta device)."""
    d = execution_device(layer)
    if d is not None:
        return d
    from .offload import _OWNER

    store = _OWNER.get(layer)
    if store is not None:
        slot = store.slots.get(layer)
        return slot.device if slot is not None and slot.device is not None else store.device
    return next((p.device for p in layer.parameters() if not p.is_meta), None)


def to_device(x, device: Optional[torch.device]):
    """A tensor (or a tuple of them) on ``device`` (unchanged when None or already there)."""
    if device is None:
        return x
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(t, device) for t in x)
    return x if x.device == device else x.to(device)


# -- offloaded weights ---------------------------------------------------------------------

def _unwrap(wm, key: str):
    from accelerate.utils import PrefixedDataset

    while isinstance(wm, PrefixedDataset):
        key = wm.prefix + key
        wm = wm.dataset
    return wm, key


def _has_key(wm, key: str) -> bool:
    from accelerate.utils import OffloadedWeightsLoader

    base, full = _unwrap(wm, key)
    if isinstance(base, OffloadedWeightsLoader):
        return full in base.state_dict or full in base.index
    if isinstance(base, dict):
        return full in base
    try:
        base[full]
    except KeyError:
        return False
    return True


def _stored(wm, key: str) -> tuple[str, Optional[str]]:
    """("disk", its folder) or ("cpu", None): where an offloaded tensor is kept."""
    from accelerate.utils import OffloadedWeightsLoader

    base, full = _unwrap(wm, key)
    if isinstance(base, OffloadedWeightsLoader) and full not in base.state_dict:
        return "disk", base.save_folder
    return "cpu", None


def loader_of(model: nn.Module, name: str):
    """(hook, key) that loads the meta tensor ``name`` of ``model`` (the
    innermost module whose offload hook holds it), or None."""
    parts = name.split(".")
    for k in range(len(parts) - 1, -1, -1):
        path, rel = ".".join(parts[:k]), ".".join(parts[k:])
        try:
            m = model.get_submodule(path) if path else model
        except AttributeError:
            continue
        h = offload_hook(m)
        if h is not None and ("." not in rel or h.place_submodules) and _has_key(h.weights_map, rel):
            return h, rel
    return None


def unloadable_meta(model: nn.Module) -> Optional[str]:
    """The first parameter or buffer on the meta device that no accelerate
    offload hook can load (None: every one can)."""
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        if t.is_meta and loader_of(model, name) is None:
            return name
    return None


def has_offloaded(model: nn.Module) -> bool:
    """Whether some weight of ``model`` is offloaded by accelerate (on the meta
    device, loaded by a hook)."""
    return any(offload_hook(m) is not None for m in model.modules())


@contextlib.contextmanager
def materialised(module: nn.Module, device="cpu", exclude: Optional[str] = None):
    """Every accelerate-offloaded tensor under ``module`` loaded onto ``device``
    for the duration (``accelerate.utils.align_module_device`` on each module
    with an offload hook); submodules whose name starts with ``exclude`` are
    left alone. Nothing to do for a module without offload hooks."""
    with contextlib.ExitStack() as stack:
        todo = [(n, m) for n, m in module.named_modules() if offload_hook(m) is not None
                and not (exclude and (n + ".").startswith(exclude))]
        if todo:
            from accelerate.utils import align_module_device

            for _, m in todo:
                stack.enter_context(align_module_device(m, torch.device(device)))
        yield module


class _LayerWeights(Mapping):
    """An offloaded decoder layer's tensors by parameter name: read through its
    hooks' weights maps (or, for a parameter that was not offloaded, the
    parameter itself). The source a LayerStore reads the layer from."""

    def __init__(self, model: nn.Module, layer_name: str, layer: nn.Module):
        self.prefix = layer_name + "."
        self.items_ = {}
        for n, p in layer.named_parameters():
            if p.is_meta:
                self.items_[n] = loader_of(model, self.prefix + n)
            else:
                self.items_[n] = p

    def __getitem__(self, n):
        v = self.items_[n]
        if isinstance(v, torch.Tensor):
            return v.detach()
        hook, key = v
        return hook.weights_map[key]

    def __iter__(self):
        return iter(self.items_)

    def __len__(self):
        return len(self.items_)


# -- the placement of a dispatched model --------------------------------------------------

@dataclass
class Where:
    """Where one original decoder layer lives."""

    device: torch.device        # execution device
    offloaded: bool             # weights on the meta device, loaded by hooks
    kind: Optional[str]         # "disk" or "cpu" (memory) where offloaded
    folder: Optional[str]       # the disk offload folder
    map_value: object = None    # its hf_device_map entry


class Placement:
    """A dispatched model's layer placement, for one ``compress`` call:
    ``begin`` before the first forward of the run, ``end`` after it (always)."""

    def __init__(self, model: nn.Module, adapter):
        self.model = model
        self.family = adapter.family
        self.prefix = self.family.layers + "."
        self.originals = list(adapter.layers)
        self.home = home_device(model)
        hmap = getattr(model, "hf_device_map", None)
        self.hmap = dict(hmap) if isinstance(hmap, dict) else None
        L = len(self.originals)
        if self.hmap:
            split = sorted(k for k in self.hmap if k.startswith(self.prefix) and "." in k[len(self.prefix):])
            if split:
                raise DeviceMapError(
                    f"the device map splits a decoder layer over devices ({', '.join(split[:3])}): compress merges "
                    f"and deletes whole layers; dispatch with each decoder layer on one device (from_pretrained "
                    f"does by default; infer_auto_device_map(..., no_split_module_classes=[the decoder layer class]))")
        self.layer_keys = bool(self.hmap) and all(f"{self.prefix}{i}" in self.hmap for i in range(L))
        bad = unloadable_meta(model)
        if bad is not None:
            raise DeviceMapError(
                f"model parameter {bad} is on the meta device and no accelerate offload hook can load it (the device "
                f"map puts it on 'meta', or it was never loaded): compress needs every weight on a device or "
                f"offloaded with its hook (device_map values: GPU indices, 'cpu' or 'disk' with offload_folder=)")
        self.where = [self._where(model, i, layer) for i, layer in enumerate(self.originals)]
        ref = next((align_hook(m) for layer in self.originals for m in layer.modules() if align_hook(m) is not None),
                   None)
        self.skip_keys = getattr(ref, "skip_keys", None)
        self.offload_buffers = bool(getattr(ref, "offload_buffers", False))
        self.offloaded_any = any(p.is_meta for p in model.parameters())
        self.store = None
        self._params: dict[int, dict] = {}
        self._hooks: dict[int, list] = {}
        self._folder: Optional[str] = None

    @classmethod
    def of(cls, model: nn.Module, adapter) -> Optional["Placement"]:
        """The placement of a dispatched model; None for a model without accelerate hooks."""
        return cls(model, adapter) if is_dispatched(model) else None

    def _where(self, model, i: int, layer: nn.Module) -> Where:
        name = f"{self.prefix}{i}"
        metas = [n for n, p in layer.named_parameters() if p.is_meta]
        kind = folder = None
        if metas:
            hook, key = loader_of(model, f"{name}.{metas[0]}")
            kind, folder = _stored(hook.weights_map, key)
        dev = execution_device(layer)
        if dev is None:
            dev = next((execution_device(m) for m in layer.modules() if execution_device(m) is not None), None)
        if dev is None:
            dev = next((p.device for p in layer.parameters() if not p.is_meta), self.home)
        return Where(device=dev, offloaded=bool(metas), kind=kind, folder=folder,
                     map_value=self.hmap.get(name) if self.hmap else None)

    # requests ---------------------------------------------------------------------------
    def check_request(self, method: str, *, calib=None, distill_steps=0, teacher=None, on_step=None,
                      exact=False) -> None:
        """What a model with offloaded weights cannot do, refused before any work
        (the restrictions of ``offload="disk"``, which streams the same way)."""
        if not self.offloaded_any:
            return
        from .offload import SUPPORTED

        what = "this model has weights offloaded by its device map (to CPU memory or disk)"
        if method not in SUPPORTED:
            raise DeviceMapError(f"{what}; method {method!r} needs the weights of the whole model at once (gradients, "
                                 f"training, or every layer's weights together): dispatch the model without offload, "
                                 f"or use one of {', '.join(SUPPORTED)}")
        if distill_steps or teacher is not None:
            raise DeviceMapError(f"{what}; distillation trains the whole model against a teacher copy: "
                                 "not with offloaded weights")
        if exact:
            raise DeviceMapError(f"{what}; exact=True is not supported with offloaded weights yet")
        if on_step is not None:
            raise DeviceMapError(f"{what}; on_step is not supported with offloaded weights (its snapshots copy the "
                                 "whole model)")
        if calib is None:
            raise DeviceMapError(f"{what}; give calibration data (calib=): the default samples text from the model "
                                 "and keys its cache by all its weights")

    # the run ----------------------------------------------------------------------------
    def _keep(self, module: nn.Module) -> bool:
        """Modules the store leaves alone: layers with their accelerate hooks
        (resident on their device) and the caller's resident layers."""
        return "_hf_hook" in module.__dict__ or any(module is o for i, o in enumerate(self.originals)
                                                    if not self.where[i].offloaded)

    def _parent(self):
        parent_path, _, list_name = self.family.layers.rpartition(".")
        return (self.model.get_submodule(parent_path) if parent_path else self.model), list_name

    def begin(self) -> None:
        """Hand the offloaded decoder layers to a LayerStore (their hooks set aside)."""
        todo = [i for i, w in enumerate(self.where) if w.offloaded]
        if not todo:
            return
        from pathlib import Path

        from .offload import DEFAULT_CAPACITY, LayerStore, _Modules

        store = LayerStore(Path("."), {}, torch.float32, self.home, DEFAULT_CAPACITY)
        store.keep = self._keep
        for i in todo:
            layer = self.originals[i]
            source = _LayerWeights(self.model, f"{self.prefix}{i}", layer)
            self._params[i] = dict(layer.named_parameters())
            # set aside as they are (remove_hook_from_module would load the offloaded weights into memory)
            self._hooks[i] = [(m, {k: m.__dict__.pop(k) for k in _HOOK_ATTRS if k in m.__dict__})
                              for m in layer.modules() if "_hf_hook" in m.__dict__]
            store.register(layer, source, device=self.where[i].device)
        parent, list_name = self._parent()
        layers = parent._modules[list_name]
        parent.__dict__["_modules"] = _Modules(parent._modules, store, list_name)
        parent._modules[list_name] = layers  # wrapped by the table itself
        self.model._come_fast_offload = store
        self.store = store

    def end(self, provenance: Optional[list] = None) -> None:
        """Give the offloaded original layers back their parameters and hooks;
        with ``provenance`` (a successful run) place the new layers and rewrite
        ``hf_device_map``."""
        from .merge import first_leaf
        from .offload import _set_param

        parent, list_name = self._parent()
        layers = list(parent._modules[list_name])  # the modules as they are (nothing materialised)
        whole = provenance is not None and len(provenance) == len(layers)

        def place(i, layer):
            src = first_leaf(provenance[i]) if whole else None
            self._place(layer, i, self.where[src] if isinstance(src, int) and 0 <= src < len(self.where) else None)

        placed = set()
        store = self.store
        if store is not None:
            try:
                for i, params in self._params.items():
                    layer = self.originals[i]
                    store.forget(layer)
                    with torch.no_grad():
                        for n, p in params.items():
                            _set_param(layer, n, p)
                    for m, attrs in self._hooks[i]:
                        m.__dict__.update(attrs)
                if provenance is not None:
                    for i, layer in enumerate(layers):
                        if layer in store.slots:  # a layer the run made: materialised, then placed (offloaded
                            store.ensure(layer)   # again where its source was), one at a time
                            store.forget(layer)
                            place(i, layer)
                            placed.add(i)
            finally:
                parent.__dict__["_modules"] = dict(parent._modules)
                parent._modules[list_name] = nn.ModuleList(layers)
                self.model.__dict__.pop("_come_fast_offload", None)
                store.close()
                self.store = None
        if provenance is None:
            return
        for i, layer in enumerate(layers):
            if i not in placed and not any(layer is o for o in self.originals):
                place(i, layer)
        self._rewrite_map(provenance if whole else None, layers)

    # after a successful run ---------------------------------------------------------------
    def _disk_folder(self, base: Optional[str]) -> str:
        if self._folder is None:
            self._folder = tempfile.mkdtemp(prefix="come_fast-layers-", dir=base)
            weakref.finalize(self.model, shutil.rmtree, self._folder, True)
        return self._folder

    def _place(self, layer: nn.Module, i: int, where: Optional[Where]) -> None:
        """Put new layer ``i`` where ``where`` says (None: where it is) with the
        hooks dispatch_model gives a layer there."""
        from accelerate.hooks import attach_align_device_hook_on_blocks, remove_hook_from_module

        name = f"{self.prefix}{i}"
        if where is None:
            dev = layer_device(layer) or self.home
            where = Where(device=dev, offloaded=False, kind=None, folder=None)
        if any("_hf_hook" in m.__dict__ for m in layer.modules()):
            remove_hook_from_module(layer, recurse=True)  # a copy's hooks (not offloading: nothing to load)
        # no tied_params_map: a decoder layer ties no weight to another module
        kw = dict(offload_buffers=self.offload_buffers, module_name=name, skip_keys=self.skip_keys)
        if not where.offloaded:
            layer.to(where.device)
            attach_align_device_hook_on_blocks(layer, execution_device={name: where.device}, offload={name: False},
                                               **kw)
            return
        from accelerate.utils import OffloadedWeightsLoader, offload_state_dict

        sd = {f"{name}.{k}": v.detach().to("cpu").contiguous() for k, v in layer.state_dict().items()}
        if where.kind == "disk":
            folder = self._disk_folder(where.folder)
            offload_state_dict(folder, sd)
            weights = OffloadedWeightsLoader(save_folder=folder)
        else:
            weights = OffloadedWeightsLoader(state_dict=sd)
        attach_align_device_hook_on_blocks(layer, execution_device={name: where.device}, offload={name: True},
                                           weights_map=weights, **kw)

    def _rewrite_map(self, provenance: Optional[list], layers: list) -> None:
        hmap = getattr(self.model, "hf_device_map", None)
        if not isinstance(hmap, dict) or not self.layer_keys:
            return
        from .merge import first_leaf

        def value(i, layer):
            if provenance is not None:
                src = first_leaf(provenance[i])
                if isinstance(src, int) and 0 <= src < len(self.where):
                    return self.where[src].map_value
            d = layer_device(layer) or self.home
            return d.index if d.type == "cuda" and d.index is not None else str(d)

        new, done = {}, False
        for k, v in hmap.items():
            if k.startswith(self.prefix) and k[len(self.prefix):].isdigit():
                if not done:
                    new.update({f"{self.prefix}{i}": value(i, layer) for i, layer in enumerate(layers)})
                    done = True
                continue
            new[k] = v
        self.model.hf_device_map = new
