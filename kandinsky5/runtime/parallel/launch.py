"""Starting a parallel run from the environment a launcher (``torchrun``) sets: which process this is, its device,
and the default process group.

``torchrun --nproc-per-node N -m kandinsky5 generate ...`` starts ``N`` copies of the command with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set (several machines: the same command on each
with ``--nnodes``, ``--node-rank`` and a rendezvous endpoint). :func:`launch_from_environ` reads them (``None``
outside such a launch: ``WORLD_SIZE`` unset or 1); :func:`rank_device` gives each process its device (GPU
``LOCAL_RANK``, or the CPU); :func:`init_distributed` joins the default process group (NCCL on GPUs, gloo on CPUs)
with a timeout, the bound on how long a collective waits for a rank that never comes (see :mod:`.failure` for how a
failing rank stops the others sooner).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# How long a collective may wait for the other ranks (seconds): the environment variable, else the default. Loading
# is the longest stretch between two collectives (ranks load the checkpoint side by side, at their disks' speed),
# so the default is torch's own for gloo, 30 minutes; failures do not wait for it (see failure.py).
TIMEOUT_ENV = "KANDINSKY5_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class Launch:
    """This process's place in a launch: global ``rank`` of ``world_size``, ``local_rank`` on its machine."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and prints."""
        return self.rank == 0


def _int_variable(environ: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = environ.get(name)
    if value is None:
        if default is None:
            raise ValueError(f"{name} is not set (launch with torchrun, which sets RANK, WORLD_SIZE and LOCAL_RANK)")
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def launch_from_environ(environ: Mapping[str, str] | None = None) -> Launch | None:
    """The launch this process belongs to, from ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; ``None`` when
    ``WORLD_SIZE`` is unset or 1 (a single process). ValueError on inconsistent values."""
    environ = os.environ if environ is None else environ
    world_size = _int_variable(environ, "WORLD_SIZE", 1)
    if world_size <= 1:
        return None
    rank = _int_variable(environ, "RANK")
    local_rank = _int_variable(environ, "LOCAL_RANK", rank)
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK ({rank}) must lie within 0..{world_size - 1} (WORLD_SIZE {world_size})")
    if local_rank < 0:
        raise ValueError(f"LOCAL_RANK must be >= 0, got {local_rank}")
    return Launch(rank, world_size, local_rank)


def rank_device(launch: Launch, asked: str = "auto") -> torch.device:
    """This process's device for the ``--device`` value ``asked``: ``auto`` (a GPU when there is one, else the CPU)
    and ``cuda`` mean GPU ``LOCAL_RANK``; ``cpu`` the CPU. A fixed GPU (``cuda:N``) is refused: every process would
    take the same one. ValueError (one line) when the device cannot be had."""
    if asked not in ("auto", "cpu", "cuda"):
        raise ValueError(
            f"--device {asked}: under torchrun each process takes GPU LOCAL_RANK; pass --device cuda (or cpu, or auto)"
        )
    if asked == "cpu" or (asked == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but no CUDA GPU is available")
    count = torch.cuda.device_count()
    if launch.local_rank >= count:
        raise ValueError(
            f"process {launch.rank} has LOCAL_RANK {launch.local_rank}, but this machine has {count} GPU(s): start "
            f"at most {count} processes per machine (--nproc-per-node)"
        )
    return torch.device("cuda", launch.local_rank)


def backend_for(asked: str) -> str:
    """The process group's backend for the ``--device`` value ``asked``: NCCL when the processes take GPUs, else
    gloo. Decided from the option and the machine alone, so that every rank picks the same one even when some
    failed to get their device (they then stop together, see :func:`first_error`)."""
    return "gloo" if asked == "cpu" or not torch.cuda.is_available() else "nccl"


def collective_timeout(seconds: float | None = None, environ: Mapping[str, str] | None = None) -> timedelta:
    """How long a collective waits: ``seconds`` when given, else ``KANDINSKY5_DIST_TIMEOUT``, else 30 minutes.
    ValueError unless it is a positive number."""
    environ = os.environ if environ is None else environ
    source = "--dist-timeout"
    if seconds is None:
        text = environ.get(TIMEOUT_ENV)
        if text is None:
            return timedelta(seconds=DEFAULT_TIMEOUT_S)
        source = TIMEOUT_ENV
        try:
            seconds = float(text)
        except ValueError:
            raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds, got {text!r}") from None
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"{source} must be a positive number of seconds, got {seconds}")
    return timedelta(seconds=seconds)


def init_distributed(launch: Launch, backend: str, device: torch.device | None, timeout: timedelta) -> None:
    """Join the default process group of ``launch`` (``env://``: torchrun's variables) with ``backend`` and
    ``timeout``; a GPU ``device`` becomes this process's current device first (``None``: this rank has none, it only
    takes part in stopping together)."""
    if dist.is_initialized():
        return
    on_gpu = device is not None and device.type == "cuda"
    if on_gpu:
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend,
        timeout=timeout,
        rank=launch.rank,
        world_size=launch.world_size,
        device_id=device if on_gpu and backend == "nccl" else None,
    )


def first_error(message: str | None) -> tuple[int, str] | None:
    """Every rank says what went wrong on it (``None``: nothing); all get the lowest failing rank and its message,
    or ``None`` when none failed. Lets ranks that checked different things (the output file exists only where rank
    0 writes) agree to stop together, before any work."""
    messages: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(messages, message)
    for rank, said in enumerate(messages):
        if said is not None:
            return rank, said
    return None


def shutdown() -> None:
    """Leave the default process group (after a run that ended well)."""
    if dist.is_initialized():
        dist.destroy_process_group()
