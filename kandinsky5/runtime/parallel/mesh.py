"""The layout of the processes of a multi-GPU run: how many shard the sequence (Ulysses), how many split the
guidance branches (CFG parallel), and the process groups of each.

``world_size = ulysses_degree x cfg_degree``. The ranks form a ``(cfg, ulysses)`` grid, Ulysses innermost: the
ranks of one Ulysses group are consecutive (``cfg_rank * ulysses_degree + ulysses_rank``), so on a multi-GPU node the
all-to-alls, the heaviest traffic, stay between neighbouring devices; each CFG group pairs the ranks that hold the
same sequence shard of the two branches.

A :class:`ParallelMesh` is built from the default process group (``torch.distributed.init_process_group`` first;
``torchrun`` provides the environment) with :func:`torch.distributed.device_mesh.init_device_mesh`, which works for
gloo on a CPU as for NCCL on GPUs. Whoever runs in parallel holds its mesh (the pipeline: ``pipe._parallel``); code
deeper down asks :func:`current_mesh`, which is set only for the duration of a call (:func:`use_mesh`), so nothing
global outlives a generation.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.distributed as dist

# The mesh's dimension names, outermost first.
CFG_DIM = "cfg"
ULYSSES_DIM = "ulysses"
# CFG parallel splits the two guidance branches (condition, negative prompt): a degree of 1 or 2.
CFG_DEGREES = (1, 2)


@dataclass(frozen=True)
class ParallelConfig:
    """How a run is split: ``ulysses_degree`` ranks shard each branch's token sequence, ``cfg_degree`` (1 or 2)
    ranks split the guidance branches. Their product must be the world size (:meth:`check`)."""

    ulysses_degree: int
    cfg_degree: int

    def __post_init__(self):
        for name in ("ulysses_degree", "cfg_degree"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.cfg_degree not in CFG_DEGREES:
            raise ValueError(
                f"cfg_degree must be 1 or 2 (the two guidance branches), got {self.cfg_degree}; shard the rest "
                "with ulysses_degree"
            )

    @property
    def world_size(self) -> int:
        return self.ulysses_degree * self.cfg_degree

    @property
    def is_single(self) -> bool:
        """Degree 1 everywhere: the single-process path, no exchange at all."""
        return self.world_size == 1

    def check(self, world_size: int) -> None:
        """ValueError (one line naming both parameters) unless ``ulysses_degree x cfg_degree == world_size``."""
        if self.world_size != world_size:
            raise ValueError(
                f"ulysses_degree ({self.ulysses_degree}) x cfg_degree ({self.cfg_degree}) = {self.world_size} must "
                f"equal the world size ({world_size} processes)"
            )

    @classmethod
    def default_for(cls, world_size: int, guidance: bool) -> ParallelConfig:
        """CFG 2 when guidance is on and the world size is even, the rest Ulysses."""
        if world_size < 1:
            raise ValueError(f"world size must be positive, got {world_size}")
        cfg = 2 if guidance and world_size % 2 == 0 else 1
        return cls(world_size // cfg, cfg)

    @classmethod
    def resolve(
        cls,
        world_size: int,
        ulysses_degree: int | None = None,
        cfg_degree: int | None = None,
        guidance: bool = True,
    ) -> ParallelConfig:
        """The configuration for ``world_size`` processes: degrees left as ``None`` are derived from the given one
        and the world size (both ``None``: :meth:`default_for`). Checked against ``world_size``."""
        if ulysses_degree is None and cfg_degree is None:
            config = cls.default_for(world_size, guidance)
        elif cfg_degree is None:
            if isinstance(ulysses_degree, int) and ulysses_degree > 0 and world_size % ulysses_degree:
                raise ValueError(
                    f"ulysses_degree ({ulysses_degree}) must divide the world size ({world_size} processes)"
                )
            config = cls(ulysses_degree, world_size // ulysses_degree)
        elif ulysses_degree is None:
            if isinstance(cfg_degree, int) and cfg_degree > 0 and world_size % cfg_degree:
                raise ValueError(f"cfg_degree ({cfg_degree}) must divide the world size ({world_size} processes)")
            config = cls(world_size // cfg_degree, cfg_degree)
        else:
            config = cls(ulysses_degree, cfg_degree)
        config.check(world_size)
        return config


def _default_device() -> torch.device:
    """This rank's device: its GPU (``LOCAL_RANK``, else the global rank modulo the GPU count) when the default
    process group runs on NCCL, else the CPU (gloo)."""
    if dist.get_backend() == "nccl" and torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank() % torch.cuda.device_count()))
        return torch.device("cuda", local)
    return torch.device("cpu")


@dataclass(frozen=True, eq=False)
class ParallelMesh:
    """The process groups of a parallel run (built by :meth:`build`; every rank must build it, in the same order,
    since creating groups is collective).

    ``world``: the default process group; ``rank``/``world_size``: this process's place in it. ``ulysses_group``:
    the ranks that shard this rank's branch's tokens, ``ulysses_rank`` this rank's shard index among them.
    ``cfg_group``: the ranks that hold the same shard of the other branch, ``cfg_rank`` (0: the condition, 1: the
    negative prompt). ``device``: where this rank computes. ``device_mesh``: the ``(cfg, ulysses)`` DeviceMesh
    (for FSDP and DTensor users).
    """

    config: ParallelConfig
    device_mesh: object  # torch.distributed.device_mesh.DeviceMesh
    world: dist.ProcessGroup
    rank: int
    world_size: int
    ulysses_group: dist.ProcessGroup
    ulysses_rank: int
    cfg_group: dist.ProcessGroup
    cfg_rank: int
    device: torch.device

    @property
    def ulysses_degree(self) -> int:
        return self.config.ulysses_degree

    @property
    def cfg_degree(self) -> int:
        return self.config.cfg_degree

    @property
    def is_main(self) -> bool:
        """Global rank 0: the one that writes files and prints."""
        return self.rank == 0

    @classmethod
    def build(
        cls,
        config: ParallelConfig | None = None,
        *,
        guidance: bool = True,
        device: torch.device | str | None = None,
    ) -> ParallelMesh:
        """The mesh of ``config`` (default: :meth:`ParallelConfig.default_for` the world size) over the default
        process group. RuntimeError when ``torch.distributed`` is not initialised; ValueError when the degrees do
        not multiply to the world size."""
        require_distributed()
        world_size = dist.get_world_size()
        config = config or ParallelConfig.default_for(world_size, guidance)
        config.check(world_size)
        device = torch.device(device) if device is not None else _default_device()
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(
            device.type, (config.cfg_degree, config.ulysses_degree), mesh_dim_names=(CFG_DIM, ULYSSES_DIM)
        )
        ulysses_group, cfg_group = mesh.get_group(ULYSSES_DIM), mesh.get_group(CFG_DIM)
        return cls(
            config=config,
            device_mesh=mesh,
            world=dist.group.WORLD,
            rank=dist.get_rank(),
            world_size=world_size,
            ulysses_group=ulysses_group,
            ulysses_rank=dist.get_rank(ulysses_group),
            cfg_group=cfg_group,
            cfg_rank=dist.get_rank(cfg_group),
            device=device,
        )


def require_distributed() -> None:
    """RuntimeError (one line) unless the default process group exists."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "parallelism needs torch.distributed initialised first: call torch.distributed.init_process_group() "
            "(launch with torchrun, which sets RANK, WORLD_SIZE and MASTER_ADDR)"
        )


