"""Running a function in N processes joined by a gloo process group (CPU), for the tests of parallel modes.

``run_in_processes(fn, world_size, *args)`` spawns ``world_size`` fresh Python processes (the ``spawn`` start
method: nothing of the test process is inherited but ``sys.path``), each of which sets one CPU thread, joins a
gloo process group (``torch.distributed`` on a free TCP port of 127.0.0.1), calls ``fn(rank, world_size, *args)``
and saves what it returns (anything ``torch.save`` takes) for the caller; the caller gets the list of the ranks'
results, in rank order. A rank that raises fails the call with its traceback (the others are stopped, so none
hangs in a collective); so does one that outlives ``timeout`` seconds.

``fn`` must be importable by name in a fresh process: a module-level function of a test module or of this one
(pytest puts ``tests/`` on ``sys.path``, which the spawned processes inherit). Session fixtures cannot cross the
process boundary: pass what they made by value (a checkpoint folder's path, a seed).

``start_processes`` returns at once (the ranks start in the background) so the caller can compute its single-process
expectations while they import torch; :meth:`Processes.results` waits for them.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# How long a collective may wait for a rank that died before gloo gives up (the spawn join notices sooner).
COLLECTIVE_TIMEOUT = timedelta(seconds=120)
DEFAULT_TIMEOUT_S = 300.0


def free_port() -> int:
    """A TCP port of 127.0.0.1 free now (the OS picks it; nothing holds it afterwards)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_gloo(rank: int, world_size: int, port: int) -> None:
    """Join the default process group: gloo, ``world_size`` ranks, rendezvous on 127.0.0.1:``port``."""
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=COLLECTIVE_TIMEOUT,
    )


def regroup(rank: int, ranks: int, port: int) -> bool:
    """Leave the default process group; ranks ``0..ranks-1`` join a new one of ``ranks`` processes on ``port``
    (another free port than the first group's). Returns whether this rank is in it. Spares a second spawn (and its
    imports) when one test needs worlds of two sizes: every rank must call it."""
    dist.destroy_process_group()
    if rank >= ranks:
        return False
    init_gloo(rank, ranks, port)
    return True


def _entry(rank: int, fn: Callable, world_size: int, port: int, results: str, args: tuple) -> None:
    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # the loopback interface: no name resolution
    init_gloo(rank, world_size, port)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, Path(results) / f"rank{rank}.pt")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class Processes:
    """The ranks started by :func:`start_processes`."""

    def __init__(self, context, folder: tempfile.TemporaryDirectory, world_size: int, timeout: float):
        self._context = context
        self._folder = folder
        self._world_size = world_size
        self._deadline = time.monotonic() + timeout
        self._timeout = timeout

    def results(self) -> list[Any]:
        """Wait for every rank; their results in rank order. Raises the first failure (with its traceback)."""
        try:
            while not self._context.join(timeout=max(0.1, self._deadline - time.monotonic())):
                if time.monotonic() >= self._deadline:
                    raise TimeoutError(f"{self._world_size} processes did not finish within {self._timeout:g} s")
            folder = Path(self._folder.name)
            return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(self._world_size)]
        finally:
            self.stop()

    def stop(self) -> None:
        """Stop the ranks still running (only the processes this started) and remove the results folder."""
        for process in self._context.processes:
            if process.is_alive():
                process.terminate()
                process.join(5)
        self._folder.cleanup()


def start_processes(fn: Callable, world_size: int, *args: Any, timeout: float = DEFAULT_TIMEOUT_S) -> Processes:
    """Start ``fn(rank, world_size, *args)`` in ``world_size`` gloo ranks (see the module doc); returns at once."""
    folder = tempfile.TemporaryDirectory(prefix="k5-parallel-")
    port = free_port()
    context = mp.start_processes(
        _entry,
        args=(fn, world_size, port, folder.name, args),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    return Processes(context, folder, world_size, timeout)


def run_in_processes(fn: Callable, world_size: int, *args: Any, timeout: float = DEFAULT_TIMEOUT_S) -> list[Any]:
    """``fn(rank, world_size, *args)`` in ``world_size`` gloo ranks; their results in rank order."""
    return start_processes(fn, world_size, *args, timeout=timeout).results()
