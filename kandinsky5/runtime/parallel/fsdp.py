"""Sharded transformer weights: each rank keeps ``1/n`` of every repeated block's weights (FSDP2, inference only).

:func:`shard_transformer` applies ``torch.distributed.fsdp.fully_shard`` to each ``TextBlock`` and ``VisualBlock``
of the DiT over the whole world (a one-dimensional device mesh of every rank), with ``reshard_after_forward=True``:
a block's weights are all-gathered just before its forward and freed right after, so a rank holds its shards plus
about one block in full (two with prefetching, below). The rest of the DiT (embeddings, time embedding, output head:
a few percent of the weights) stays whole on every rank.

- Inference only: the parameters stop requiring gradients (FSDP2 checks that trainable parameters of one block share
  a dtype; the blocks' float32 modulation sits beside bfloat16 linear layers) and no backward hook ever runs.
- The float32 islands stay float32: no ``MixedPrecisionPolicy`` cast (``param_dtype=None``), so every parameter is
  gathered in the dtype it is stored in (blocks of mixed dtypes gather as bytes) and the forward computes on the
  very tensors a single process holds: sharding changes no number.
- Composes with Ulysses and CFG parallel: those split the activations (the stage wrapper, the guidance), this the
  weights; every rank calls every block in the same order, which is all FSDP's collectives need. A step cache that
  lets ranks skip different calls (MagCache with CFG parallel, where each rank decides for its own branch) would
  break that order: :func:`check_no_divergent_cache` refuses it.
- Forward prefetch: each block asks FSDP to start gathering the next block of its list while it computes, so on a
  GPU the all-gather overlaps the compute.

Order: apply layer transforms (fused projections, quantization) and choose the device before sharding; compile
after. The DiT may still be on the CPU: FSDP moves each block's shard to the mesh's device, so the whole model is
never on one GPU.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

# The DiT's repeated blocks, as its ``_repeated_blocks`` names them: what is sharded.
SHARDED_BLOCK_LISTS = ("text_transformer_blocks", "visual_transformer_blocks")


def world_device_mesh(mesh: Any = None, device: torch.device | str | None = None):
    """A one-dimensional ``DeviceMesh`` over every rank of ``mesh`` (a
    :class:`~kandinsky5.runtime.parallel.mesh.ParallelMesh`: its world and device; a ``ProcessGroup``; a
    ``DeviceMesh``, flattened; ``None``: the default group), on ``device`` (default: the mesh's, else the CPU for
    gloo and the current GPU for NCCL)."""
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(mesh, DeviceMesh):
        return mesh if mesh.ndim == 1 else mesh._flatten()
    group = getattr(mesh, "world", mesh) if mesh is not None else dist.group.WORLD
    if device is None:
        device = getattr(mesh, "device", None)
    if device is None:
        device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
    return DeviceMesh.from_group(group, torch.device(device).type)


def sharded_blocks(transformer: nn.Module) -> list[list[nn.Module]]:
    """The DiT's repeated blocks, one list per kind (text, visual), as :func:`shard_transformer` shards them."""
    return [list(getattr(transformer, name)) for name in SHARDED_BLOCK_LISTS]


def is_sharded(transformer: nn.Module) -> bool:
    """Whether :func:`shard_transformer` sharded ``transformer``."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(block, FSDPModule) for blocks in sharded_blocks(transformer) for block in blocks)


def check_no_divergent_cache(transformer: nn.Module, mesh: Any) -> None:
    """ValueError when a step cache is on and the ranks split the guidance branches: each rank's cache would decide
    for its own branch and skip other blocks than its peers, while every block's weights are gathered by all."""
    cfg_degree = getattr(getattr(mesh, "config", None), "cfg_degree", 1)
    if getattr(transformer, "cache", None) is not None and cfg_degree > 1:
        raise ValueError(
            "sharded weights and a step cache (MagCache) do not mix with cfg_degree 2: each rank's cache skips "
            "blocks for its own branch, and every block's weights are gathered by all ranks; use cfg_degree 1"
        )


def shard_transformer(
    transformer: nn.Module,
    mesh: Any = None,
    *,
    reshard_after_forward: bool = True,
    prefetch: bool = True,
) -> None:
    """Shard the DiT's text and visual blocks over every rank of ``mesh`` with FSDP2, in place (see the module's
    docstring). ``mesh``: the run's :class:`~kandinsky5.runtime.parallel.mesh.ParallelMesh` (its world and device),
    a ``ProcessGroup`` or ``DeviceMesh``, or ``None`` (the default group). Every rank must call it, on the same
    model. The non-block weights are moved to the mesh's device; each block's shard goes there too.

    ``reshard_after_forward``: free each block's gathered weights after its forward (the point of sharding; False
    keeps them gathered after the first call, FSDP's "ZeRO-2"); ``prefetch``: gather the next block during a
    block's forward. ValueError when already sharded, or when a step cache would make the ranks diverge
    (:func:`check_no_divergent_cache`)."""
    from torch.distributed.fsdp import fully_shard

    if is_sharded(transformer):
        raise ValueError("the transformer's blocks are sharded already")
    check_no_divergent_cache(transformer, mesh)
    device_mesh = world_device_mesh(mesh)
    device = torch.device(getattr(mesh, "device", None) or device_mesh.device_type)
    transformer.requires_grad_(False)  # inference only; see the module's docstring
    # the small rest of the model, whole on every rank, on the device
    block_lists = set(SHARDED_BLOCK_LISTS)
    whole = set()
    for name, child in transformer.named_children():
        if name not in block_lists:
            child.to(device)
            whole.update(child.parameters())
    for blocks in sharded_blocks(transformer):
        for block in blocks:
            fully_shard(block, mesh=device_mesh, reshard_after_forward=reshard_after_forward)
        if prefetch:
            for block, following in zip(blocks, blocks[1:], strict=False):
                block.set_modules_to_forward_prefetch([following])
    # the root of the blocks' FSDP states (it initialises them together at the first forward, which prefetching
    # needs), owning no weight: the rest of the model stays whole
    fully_shard(transformer, mesh=device_mesh, reshard_after_forward=False, ignored_params=whole)


def sharded_bytes(transformer: nn.Module) -> tuple[int, int]:
    """(bytes of the block weights this rank holds, bytes of the block weights in full): ``1/n`` of them, up to
    FSDP's padding of each tensor to a multiple of ``n`` rows."""
    from torch.distributed.tensor import DTensor

    local = full = 0
    for blocks in sharded_blocks(transformer):
        for block in blocks:
            for param in block.parameters():
                tensor = param.to_local() if isinstance(param, DTensor) else param
                local += tensor.numel() * tensor.element_size()
                full += param.numel() * param.element_size()
    return local, full
