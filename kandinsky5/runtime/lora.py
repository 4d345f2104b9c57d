"""LoRA adapters: a transform of the DiT applied from outside the model file, as fusion.py and quantization.py are.

An adapter is a set of low-rank pairs, one per target linear layer (read and named by
:mod:`kandinsky5.loading.lora_formats`). Unfused, each target layer computes
``base(x) + up(down(x)) * scale`` per active adapter, in PEFT's order of operations, with
``scale = adapter weight * alpha / rank``. Fused, ``up @ down * scale`` is added into the layer's weight.

How the branch gets into the layer. A target ``nn.Linear`` keeps its identity, its parameters and its
``state_dict`` keys: its class is swapped for a subclass made from it and :class:`LoraLinear` (``LoraLinear``
itself for a plain ``nn.Linear``, ``LoraFusedProjection`` for fusion.py's layer), whose forward adds the branches,
and it gets a child ``lora_adapters`` (a ``ModuleDict`` of :class:`LoraBranch`, one per adapter) whose tensors are
*non-persistent buffers*. So:

- ``state_dict()`` / ``save_pretrained`` / ``load_state_dict`` see the reference layout and nothing else while LoRA
  is loaded unfused (fused, the weights hold the sum, as diffusers' do);
- the layer is still an ``nn.Linear`` (quantization picks it; fusion reads its ``weight``), and every hook or
  attribute others put on it (fusion's state-dict hooks on the attention layer, offload hooks) stays;
- the branch tensors are buffers of modules inside the block, so block streaming (runtime/block_offload.py,
  ``tensor_places``) streams them with the block, sequential offload copies them for :class:`LoraBranch`'s
  forward, and model offload moves them with the transformer;
- regional compilation (runtime/compile.py) compiles the blocks with the branch inside: Dynamo guards on the
  layer's class and on the active adapters and scales, so loading, switching or re-weighting adapters recompiles
  the blocks once; nothing is silently skipped.

Fused QKV (fusion.py): a LoRA for ``to_query`` / ``to_key`` / ``to_value`` lands on the fused layer as branches on
the corresponding row slices of its output. The adapters' tensors are kept (on the host, as read) by the
transformer's :class:`LoraState`, by reference layer name, so :func:`sync` rebuilds the branches on whatever
layers the model has now: after fusing or unfusing the projections, call ``sync(model)`` (the pipeline's
``fuse_qkv_projections`` does; the LoRA operations below also re-attach by themselves when they find the layers
changed).

Quantized weights (quantization.py): the base stays quantized; the branch is a separate pair in the compute dtype
(a layer whose weight is a float tensor keeps the branch in the weight's dtype: float32 islands stay float32).
Fusing into quantized weights is refused (it would re-quantize the sum; keep the LoRA unfused, or fuse it before
quantizing).

Fuse and unfuse are exact: before the first fuse, each fused-over weight (its rows, for a fused projection) is
copied to the host, and unfusing copies it back (``W + delta - delta`` is not ``W`` in floating point). Memory: a
host copy of every fused-over layer's weight (for a LoRA on all block linears, the blocks' weights once more in
host memory) until unfuse or unload. After ``unload`` of a fused adapter the weights keep the fused sum (diffusers'
"fuse, then unload" to bake a LoRA in) and the copies are freed.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kandinsky5.loading.lora_formats import LoraFile, LoraFormatError, LoraWeights
from kandinsky5.models.base import transform_owned
from kandinsky5.models.dit import FUSED_PROJECTION, Attention

logger = logging.getLogger(__name__)

# The model's attribute holding its LoraState (a plain object, not a module: no state_dict entry).
STATE_ATTRIBUTE = "_kandinsky5_lora"
# The child module of a target layer that holds its branches.
ADAPTERS_CHILD = "lora_adapters"
# Adapter names become module names (ModuleDict keys): no dots, not empty.
_ADAPTER_NAME = re.compile(r"^[^.]+$")


class LoraError(ValueError):
    """A LoRA operation that cannot be done as asked (unknown adapter, fusing into quantized weights, ...)."""


# ---------------------------------------------------------------------------------------------- the modules


class LoraBranch(nn.Module):
    """One adapter's low-rank branches on one linear layer: per row range of the layer's output (the whole output;
    or, on a fused projection, the rows of each projection the adapter targets) a ``down`` ``(rank, in)`` and
    ``up`` ``(rows, rank)`` pair, non-persistent buffers. ``scales``: the factor of each pair (set by
    :func:`apply_settings`)."""

    def __init__(self, rows: Sequence[tuple[int, int]], downs, ups, out_features: int):
        super().__init__()
        order = sorted(range(len(rows)), key=lambda i: rows[i][0])
        self.rows = tuple(rows[i] for i in order)
        self.out_features = out_features
        self.scales: tuple[float, ...] = (1.0,) * len(order)
        for position, i in enumerate(order):
            self.register_buffer(f"down_{position}", downs[i], persistent=False)
            self.register_buffer(f"up_{position}", ups[i], persistent=False)

    @property
    def whole(self) -> bool:
        """Whether one pair covers the layer's whole output."""
        return len(self.rows) == 1 and self.rows[0] == (0, self.out_features)

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out`` (the layer's output so far) plus the branches of input ``x``, in ``out``'s dtype."""
        dtype = out.dtype
        x = x.to(self.down_0.dtype)
        if self.whole:
            # PEFT's arithmetic: result + lora_B(lora_A(x)) * scaling
            return (out + F.linear(F.linear(x, self.down_0), self.up_0) * self.scales[0]).to(dtype)
        pieces, position = [], 0
        for i, (start, stop) in enumerate(self.rows):
            if start > position:
                pieces.append(out[..., position:start])
            branch = F.linear(F.linear(x, getattr(self, f"down_{i}")), getattr(self, f"up_{i}"))
            pieces.append(out[..., start:stop] + branch * self.scales[i])
            position = stop
        if position < out.shape[-1]:
            pieces.append(out[..., position:])
        return torch.cat(pieces, dim=-1).to(dtype)

    def extra_repr(self) -> str:
        return f"rows={list(self.rows)}, ranks={[getattr(self, f'down_{i}').shape[0] for i in range(len(self.rows))]}"


class LoraLinear(nn.Linear):
    """A linear layer with LoRA branches: its own output, then each active adapter's branch added.

    Never built directly: :func:`attach` swaps a target layer's class for this one (or a subclass of it and the
    layer's own class) and :func:`detach` swaps it back. ``lora_active``: the adapters whose branches run."""

    lora_active: tuple[str, ...] = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        adapters = getattr(self, ADAPTERS_CHILD)
        for name in self.lora_active:
            out = adapters[name](x, out)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lora_active={list(self.lora_active)}"


# base class -> its LoRA class, and back
_LORA_CLASSES: dict[type, type] = {nn.Linear: LoraLinear}
_BASE_CLASSES: dict[type, type] = {LoraLinear: nn.Linear}


def lora_class(base: type) -> type:
    """The LoRA class of a linear layer class: ``LoraLinear`` for ``nn.Linear``, else a subclass of
    ``LoraLinear`` and ``base`` (registered in this module under ``Lora<base name>``, so that it pickles)."""
    if base not in _LORA_CLASSES:
        name = f"Lora{base.__name__}"
        cls = type(name, (LoraLinear, base), {"__module__": __name__, "__qualname__": name})
        globals()[name] = cls
        _LORA_CLASSES[base] = cls
        _BASE_CLASSES[cls] = base
    return _LORA_CLASSES[base]


# ---------------------------------------------------------------------------------------------- the state


@dataclasses.dataclass
class Adapter:
    """A loaded adapter: its layers by reference name (host tensors as read), trigger words, origin."""

    name: str
    layers: dict[str, LoraWeights]
    trigger: str | None = None
    source: str = ""
    format: str = ""


@dataclasses.dataclass
class LoraState:
    """Every adapter of a transformer and how they are used; kept on the model (``STATE_ATTRIBUTE``).

    ``active``: the adapters set by ``set_adapters`` (the last loaded one after a load, as diffusers does);
    ``weights``: each adapter's weight; ``enabled``: ``disable_lora`` turns every branch off; ``merged``: the
    adapters fused into the weights, with the weight they were fused at; ``originals``: the fused-over weights
    (rows) before the first fuse, on the host, by reference layer name; ``attached``: the layers whose class
    :func:`attach` swapped."""

    adapters: dict[str, Adapter] = dataclasses.field(default_factory=dict)
    active: list[str] = dataclasses.field(default_factory=list)
    weights: dict[str, float] = dataclasses.field(default_factory=dict)
    enabled: bool = True
    merged: dict[str, float] = dataclasses.field(default_factory=dict)
    originals: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    attached: list[nn.Module] = dataclasses.field(default_factory=list)


def lora_state(model: nn.Module) -> LoraState | None:
    """The model's LoRA state, or ``None`` when no adapter was ever loaded (or all were unloaded)."""
    return getattr(model, STATE_ATTRIBUTE, None)


def require_state(model: nn.Module) -> LoraState:
    """The model's LoRA state; a ``LoraError`` when no adapter is loaded."""
    state = lora_state(model)
    if state is None or not state.adapters:
        raise LoraError("no LoRA adapter is loaded (load one with load_lora_weights)")
    return state


# ---------------------------------------------------------------------------------------------- layers


def reference_linear_names(model: nn.Module) -> list[str]:
    """The names of the model's linear layers in the reference layout: a fused projection counts as the
    ``to_query``/``to_key``/``to_value`` layers it holds."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, Attention) and module.fused:
            names += [f"{name}.{projection}" for projection in module.fused]
        elif isinstance(module, nn.Linear) and not name.endswith(f".{FUSED_PROJECTION}"):
            names.append(name)
    return names


def resolve_layer(model: nn.Module, name: str) -> tuple[nn.Linear, tuple[int, int]] | None:
    """The layer that computes reference layer ``name`` now and the rows of its output that are ``name``'s: the
    layer itself and all rows, or a fused projection and its slice; ``None`` when there is none."""
    parent_name, _, leaf = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
    except AttributeError:
        return None
    if isinstance(parent, Attention) and leaf in parent.fused:
        fused = getattr(parent, FUSED_PROJECTION)
        rows = fused.out_features // len(parent.fused)
        index = parent.fused.index(leaf)
        return fused, (index * rows, (index + 1) * rows)
    module = parent._modules.get(leaf) if leaf else None
    if isinstance(module, nn.Linear):
        return module, (0, module.out_features)
    return None


def _is_quantized(weight: torch.Tensor) -> bool:
    return transform_owned(weight) or not weight.is_floating_point()


def branch_dtype(model: nn.Module, layer: nn.Linear) -> torch.dtype:
    """The dtype a layer's branches compute in: its weight's when that is a float tensor, else the model's compute
    dtype (a quantized weight)."""
    weight = layer.weight
    if _is_quantized(weight):
        return getattr(model, "dtype", torch.get_default_dtype())
    return weight.dtype


def check_adapter(model: nn.Module, adapter: LoraFile | Adapter) -> None:
    """Every layer of ``adapter`` names a linear layer of ``model`` with its shapes; a ``LoraFormatError`` naming
    the file's key otherwise."""
    source = getattr(adapter, "source", "the LoRA")
    for name, weights in adapter.layers.items():
        found = resolve_layer(model, name)
        if found is None:
            raise LoraFormatError(f"{source}: {weights.key!r} matches no linear layer of the transformer ({name!r})")
        layer, (start, stop) = found
        if weights.down.shape[1] != layer.in_features or weights.up.shape[0] != stop - start:
            raise LoraFormatError(
                f"{source}: {weights.key!r} does not fit layer {name!r}: the LoRA maps {weights.down.shape[1]} to "
                f"{weights.up.shape[0]} features, the layer {layer.in_features} to {stop - start}"
            )


# ---------------------------------------------------------------------------------------------- attach / detach


def attach(model: nn.Module, state: LoraState) -> None:
    """Build the branches of every adapter of ``state`` on the layers that compute them now (the previous ones
    removed first) and apply the settings. Idempotent."""
    detach(model, state)
    per_layer: dict[int, tuple[nn.Linear, dict[str, list]]] = {}
    for adapter in state.adapters.values():
        for name, weights in adapter.layers.items():
            found = resolve_layer(model, name)
            if found is None:
                raise LoraFormatError(f"{adapter.source}: {weights.key!r} matches no linear layer ({name!r})")
            layer, rows = found
            per_layer.setdefault(id(layer), (layer, {}))[1].setdefault(adapter.name, []).append((rows, weights))
    for layer, adapters in per_layer.values():
        dtype, device = branch_dtype(model, layer), layer.weight.device
        branches = nn.ModuleDict()
        for adapter_name, pairs in adapters.items():
            rows = [r for r, _ in pairs]
            downs = [w.down.to(device=device, dtype=dtype) for _, w in pairs]
            ups = [w.up.to(device=device, dtype=dtype) for _, w in pairs]
            branches[adapter_name] = LoraBranch(rows, downs, ups, layer.out_features)
        layer.__class__ = lora_class(type(layer))
        layer.add_module(ADAPTERS_CHILD, branches)
        state.attached.append(layer)
    apply_settings(model, state)


def detach(model: nn.Module, state: LoraState) -> None:
    """Remove every branch (the layers get their own class back; their weights are untouched)."""
    for layer in state.attached:
        if isinstance(layer, LoraLinear):
            del layer._modules[ADAPTERS_CHILD]
            layer.__dict__.pop("lora_active", None)
            layer.__class__ = _BASE_CLASSES[type(layer)]
    state.attached = []


def sync(model: nn.Module) -> None:
    """Rebuild the branches on the layers the model has now, in the dtype they take now (after fusing or unfusing
    its projections, after a cast: ``to_dtype`` casts parameters only). Nothing when no LoRA is loaded. Fused-in
    adapters stay in the weights; their host copies are by reference layer name, so unfusing them later still
    restores exactly."""
    state = lora_state(model)
    if state is not None and state.adapters:
        attach(model, state)


def attached_to_current_layers(model: nn.Module, state: LoraState) -> bool:
    """Whether every adapter layer resolves to a layer that holds its branch, in the dtype it would get now (false
    after the projections were fused or unfused, or the model cast, behind the LoRA's back)."""
    attached = {id(layer) for layer in state.attached}
    for adapter in state.adapters.values():
        for name in adapter.layers:
            found = resolve_layer(model, name)
            if found is None or id(found[0]) not in attached or adapter.name not in found[0].lora_adapters:
                return False
    for layer in state.attached:
        for branch in getattr(layer, ADAPTERS_CHILD).values():
            if branch.down_0.dtype != branch_dtype(model, layer):
                return False  # the model was cast since
    return True


def ensure_attached(model: nn.Module, state: LoraState) -> None:
    """:func:`attach` again when the model's layers changed since (see :func:`attached_to_current_layers`)."""
    if not attached_to_current_layers(model, state):
        attach(model, state)


def apply_settings(model: nn.Module, state: LoraState) -> None:
    """Set each layer's running adapters (active, enabled, not fused in) and each branch's scales."""
    running = [n for n in state.active if state.enabled and n not in state.merged]
    for layer in state.attached:
        branches = getattr(layer, ADAPTERS_CHILD)
        layer.lora_active = tuple(n for n in running if n in branches)
    for adapter in state.adapters.values():
        weight = state.weights.get(adapter.name, 1.0)
        by_layer: dict[int, list[tuple[tuple[int, int], float]]] = {}
        for name, weights in adapter.layers.items():
            layer, rows = resolve_layer(model, name)
            by_layer.setdefault(id(layer), []).append((rows, weights.scaling(weight)))
        for layer in state.attached:
            entries = by_layer.get(id(layer))
            if entries is not None:
                branch = getattr(layer, ADAPTERS_CHILD)[adapter.name]
                scale_of = dict(entries)
                branch.scales = tuple(scale_of[rows] for rows in branch.rows)


# ---------------------------------------------------------------------------------------------- operations


def check_adapter_name(name: str, state: LoraState | None) -> None:
    if not isinstance(name, str) or not _ADAPTER_NAME.match(name):
        raise LoraError(f"adapter_name must be a non-empty string without dots, got {name!r}")
    if state is not None and name in state.adapters:
        raise LoraError(f"an adapter named {name!r} is loaded already; pass another adapter_name (or delete it)")


def default_adapter_name(model: nn.Module) -> str:
    """diffusers' default: ``default_<number of adapters loaded>``."""
    state = lora_state(model)
    count = 0 if state is None else len(state.adapters)
    name = f"default_{count}"
    while state is not None and name in state.adapters:
        count += 1
        name = f"default_{count}"
    return name


def add_adapter(model: nn.Module, name: str, lora: LoraFile) -> Adapter:
    """Add a converted LoRA as adapter ``name``, checked against the model first; it becomes the only active
    adapter (diffusers' behaviour after a load), weight 1."""
    state = lora_state(model)
    check_adapter_name(name, state)
    check_adapter(model, lora)
    if state is None:
        state = LoraState()
        setattr(model, STATE_ATTRIBUTE, state)
    adapter = Adapter(name, dict(lora.layers), lora.trigger, lora.source, lora.format)
    state.adapters[name] = adapter
    state.weights[name] = 1.0
    state.active = [name]
    attach(model, state)
    return adapter


def set_adapters(model: nn.Module, names: Sequence[str], weights: Sequence[float]) -> None:
    state = require_state(model)
    _check_known(state, names)
    ensure_attached(model, state)
    if len(set(names)) != len(names):
        raise LoraError(f"adapter names repeat: {list(names)}")
    state.active = list(names)
    for name, weight in zip(names, weights, strict=True):
        state.weights[name] = float(weight)
    apply_settings(model, state)


def set_enabled(model: nn.Module, enabled: bool) -> None:
    """``disable_lora`` / ``enable_lora``. Disabling also unfuses fused adapters (exactly), as PEFT does."""
    state = require_state(model)
    ensure_attached(model, state)
    if not enabled and state.merged:
        unfuse(model)
    state.enabled = enabled
    apply_settings(model, state)


def delete_adapters(model: nn.Module, names: Iterable[str]) -> None:
    state = require_state(model)
    names = list(names)
    _check_known(state, names)
    fused = [n for n in names if n in state.merged]
    if fused:
        raise LoraError(f"adapter(s) {fused} are fused into the weights: call unfuse_lora() before deleting them")
    for name in names:
        del state.adapters[name]
        state.weights.pop(name, None)
        if name in state.active:
            state.active.remove(name)
    if state.adapters:
        attach(model, state)
    else:
        unload(model)


def unload(model: nn.Module) -> None:
    """Remove every adapter. Unfused ones leave the weights untouched (the base output, bit for bit); fused ones
    stay in the weights (diffusers' fuse-then-unload), their host copies freed."""
    state = lora_state(model)
    if state is None:
        return
    detach(model, state)
    delattr(model, STATE_ATTRIBUTE)


def fuse(model: nn.Module, lora_scale: float = 1.0, adapter_names: Sequence[str] | None = None, safe: bool = False):
    """Add ``up @ down * scale * lora_scale`` of each adapter (``adapter_names``, default the active ones; those
    fused already are skipped) into its layers' weights; their branches stop running. Every layer is checked (not
    quantized; with ``safe``, the sums finite) before any weight changes."""
    state = require_state(model)
    names = list(state.active if adapter_names is None else adapter_names)
    _check_known(state, names)
    ensure_attached(model, state)
    names = [n for n in names if n not in state.merged]
    plan = []
    for name in names:
        adapter = state.adapters[name]
        weight = state.weights.get(name, 1.0) * lora_scale
        for layer_name, weights in adapter.layers.items():
            layer, rows = resolve_layer(model, layer_name)
            if _is_quantized(layer.weight):
                raise LoraError(
                    f"cannot fuse adapter {name!r} into {layer_name!r}: its weights are quantized "
                    f"({type(layer.weight).__name__}); keep the LoRA unfused (its branch runs beside the quantized "
                    "weights) or fuse it before quantizing"
                )
            plan.append((name, layer_name, layer, rows, weights, weights.scaling(weight)))
    sums: dict[tuple[int, tuple[int, int]], torch.Tensor] = {}
    for _, _, layer, (start, stop), weights, scale in plan:
        key = (id(layer), (start, stop))
        current = sums.get(key)
        if current is None:
            current = layer.weight.detach()[start:stop]
        sums[key] = _fused_weight(current, weights, scale)
    if safe:
        for total in sums.values():
            if not torch.isfinite(total).all():
                raise LoraError("fuse_lora(safe_fusing=True): the fused weights would hold NaN or inf; nothing fused")
    with torch.no_grad():
        for _, layer_name, layer, (start, stop), _, _ in plan:
            if layer_name not in state.originals:
                state.originals[layer_name] = layer.weight.detach()[start:stop].to("cpu", copy=True)
        written = set()
        for _, _, layer, (start, stop), _, _ in plan:
            key = (id(layer), (start, stop))
            if key not in written:
                layer.weight.data[start:stop].copy_(sums[key])
                written.add(key)
    for name in names:
        state.merged[name] = state.weights.get(name, 1.0) * lora_scale
    apply_settings(model, state)


def _fused_weight(current: torch.Tensor, weights: LoraWeights, scale: float) -> torch.Tensor:
    """``current + (up @ down) * scale``: PEFT's delta (``get_delta_weight``), computed in float32 (half-precision
    factors included) and added in float32, rounded once to the weight's dtype."""
    up = weights.up.to(device=current.device, dtype=torch.float32)
    down = weights.down.to(device=current.device, dtype=torch.float32)
    delta = (up @ down) * scale
    if current.dtype == torch.float32:
        return current + delta
    return (current.float() + delta).to(current.dtype)


def unfuse(model: nn.Module) -> None:
    """Copy the fused-over weights back (exact) and let the adapters' branches run again."""
    state = lora_state(model)
    if state is None or not state.merged:
        return
    ensure_attached(model, state)
    with torch.no_grad():
        for layer_name, original in state.originals.items():
            layer, (start, stop) = resolve_layer(model, layer_name)
            layer.weight.data[start:stop].copy_(original.to(layer.weight.device))
    state.originals.clear()
    state.merged.clear()
    apply_settings(model, state)


def _check_known(state: LoraState, names: Iterable[str]) -> None:
    missing = [n for n in names if n not in state.adapters]
    if missing:
        raise LoraError(f"adapter(s) {missing} are not loaded; loaded: {list(state.adapters)}")


def effective_delta(model: nn.Module, adapter_name: str, layer_name: str, weight: float = 1.0) -> torch.Tensor:
    """``up @ down * scale`` of an adapter on a reference layer, in float32 (what fusing adds; for tests and
    inspection)."""
    state = require_state(model)
    _check_known(state, [adapter_name])
    weights = state.adapters[adapter_name].layers[layer_name]
    return (weights.up.float() @ weights.down.float()) * weights.scaling(weight)