_CURRENT_MESH: ContextVar[ParallelMesh | None] = ContextVar("kandinsky5_parallel_mesh", default=None)


def current_mesh() -> ParallelMesh | None:
    """The mesh of the parallel call running in this thread, or ``None`` (a single-process call)."""
    return _CURRENT_MESH.get()


@contextlib.contextmanager
def use_mesh(mesh: ParallelMesh | None) -> Iterator[ParallelMesh | None]:
    """Make ``mesh`` the :func:`current_mesh` inside the block (``None``: no parallelism)."""
    token = _CURRENT_MESH.set(mesh)
    try:
        yield mesh
    finally:
        _CURRENT_MESH.reset(token)


def broadcast_from_main(
    mesh: ParallelMesh, tensors: list[torch.Tensor | None] | BaseException | None, device: torch.device | str
) -> list[torch.Tensor | None]:
    """Rank 0's ``tensors`` (a list; ``None`` entries allowed) on every rank, bit for bit, on ``device``.

    Rank 0 passes its list; the other ranks pass ``None`` (what they had is ignored). Shapes and dtypes go first
    (one small object broadcast), then each tensor's bytes (any dtype, bool and bfloat16 included, on gloo as on
    NCCL). Rank 0 may pass an exception instead of a list when it could not compute them: every rank then raises
    (rank 0 its own error, the others a RuntimeError naming it), so no rank waits forever.
    """
    failed = isinstance(tensors, BaseException)
    if mesh.is_main:
        header: list = [
            f"{type(tensors).__name__}: {tensors}"
            if failed
            else [None if t is None else (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for t in tensors]
        ]
    else:
        header = [None]
    dist.broadcast_object_list(header, src=0, group=mesh.world, device=mesh.device)
    if isinstance(header[0], str):
        if mesh.is_main:
            raise tensors
        raise RuntimeError(f"rank 0 failed, so this rank cannot go on: {header[0]}")
    out: list[torch.Tensor | None] = []
    for i, meta in enumerate(header[0]):
        if meta is None:
            out.append(None)
            continue
        shape, dtype = meta[0], getattr(torch, meta[1])
        if mesh.is_main:
            tensor = tensors[i].to(device).contiguous()
        else:
            tensor = torch.empty(shape, dtype=dtype, device=device)
        if tensor.numel():
            dist.broadcast(tensor.reshape(-1).view(torch.uint8), src=0, group=mesh.world)
        out.append(tensor)
    return out
