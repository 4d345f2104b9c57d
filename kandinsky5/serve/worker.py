"""The one generation worker of ``kandinsky5 serve``: a thread that runs the queued jobs one at a time, in creation
order, on the pipeline loaded at start (one model, one job at a time).

A job's request is built by :func:`generation_request`, the same :class:`GenerationRequest` the command line builds
(the API validates a submission with it before queuing, and the worker builds it again from the stored values). A
run is watched and steered through a :class:`RunControl`:

- progress: every event goes to the job's event-stream subscribers (:class:`EventHub`); SQLite gets the progress
  at most every ``PROGRESS_WRITE_INTERVAL_S`` (and at each phase start), so fast steps cost no write each;
- previews: the middle latent frame of the sampler's cheap RGB preview, scaled to the video's size, written as
  ``previews/<id>.jpg`` (renamed into place) at most every ``PREVIEW_INTERVAL_S``;
- cancellation: ``DELETE`` marks the job cancelled in SQLite, then calls :meth:`Worker.cancel`, which cancels the
  running control; the run stops before its next step and the job's files are removed.

The video is written by ``export_to_video`` under a temporary name and renamed to ``videos/<id>.mp4`` when
complete (an image job's images: PNGs renamed to ``images/<id>-<k>.png``, one by one), synced to disk, and only
then marked completed in one transaction: a completed job always has its files, and a job whose files exist is
never run again (see ``JobStore.recover``). A failure marks the job failed with a
one-line message and the worker goes on with the next job. ``jobs.log`` in the data folder gets a line per job
start and end (and per recovery at start).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kandinsky5.serve.schemas import video_object
from kandinsky5.serve.store import IMAGE_MODES, IN_PROGRESS, Job, JobStore

logger = logging.getLogger("kandinsky5.serve")

LOG_FILE = "jobs.log"
# the item that ends an event stream without an event (the server is stopping)
END_OF_STREAM = "end"
# SQLite gets a running job's progress at most this often (the event stream gets every event).
PROGRESS_WRITE_INTERVAL_S = 0.25
# A preview JPEG is written at most this often (the sampler makes one per step).
PREVIEW_INTERVAL_S = 0.5
PREVIEW_JPEG_QUALITY = 85
# Where each phase's progress lies in the job's 0..100 (100: completed).
PHASE_SPANS = {
    "encode_text": (0, 3),
    "encode_image": (3, 5),
    "denoise": (5, 90),
    "decode": (90, 97),
    "write": (97, 99),
}
# The worker waits at most this long for a submission's wake-up before it looks at the queue again.
IDLE_POLL_S = 1.0
# The seconds stop() waits for the running step to end before leaving the thread (a daemon) behind.
STOP_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class ServeSettings:
    """What the server knows of its model and how it writes videos (fixed at start)."""

    model_id: str
    task: str  # kandinsky5.variants.Task's value: "t2v", "i2v", "t2i" (text-to-image) or "i2i" (image editing)
    facts: Any  # kandinsky5.pipelines.request.ModelFacts of the loaded pipeline
    variant: Any = None  # kandinsky5.variants.Variant or None
    fps: int = 24
    quality: float = 9.0
    default_cache: str = "none"
    cache_threshold: float | None = None
    cache_ratios: str | None = None
    # names a create request's ``model`` may give (the served id, and the variant's names)
    model_names: frozenset[str] = field(default_factory=frozenset)
    # the seconds POST /v1/images/... waits for its job before it answers 504 (the job goes on)
    image_timeout_s: float = 600.0

    @property
    def image_to_video(self) -> bool:
        return self.task == "i2v"

    @property
    def makes_images(self) -> bool:
        return self.task in IMAGE_MODES

    @property
    def takes_image(self) -> bool:
        """Whether every job needs an input image (image-to-video, editing)."""
        return self.task in ("i2v", "i2i")


# ---------------------------------------------------------------------------------------------- requests


def generation_request(settings: ServeSettings, seed: int | None = None, **arguments):
    """The :class:`GenerationRequest` of a job (``arguments``: ``GenerationRequest.build``'s prompt,
    negative_prompt, height, width, num_frames, num_inference_steps, guidance_scale, expand_prompt, image,
    num_videos_per_prompt), a video's frames as numpy, images as PIL images (the pipeline's own rounding to bytes).
    Raises :class:`RequestError` naming the parameter."""
    import torch

    from kandinsky5.pipelines.request import GenerationRequest

    generator = None if seed is None else torch.Generator("cpu").manual_seed(seed)
    output_type = "pil" if settings.makes_images else "np"
    return GenerationRequest.build(settings.facts, output_type=output_type, generator=generator, **arguments)


def step_cache_config(settings: ServeSettings, cache: str, request):
    """The MagCache configuration of a job (``None`` for ``cache == "none"``), by the command line's rule
    (``kandinsky5.cli.main.cache_config``: the ratios of the request's resolution class, the server's
    ``--cache-threshold`` and ``--cache-ratios``). Raises ``UsageError``."""
    from types import SimpleNamespace

    from kandinsky5.cli.main import cache_config

    if cache == "none":
        return None
    options = SimpleNamespace(
        cache=cache,
        cache_threshold=settings.cache_threshold,
        cache_ratios=settings.cache_ratios,
        variant=settings.variant,
    )
    return cache_config(options, request)


def job_request(settings: ServeSettings, store: JobStore, job: Job):
    """The request a stored job runs (its values were validated when it was queued)."""
    image = None
    if job.input_path is not None:
        from kandinsky5.io import load_image

        image = load_image(str(store.root / job.input_path))
    images = {"num_videos_per_prompt": job.num_outputs} if job.makes_images else {}
    return generation_request(
        settings,
        seed=job.seed,
        prompt=job.prompt,
        negative_prompt=job.negative_prompt,
        height=job.height,
        width=job.width,
        num_frames=job.num_frames,
        num_inference_steps=job.num_inference_steps,
        guidance_scale=job.guidance_scale,
        expand_prompt=job.expand_prompt,
        image=image,
        **images,
    )


# ---------------------------------------------------------------------------------------------- job log


class JobLog:
    """``jobs.log``: one line per event, ``<UTC time> <event> <job id> [details]``; events: ``start``,
    ``completed``, ``failed``, ``cancelled``, ``requeued`` (the server stopped), and at start ``recovered-completed``,
    ``recovered-requeued``, ``recovered-failed``. Each line is appended and flushed at once (a crash loses none).
    Also logged to the ``kandinsky5.serve`` logger."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()

    def write(self, event: str, job_id: str, details: str = "") -> None:
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        line = " ".join(part for part in (stamp, event, job_id, details) if part)
        with self._lock, open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
        logger.info("%s %s %s", event, job_id, details)


