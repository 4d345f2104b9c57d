"""When one rank of a parallel run fails, every rank stops, and one line says which rank failed and why.

A rank that raises stops taking part in collectives; its peers would wait in their next one until the process
group's timeout. :func:`run_guarded` runs a rank's whole job and, on an exception:

1. looks whether another rank failed first (a record in the process group's key-value store, the TCP store every
   rank joined through); if so this exception is the consequence (a collective whose peer left, a SIGTERM from
   torchrun) and the rank exits silently;
2. otherwise records the failure there (compare-and-set, so of two ranks failing at once only the first is
   reported), prints ``kandinsky5: error: rank R of N: <the error on one line>`` on stderr, and aborts its process
   group, which closes its connections: a gloo peer blocked in a collective fails at once and goes through step 1;
3. exits with status 1 (``os._exit`` after flushing the output: nothing may block in a collective on the way out).

Under torchrun, the non-zero exit also makes the elastic agent stop the other processes (SIGTERM): those that are
computing get an interrupt, find the record, and exit silently; NCCL ranks stuck in a GPU collective are killed by
the agent after its grace period, or by the NCCL watchdog at the timeout. torchrun then prints its own report of
the failed process. An interrupt (Ctrl-C reaches every process) is reported by rank 0 alone.

A test switch injects a failure (:func:`fault_injection`): ``KANDINSKY5_FAIL_RANK=R`` makes rank ``R`` raise
:class:`InjectedFault` when it finishes denoising step ``KANDINSKY5_FAIL_AT_STEP`` (default 1). It is read in this
one place and does nothing unless set.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from datetime import timedelta

import torch.distributed as dist

from kandinsky5.sampling.control import Phase, ProgressCallback, ProgressEvent

FAIL_RANK_ENV = "KANDINSKY5_FAIL_RANK"
FAIL_AT_STEP_ENV = "KANDINSKY5_FAIL_AT_STEP"
DEFAULT_FAIL_AT_STEP = 1
# The store key of the first failure: "rank<TAB>line".
FAILURE_KEY = "kandinsky5/failure"
# How long a store operation may take in the failure path (the store may be gone with the rank that hosted it).
STORE_TIMEOUT = timedelta(seconds=5)


class InjectedFault(RuntimeError):
    """The failure :func:`fault_injection` raises (tests only)."""


def fault_injection(rank: int, environ: Mapping[str, str] | None = None) -> ProgressCallback | None:
    """A progress listener that raises :class:`InjectedFault` on rank ``KANDINSKY5_FAIL_RANK`` once it finishes
    denoising step ``KANDINSKY5_FAIL_AT_STEP`` (default 1), or ``None`` (the switch unset, or another rank). A
    fault-injection switch for tests of failure propagation; ValueError on values that are not integers."""
    environ = os.environ if environ is None else environ
    chosen = environ.get(FAIL_RANK_ENV)
    if chosen is None or chosen == "":
        return None
    try:
        failing_rank = int(chosen)
        step = int(environ.get(FAIL_AT_STEP_ENV, DEFAULT_FAIL_AT_STEP))
    except ValueError:
        raise ValueError(f"{FAIL_RANK_ENV} and {FAIL_AT_STEP_ENV} must be integers") from None
    if failing_rank != rank:
        return None

    def fail(event: ProgressEvent) -> None:
        if event.phase is Phase.DENOISE and event.completed == step:
            raise InjectedFault(f"injected failure after step {step} ({FAIL_RANK_ENV}={rank}, a test switch)")

    return fail


def _store():
    """The default process group's store, or ``None`` (no process group)."""
    if not dist.is_initialized():
        return None
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(STORE_TIMEOUT)
        return store
    except Exception:
        return None


def recorded_failure() -> tuple[int, str] | None:
    """The first failure a rank recorded (its rank and line), ``None`` when none has; when the store cannot be
    reached (the rank hosting it is gone), ``(-1, "")``: some rank failed."""
    store = _store()
    if store is None:
        return None
    try:
        if not store.check([FAILURE_KEY]):
            return None
        rank, line = store.get(FAILURE_KEY).decode().split("\t", 1)
        return int(rank), line
    except Exception:
        return -1, ""


def record_failure(rank: int, line: str) -> bool:
    """Record this rank's failure unless another rank's is recorded already; whether this one is the first (also
    when there is no store to record it in: then every failing rank reports)."""
    store = _store()
    if store is None:
        return True
    value = f"{rank}\t{line}"
    try:
        stored = store.compare_set(FAILURE_KEY, "", value)
    except Exception:
        return True
    return stored.decode() == value


def abort_process_group() -> None:
    """Tear the default process group down without waiting for peers (their collectives fail rather than hang)."""
    if not dist.is_initialized():
        return
    try:
        abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
        if abort is not None:
            abort()
        else:
            dist.destroy_process_group()
    except Exception:
        pass


def failure_line(rank: int, world_size: int, err: BaseException, describe: Callable[[BaseException], str]) -> str:
    return f"kandinsky5: error: rank {rank} of {world_size}: {describe(err)}; every rank stops"


def _exit(status: int, hard: bool) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    if hard:
        os._exit(status)
    return status


def run_guarded(
    job: Callable[[], int],
    rank: int,
    world_size: int,
    describe: Callable[[BaseException], str],
    report_interrupt: Callable[[KeyboardInterrupt], tuple[str, int]],
    hard_exit: bool = True,
) -> int:
    """Run this rank's ``job`` (its exit status) so that a failure anywhere stops every rank with one line (see the
    module's docstring). ``describe(err)``: an error on one line; ``report_interrupt(err)``: the line and status of
    an interrupt (printed by rank 0 only). ``hard_exit``: end the process after a failure (``os._exit``) rather than
    return its status."""
    try:
        return job()
    except KeyboardInterrupt as err:
        first = recorded_failure()
        if first is not None and first[0] != rank:
            return _exit(1, hard_exit)  # stopped because another rank failed: that rank has said why
        line, status = report_interrupt(err)
        if rank == 0:
            print(line, file=sys.stderr)
        abort_process_group()
        return _exit(status, hard_exit)
    except Exception as err:
        first = recorded_failure()
        if first is not None and first[0] != rank:
            abort_process_group()
            return _exit(1, hard_exit)
        line = failure_line(rank, world_size, err, describe)
        if record_failure(rank, line):
            print(line, file=sys.stderr)
        abort_process_group()
        return _exit(1, hard_exit)
