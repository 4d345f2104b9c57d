"""Fused attention projections: a transform of the DiT applied from outside the model file.

:func:`fuse_qkv_projections` merges each self-attention's query, key and value projections, and each
cross-attention's key and value projections, into one linear layer, so that one GEMM reads the input once (diffusers'
method name). The outputs equal the unfused model's up to the summation order of the matrix multiply.

The checkpoint layout does not change: while an attention layer is fused, ``state_dict()`` splits the fused tensors
back into the reference's ``to_query``/``to_key``/``to_value`` ones, and ``load_state_dict`` joins the reference's
tensors into the fused layer (so a fused ``meta`` model can receive a checkpoint by assignment, gpt-fast style). The
two hooks doing this are registered on the attention layer when it is fused, and removed when it is unfused.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from kandinsky5.models.dit import (
    FUSED_PROJECTION,
    KV_PROJECTIONS,
    QKV_PROJECTIONS,
    Attention,
    Kandinsky5Transformer3DModel,
    TextBlock,
    VisualBlock,
)

TENSOR_KINDS = ("weight", "bias")


class FusedProjection(nn.Linear):
    """A linear layer holding the concatenated projections of an attention layer.

    It owns the state-dict hooks that its fusion registered on the attention layer (``layout_hooks``), so that
    unfusing removes exactly those.
    """

    def __init__(self, in_features: int, out_features: int, device: torch.device | str | None = None):
        super().__init__(in_features, out_features, bias=True, device=device)
        self.layout_hooks: list[RemovableHandle] = []


def fuse_qkv_projections(model: Kandinsky5Transformer3DModel) -> Kandinsky5Transformer3DModel:
    """Fuse every attention of ``model`` in place (self-attention: query, key and value; cross-attention: key and
    value) and return it."""
    for module in model.modules():
        if isinstance(module, TextBlock | VisualBlock):
            fuse_projections(module.self_attention, QKV_PROJECTIONS)
        if isinstance(module, VisualBlock):
            fuse_projections(module.cross_attention, KV_PROJECTIONS)
    return model


def unfuse_qkv_projections(model: nn.Module) -> nn.Module:
    """Undo :func:`fuse_qkv_projections` in place and return ``model``."""
    for module in model.modules():
        if isinstance(module, Attention):
            unfuse_projections(module)
    return model


def fuse_projections(attention: Attention, names: tuple[str, ...]) -> None:
    """Merge the linear layers ``names`` (``QKV_PROJECTIONS`` or ``KV_PROJECTIONS``) of ``attention`` into its
    ``FUSED_PROJECTION`` layer, in place (the weights are concatenated; works on ``meta`` too)."""
    if names not in (QKV_PROJECTIONS, KV_PROJECTIONS):
        raise ValueError(f"can fuse {QKV_PROJECTIONS} or {KV_PROJECTIONS}, not {names}")
    if attention.fused:
        unfuse_projections(attention)
    layers = [getattr(attention, name) for name in names]
    first = layers[0]
    fused = FusedProjection(first.in_features, first.out_features * len(layers), device="meta")
    trainable = first.weight.requires_grad
    fused.weight = nn.Parameter(torch.cat([layer.weight for layer in layers]), requires_grad=trainable)
    fused.bias = nn.Parameter(torch.cat([layer.bias for layer in layers]), requires_grad=trainable)
    fused.layout_hooks = [
        attention.register_load_state_dict_pre_hook(join_fused_tensors),
        attention.register_state_dict_post_hook(split_fused_tensors),
    ]
    setattr(attention, FUSED_PROJECTION, fused)
    for name in names:
        setattr(attention, name, None)


def equal_rows(tensor: torch.Tensor, count: int) -> list[torch.Tensor]:
    """``tensor`` cut into ``count`` equal row slices (slicing, which torchao's low-bit tensors implement and
    ``chunk`` not always)."""
    rows = tensor.shape[0] // count
    return [tensor[i * rows : (i + 1) * rows] for i in range(count)]


def unfuse_projections(attention: Attention) -> None:
    """Undo :func:`fuse_projections`: separate linear layers holding copies of slices of the fused weights."""
    fused = getattr(attention, FUSED_PROJECTION)
    if fused is None:
        return
    names = attention.fused
    parts = zip(names, equal_rows(fused.weight, len(names)), equal_rows(fused.bias, len(names)), strict=True)
    for name, weight, bias in parts:
        layer = nn.Linear(weight.shape[1], weight.shape[0], device="meta")
        layer.weight = nn.Parameter(weight.clone(), requires_grad=weight.requires_grad)
        layer.bias = nn.Parameter(bias.clone(), requires_grad=bias.requires_grad)
        setattr(attention, name, layer)
    setattr(attention, FUSED_PROJECTION, None)
    for handle in getattr(fused, "layout_hooks", ()):
        handle.remove()


def join_fused_tensors(module: Attention, state_dict: dict, prefix: str, *_) -> None:
    """Load hook: the reference's separate projection tensors -> the fused layer's, when ``module`` is fused."""
    for kind in TENSOR_KINDS:
        names = [f"{prefix}{name}.{kind}" for name in module.fused]
        if names and all(name in state_dict for name in names):
            state_dict[f"{prefix}{FUSED_PROJECTION}.{kind}"] = torch.cat([state_dict.pop(name) for name in names])


def split_fused_tensors(module: Attention, state_dict: dict, prefix: str, _metadata) -> None:
    """``state_dict`` hook: the fused layer's tensors -> the reference's names (the checkpoint layout)."""
    for kind in TENSOR_KINDS:
        fused = state_dict.pop(f"{prefix}{FUSED_PROJECTION}.{kind}", None)
        if fused is not None:
            for name, part in zip(module.fused, equal_rows(fused, len(module.fused)), strict=True):
                state_dict[f"{prefix}{name}.{kind}"] = part