# ---------------------------------------------------------------------------------------------- event stream


class Subscription:
    """The events of one job for one event-stream client: an ``asyncio.Queue`` fed from any thread."""

    def __init__(self, hub: EventHub, job_id: str):
        self.hub = hub
        self.job_id = job_id
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[str, dict]] = asyncio.Queue()

    def put(self, item: tuple[str, dict]) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop has closed (the server is stopping)
            pass

    async def get(self) -> tuple[str, dict]:
        return await self.queue.get()

    def close(self) -> None:
        self.hub.unsubscribe(self)


class EventHub:
    """Fans a job's events (``progress``, ``preview``, ``status``) out to its event-stream subscribers."""

    def __init__(self, store: JobStore):
        self.store = store
        self._lock = threading.Lock()
        self._subscriptions: dict[str, set[Subscription]] = {}

    def subscribe(self, job_id: str) -> Subscription:
        """A subscription to ``job_id``'s events (call from the event loop)."""
        subscription = Subscription(self, job_id)
        with self._lock:
            self._subscriptions.setdefault(job_id, set()).add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        with self._lock:
            subscriptions = self._subscriptions.get(subscription.job_id, set())
            subscriptions.discard(subscription)
            if not subscriptions:
                self._subscriptions.pop(subscription.job_id, None)

    def publish(self, job_id: str, event: str, data: dict) -> None:
        with self._lock:
            subscriptions = list(self._subscriptions.get(job_id, ()))
        for subscription in subscriptions:
            subscription.put((event, data))

    def close_all(self) -> None:
        """End every event stream (the server is stopping)."""
        with self._lock:
            subscriptions = [s for group in self._subscriptions.values() for s in group]
        for subscription in subscriptions:
            subscription.put((END_OF_STREAM, {}))

    def publish_status(self, job_id: str) -> None:
        """A ``status`` event: the job object as it is now."""
        with self._lock:
            if job_id not in self._subscriptions:
                return
        job = self.store.get(job_id)
        if job is not None:
            self.publish(job_id, "status", video_object(job, self.store.queue_position(job)))


