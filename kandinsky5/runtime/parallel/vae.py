"""The VAE decode shared among the ranks of a parallel run: each decodes some of the tiles, all receive all of them.

A decode (:meth:`AutoencoderKLHunyuanVideo.decode_plan`) is a list of latent pieces, the frame-wise path's temporal
chunks and, when spatially tiled, each chunk's spatial tiles (121 frames at 512x768: 11 chunks; tiled, 6 tiles each),
and a join that blends them. Here piece ``k`` is decoded by rank ``k mod n`` (round-robin over the group), with the
very module call a single process makes on the very same latent view; then every piece goes to every rank (one
broadcast per piece from its owner, shapes exchanged first) and each rank joins them with the single-process join.
The result equals the single-process decode bit for bit: same pieces, same kernels, same blending order.

Ranks must agree on the plan, so whether to tile spatially (which the automatic policy decides from each GPU's free
memory) is agreed first: tiles when any rank needs them.

A decode of one piece (a short video, no tiles) gains nothing: its owner decodes it and the others wait for it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from kandinsky5.models.vae import DecoderOutput, TiledDecode

logger = logging.getLogger(__name__)


def process_group_of(mesh_or_group: Any = None) -> dist.ProcessGroup:
    """The process group a parallel decode spans: a :class:`~kandinsky5.runtime.parallel.mesh.ParallelMesh`'s whole
    world, a one-dimensional ``DeviceMesh``'s group, a ``ProcessGroup`` itself, or (``None``) the default group."""
    if mesh_or_group is None:
        return dist.group.WORLD
    if isinstance(mesh_or_group, dist.ProcessGroup):
        return mesh_or_group
    world = getattr(mesh_or_group, "world", None)
    if isinstance(world, dist.ProcessGroup):
        return world
    get_group = getattr(mesh_or_group, "get_group", None)
    if callable(get_group):
        return get_group()
    raise TypeError(f"expected a ParallelMesh, a DeviceMesh, a ProcessGroup or None, got {type(mesh_or_group)}")


def agree_on_tiling(vae, z: torch.Tensor, group: dist.ProcessGroup) -> bool:
    """Whether the decode of ``z`` tiles spatially on every rank: when it does on any (:meth:`tiling_needed` reads
    each rank's own free memory, and every rank must cut the same pieces)."""
    needed = torch.tensor([int(vae.tiling_needed(z))], device=z.device)
    dist.all_reduce(needed, op=dist.ReduceOp.MAX, group=group)
    return bool(needed.item())


def owner_of(piece: int, group_size: int) -> int:
    """The group rank that decodes piece ``piece`` (round-robin)."""
    return piece % group_size


def run_plan_parallel(vae, plan: TiledDecode, group: dist.ProcessGroup) -> torch.Tensor:
    """Decode ``plan``'s pieces round-robin over ``group``, give every rank all of them, join them (on every rank)."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    own = {k: vae._decode_tile(piece) for k, piece in enumerate(plan.inputs) if owner_of(k, size) == rank}
    # shapes and dtypes of every rank's pieces, so the receivers can allocate them
    meta = {k: (tuple(out.shape), out.dtype) for k, out in own.items()}
    gathered: list[dict | None] = [None] * size
    dist.all_gather_object(gathered, meta, group=group)
    everyone = {k: shape_dtype for part in gathered for k, shape_dtype in part.items()}
    device = plan.inputs[0].device
    outputs = []
    for k in range(len(plan.inputs)):
        owner = owner_of(k, size)
        if owner == rank:
            piece = own.pop(k).contiguous()  # collectives take dense tensors (a channels-last VAE gives others)
        else:
            shape, dtype = everyone[k]
            piece = torch.empty(shape, dtype=dtype, device=device)
        dist.broadcast(piece, src=dist.get_global_rank(group, owner), group=group)
        outputs.append(piece)
    return plan.join(iter(outputs))


def decode_parallel(vae, z: torch.Tensor, mesh_or_group: Any = None) -> torch.Tensor:
    """``vae.decode(z).sample`` with the tiles shared among the ranks of ``mesh_or_group`` (see the module's
    docstring); every rank of the group must call it with the same ``z``, and every rank gets the whole video.
    Outside a parallel run (``torch.distributed`` not initialised, or a group of one) it is ``vae.decode``."""
    if not dist.is_initialized():
        return vae.decode(z).sample
    group = process_group_of(mesh_or_group)
    if dist.get_world_size(group) == 1:
        return vae.decode(z).sample
    tiled = agree_on_tiling(vae, z, group)
    if tiled and not vae.use_tiling:
        logger.info("VAE: decoding %s in spatial tiles, as memory is short on some rank", tuple(z.shape))
    parts = z.split(1) if vae.use_slicing and z.shape[0] > 1 else [z]
    decoded = [run_plan_parallel(vae, vae.decode_plan(part, tiled), group) for part in parts]
    return torch.cat(decoded) if len(decoded) > 1 else decoded[0]


@dataclass(frozen=True)
class ParallelDecoder:
    """A VAE whose ``decode`` is :func:`decode_parallel` over ``group``: what the pipeline's own ``decode_latents``
    (:func:`kandinsky5.pipelines.output.decode_latents`) takes in place of the VAE."""

    vae: Any
    group: Any = None

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    @property
    def config(self):
        return self.vae.config

    def decode(self, z: torch.Tensor, return_dict: bool = True):
        decoded = decode_parallel(self.vae, z, self.group)
        return DecoderOutput(sample=decoded) if return_dict else (decoded,)


def decode_latents_parallel(vae, latents: torch.Tensor, mesh_or_group: Any = None) -> torch.Tensor:
    """The pipeline's ``decode_latents(vae, latents)`` (channels-last sampled latents -> video ``(batch, 3, frames,
    H, W)`` in [-1, 1]) with the VAE's tiles shared among the ranks of ``mesh_or_group`` (a ParallelMesh, a
    ProcessGroup, or ``None``: the default group). Equal to the single-process decode bit for bit; every rank of
    the group calls it with the same latents and gets the whole video."""
    from kandinsky5.pipelines.output import decode_latents

    return decode_latents(ParallelDecoder(vae, process_group_of(mesh_or_group)), latents)
