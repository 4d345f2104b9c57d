"""The control of one generation: progress events, cancellation and previews.

A :class:`RunControl` belongs to one call (``pipe(..., control=RunControl(...))``; the pipeline makes a silent one
when none is given). Everything it knows about the run lives in it, so two calls never share state through the
pipeline. The progress bar and diffusers' ``callback_on_step_end`` are adapters over the same events.

- **Progress**: ``on_progress(event)`` receives a :class:`ProgressEvent` when each phase starts and ends (text
  encoding, image encoding, denoising, decoding, writing) and after each denoising step, with the seconds since
  the run started and an estimate of the seconds the phase still needs (denoising: the mean step time so far
  times the steps left; ``None`` where nothing can be estimated yet).
- **Cancellation**: ``cancel()`` may be called from any thread (a server's request handler, a signal handler).
  The run stops before its next step or phase and raises :class:`GenerationCancelled`; nothing is decoded.
- **Interrupt** (diffusers' ``pipe._interrupt``): the remaining steps are skipped and the latents decoded.
- **Previews**: every ``preview_every`` steps ``on_preview(step, frames)`` receives a cheap RGB approximation of
  the current latents (see ``kandinsky5/sampling/preview.py``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum


class Phase(StrEnum):
    ENCODE_TEXT = "encode_text"
    ENCODE_IMAGE = "encode_image"
    DENOISE = "denoise"
    DECODE = "decode"
    WRITE = "write"


class GenerationCancelled(Exception):
    """The run was cancelled (``RunControl.cancel()``) before it finished; nothing was decoded."""


@dataclass(frozen=True)
class ProgressEvent:
    """``completed`` of ``total`` units of ``phase`` are done (``completed == 0``: the phase starts; denoising
    counts steps, the other phases count 1)."""

    phase: Phase
    completed: int
    total: int
    elapsed_s: float
    remaining_s: float | None

    @property
    def finished(self) -> bool:
        return self.completed == self.total


ProgressCallback = Callable[[ProgressEvent], None]
PreviewCallback = Callable[[int, "object"], None]


class RunControl:
    """Progress, cancellation and previews of one generation (see the module doc)."""

    def __init__(
        self,
        on_progress: ProgressCallback | None = None,
        on_preview: PreviewCallback | None = None,
        preview_every: int = 0,
        clock: Callable[[], float] = time.perf_counter,
    ):
        if not isinstance(preview_every, int) or preview_every < 0:
            raise ValueError(f"preview_every must be a non-negative integer, got {preview_every!r}")
        if preview_every and on_preview is None:
            raise ValueError("preview_every needs on_preview, the function that receives the previews")
        self._listeners: list[ProgressCallback] = [] if on_progress is None else [on_progress]
        self.on_preview = on_preview
        self.preview_every = preview_every
        self._clock = clock
        self._started = clock()
        self._cancel = threading.Event()
        self.interrupted = False

    # ------------------------------------------------------------------ cancellation and interrupt

    def cancel(self) -> None:
        """Ask the run to stop before its next step or phase (thread-safe)."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def raise_if_cancelled(self) -> None:
        if self._cancel.is_set():
            raise GenerationCancelled("the generation was cancelled")

    def interrupt(self) -> None:
        """Skip the remaining denoising steps; the latents as they are get decoded (diffusers' interrupt)."""
        self.interrupted = True

    # ------------------------------------------------------------------ progress

    def add_listener(self, listener: ProgressCallback) -> None:
        """Another receiver of the progress events (the progress bar, a server's status)."""
        self._listeners.append(listener)

    def remove_listener(self, listener: ProgressCallback) -> None:
        self._listeners.remove(listener)

    def restart_clock(self) -> None:
        self._started = self._clock()

    @property
    def elapsed_s(self) -> float:
        return self._clock() - self._started

    def emit(self, phase: Phase, completed: int, total: int, remaining_s: float | None) -> None:
        event = ProgressEvent(phase, completed, total, self.elapsed_s, remaining_s)
        for listener in self._listeners:
            listener(event)

    @contextmanager
    def phase(self, phase: Phase) -> Iterator[None]:
        """A one-unit phase: checks for cancellation, then reports its start and its end."""
        self.raise_if_cancelled()
        self.emit(phase, 0, 1, None)
        yield
        self.emit(phase, 1, 1, 0.0)

    def steps(self, total: int) -> StepProgress:
        """The progress of ``total`` denoising steps (reports the phase's start)."""
        return StepProgress(self, total)

    def wants_preview(self, completed_steps: int) -> bool:
        return bool(self.preview_every) and completed_steps % self.preview_every == 0


class StepProgress:
    """Counts the denoising steps of a run and estimates the time the rest will take."""

    def __init__(self, control: RunControl, total: int):
        self.control = control
        self.total = total
        self.completed = 0
        self._started = control.elapsed_s
        control.emit(Phase.DENOISE, 0, total, None)

    def step_done(self) -> None:
        self.completed += 1
        spent = self.control.elapsed_s - self._started
        remaining = spent / self.completed * (self.total - self.completed)
        self.control.emit(Phase.DENOISE, self.completed, self.total, remaining)