# ---------------------------------------------------------------------------------------------- the worker


class _JobRun:
    """The progress and preview listeners of one running job."""

    def __init__(self, worker: Worker, job: Job):
        self.worker = worker
        self.job = job
        self.progress = 0
        self.phase: str | None = None
        self.step = 0
        self.total_steps = job.num_inference_steps
        self._last_write = float("-inf")
        self._last_preview = float("-inf")
        self.control = None

    def on_progress(self, event) -> None:
        phase = str(event.phase)
        if phase == "denoise":
            self.step, self.total_steps = event.completed, event.total
        start, end = PHASE_SPANS.get(phase, (self.progress, self.progress))
        fraction = event.completed / event.total if event.total else 1.0
        self.progress = max(self.progress, int(start + (end - start) * fraction))
        self.phase = phase
        self.worker.hub.publish(
            self.job.id,
            "progress",
            {
                "id": self.job.id,
                "status": IN_PROGRESS,
                "progress": self.progress,
                "phase": phase,
                "step": self.step,
                "total_steps": self.total_steps,
            },
        )
        now = time.monotonic()
        if now - self._last_write >= PROGRESS_WRITE_INTERVAL_S or (event.completed == 0 and phase != "denoise"):
            self._last_write = now
            self.worker.store.update_progress(self.job.id, self.progress, phase, self.step, self.total_steps)

    def on_preview(self, step: int, frames) -> None:
        """Write the preview JPEG (never fails the job: a preview is a nicety)."""
        now = time.monotonic()
        if self.control.cancelled or now - self._last_preview < PREVIEW_INTERVAL_S:
            return
        self._last_preview = now
        try:
            write_preview(frames, self.worker.store.preview_path(self.job.id), self.job.width, self.job.height)
        except Exception as err:
            logger.warning("preview of %s at step %d not written: %s", self.job.id, step, err)
            return
        url = f"/v1/videos/{self.job.id}/preview?step={step}"
        self.worker.hub.publish(self.job.id, "preview", {"id": self.job.id, "step": step, "url": url})


def write_preview(frames, path: Path, width: int, height: int) -> None:
    """The middle latent frame of the first video of a preview (uint8 ``(videos, T, h, w, 3)``), scaled to the
    video's size, as a JPEG at ``path`` (renamed into place)."""
    import PIL.Image

    from kandinsky5.io.atomic import atomic_path

    frame = frames[0, frames.shape[1] // 2]
    image = PIL.Image.fromarray(frame).resize((width, height), PIL.Image.Resampling.BILINEAR)
    with atomic_path(path) as temporary:
        image.save(temporary, format="JPEG", quality=PREVIEW_JPEG_QUALITY)


def sync_to_disk(path: Path) -> None:
    """Flush ``path`` and its folder's entry to disk (before a job is marked completed)."""
    for target, flags in ((path, os.O_RDONLY), (path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))):
        descriptor = os.open(target, flags)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


class Worker:
    """Runs the queued jobs one at a time on ``pipe`` in its own thread (see the module doc)."""

    def __init__(
        self,
        store: JobStore,
        pipe,
        settings: ServeSettings,
        hub: EventHub,
        log: JobLog,
        device=None,
        torch_threads: int | None = None,
    ):
        self.store = store
        self.pipe = pipe
        self.settings = settings
        self.hub = hub
        self.log = log
        self.device = device
        self._torch_threads = torch_threads
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._current: tuple[str, Any] | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ control from other threads

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="kandinsky5-worker", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wake(self) -> None:
        """A job was queued."""
        self._wake.set()

    def cancel(self, job_id: str) -> None:
        """Stop ``job_id`` if it is running (its status was set to cancelled first)."""
        with self._lock:
            if self._current is not None and self._current[0] == job_id:
                self._current[1].cancel()

    def request_stop(self) -> None:
        """Ask the thread to stop after the running job's current step; that job goes back to the queue (this is
        not counted as an attempt)."""
        self._stopping.set()
        self._wake.set()
        with self._lock:
            if self._current is not None:
                self._current[1].cancel()

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """:meth:`request_stop`, then wait up to ``timeout`` seconds for the thread to end."""
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ the thread

    def _loop(self) -> None:
        if self._torch_threads is not None:  # the thread's own setting (OpenMP's is per thread)
            import torch

            torch.set_num_threads(self._torch_threads)
        while not self._stopping.is_set():
            try:
                job = self.store.claim_next()
            except Exception as err:  # a locked or broken database: say so, try again later
                logger.error("the worker could not read the queue: %s", err)
                job = None
            if job is None:
                self._wake.wait(IDLE_POLL_S)
                self._wake.clear()
                continue
            try:
                self._run(job)
            except Exception as err:  # never leave the loop: the next job must run
                logger.exception("the worker failed around job %s", job.id)
                self._finish_failed(job, err)
        self.store.close()

    def _run(self, job: Job) -> None:
        from kandinsky5.sampling.control import GenerationCancelled, RunControl

        run = _JobRun(self, job)
        control = RunControl(on_progress=run.on_progress, on_preview=run.on_preview, preview_every=1)
        run.control = control
        with self._lock:
            self._current = (job.id, control)
        try:
            # a DELETE between the claim and now found no running control: it set the status only
            current = self.store.get(job.id)
            if current is None or current.status != IN_PROGRESS or self._stopping.is_set():
                control.cancel()
            self.log.write("start", job.id, f"attempt={job.attempts + 1}")
            self.hub.publish_status(job.id)
            started = time.monotonic()
            try:
                output = self._generate(job, control)
            except GenerationCancelled:
                self._finish_cancelled(job)
                return
            if self.store.complete(job.id, output):
                details = f"{time.monotonic() - started:.2f}s"
                cache = self.pipe.transformer.cache
                if cache is not None:
                    details += f" cache skipped {cache.skipped_calls} of {cache.total_calls} model calls"
                self.log.write("completed", job.id, details)
            else:  # cancelled while the file was being written
                self.store.remove_files(job.id)
                self.log.write("cancelled", job.id, "after writing")
            self.hub.publish_status(job.id)
        except Exception as err:
            self._finish_failed(job, err)
        finally:
            with self._lock:
                self._current = None

    def _generate(self, job: Job, control) -> Path:
        """Run ``job``; the path of its video (of its first image), renamed into place and synced."""
        from kandinsky5.io import export_to_video
        from kandinsky5.io.atomic import atomic_path
        from kandinsky5.sampling.control import Phase

        request = job_request(self.settings, self.store, job)
        cache = step_cache_config(self.settings, job.cache, request)
        transformer = self.pipe.transformer
        if cache is None:
            transformer.disable_cache()
        else:
            transformer.enable_cache(cache)
        if job.makes_images:
            images = self.pipe.generate(request, control).image
            paths = self.store.output_paths(job)
            with control.phase(Phase.WRITE):
                for image, path in zip(images, paths, strict=True):
                    with atomic_path(path) as temporary:
                        image.save(temporary, format="PNG")
            for path in paths:
                sync_to_disk(path)
            return paths[0]
        frames = self.pipe.generate(request, control).frames[0]
        path = self.store.video_path(job.id)
        with control.phase(Phase.WRITE):
            export_to_video(frames, str(path), fps=job.fps, quality=self.settings.quality)
        sync_to_disk(path)
        return path

    def _finish_cancelled(self, job: Job) -> None:
        if self._stopping.is_set() and self.store.requeue(job.id):
            self.store.preview_path(job.id).unlink(missing_ok=True)
            self.log.write("requeued", job.id, "the server is stopping")
            self.hub.publish_status(job.id)
            return
        self.store.remove_files(job.id)  # DELETE removed them too; the run may have written a preview since
        self.log.write("cancelled", job.id)

    def _finish_failed(self, job: Job, err: BaseException) -> None:
        from kandinsky5.cli.main import one_line
        from kandinsky5.runtime.offload import release_cached_memory

        if self.device is not None:
            release_cached_memory(self.device)
        message = one_line(err).replace(str(self.store.root), "DATA_DIR")  # the client need not see the path
        self.store.remove_outputs(job)
        if self.store.fail(job.id, message):
            self.log.write("failed", job.id, message)
            self.hub.publish_status(job.id)
        else:
            self._finish_cancelled(job)
