"""The server's job store: one SQLite table (standard library ``sqlite3``, WAL mode) in ``DATA_DIR/jobs.sqlite3``,
and the job's files beside it.

Layout of a data folder::

    jobs.sqlite3           the jobs (this module); WAL mode, so readers never wait for the worker's writes
    jobs.log               one line per job start, end and recovery (kandinsky5/serve/worker.py)
    lock                   held (flock) by the one server that uses the folder
    videos/<id>.mp4        the finished video, written under a temporary name and renamed when complete
    images/<id>-<k>.png    the finished images of an image job (k = 0 .. n-1), each renamed into place
    previews/<id>.jpg      the latest preview frame of a running job (also renamed into place)
    inputs/<id>.png        the first frame of an image-to-video job, the source image of an editing job

Video jobs have ids ``video_<32 hex digits>``, image jobs (text-to-image, editing) ``image_<32 hex digits>``; the
job's ``mode`` is its task (``t2v``, ``i2v``, ``t2i``, ``i2i``) and ``num_outputs`` its number of images (1 for a
video). Columns added after a data folder was made are added to its table when it is opened
(:data:`ADDED_COLUMNS`), so an older folder keeps working.

Every state change is one short transaction guarded by the state it expects (``... WHERE status = 'in_progress'``),
so a cancellation racing the worker's completion resolves one way or the other, never both. A connection per
thread (``threading.local``): the worker thread, the event loop and each request thread have their own.

Crash recovery (:meth:`JobStore.recover`, at start): a job left ``in_progress`` by a server that died is marked
``completed`` if its MP4 (or every one of its PNGs) is at its final path (the rename is the last step of writing
it, so a file there is complete), else queued again with ``attempts + 1`` (the images it wrote removed), or failed
once it was interrupted ``MAX_ATTEMPTS`` times (a job that kills the server is not retried forever). A completed job
is never run again.
"""

from __future__ import annotations

import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

QUEUED = "queued"
IN_PROGRESS = "in_progress"
COMPLETED = "completed"
FAILED = "failed"
CANCELLED = "cancelled"
STATUSES = (QUEUED, IN_PROGRESS, COMPLETED, FAILED, CANCELLED)
FINAL_STATUSES = frozenset({COMPLETED, FAILED, CANCELLED})

# A job whose run was interrupted this many times by the server stopping abruptly (a crash, kill -9, power loss)
# fails instead of being queued again.
MAX_ATTEMPTS = 3
ID_PREFIX = "video_"
IMAGE_ID_PREFIX = "image_"
ID_PATTERN = re.compile(r"^(video|image)_[0-9a-f]{32}$")
# the tasks whose jobs make images (kandinsky5.variants.Task's values)
IMAGE_MODES = frozenset({"t2i", "i2i"})
DATABASE_FILE = "jobs.sqlite3"
LOCK_FILE = "lock"
VIDEOS_DIR = "videos"
IMAGES_DIR = "images"
PREVIEWS_DIR = "previews"
INPUTS_DIR = "inputs"
JOB_FOLDERS = (VIDEOS_DIR, IMAGES_DIR, PREVIEWS_DIR, INPUTS_DIR)
VIDEO_SUFFIX = ".mp4"
IMAGE_SUFFIX = ".png"
PREVIEW_SUFFIX = ".jpg"
INPUT_SUFFIX = ".png"
# Milliseconds a connection waits for another's write lock before giving up (writes take microseconds).
BUSY_TIMEOUT_MS = 10_000
LIST_ORDERS = ("asc", "desc")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    model TEXT NOT NULL,
    status TEXT NOT NULL,
    progress INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    completed_at INTEGER,
    error TEXT,
    prompt TEXT NOT NULL,
    negative_prompt TEXT,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    num_frames INTEGER NOT NULL,
    fps INTEGER NOT NULL,
    num_inference_steps INTEGER NOT NULL,
    guidance_scale REAL NOT NULL,
    seed TEXT NOT NULL,
    mode TEXT NOT NULL,
    cache TEXT NOT NULL,
    expand_prompt INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    input_path TEXT,
    output_path TEXT,
    phase TEXT,
    step INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER NOT NULL DEFAULT 0,
    num_outputs INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, seq);
"""
# Columns a table made by an earlier version lacks: added (with their defaults) when the store opens it.
ADDED_COLUMNS = {"num_outputs": "INTEGER NOT NULL DEFAULT 1"}


class DataDirInUse(RuntimeError):
    """Another server holds the data folder's lock."""


def new_job_id(prefix: str = ID_PREFIX) -> str:
    """A new id: ``prefix`` (``video_`` or ``image_``) and 32 random hex digits."""
    return prefix + secrets.token_hex(16)


def valid_job_id(job_id: str) -> bool:
    """Whether ``job_id`` has the form of our ids (``video_`` or ``image_`` and 32 hex digits): only such ids
    become paths."""
    return bool(ID_PATTERN.match(job_id))


def job_id_of_file(path: Path) -> str:
    """The id of the job a file of a job folder belongs to (``<id>.mp4``, ``<id>-<k>.png``, ...)."""
    return path.name.partition(".")[0].partition("-")[0]


@dataclass(frozen=True)
class Job:
    """One row of the table (seeds are stored as text: SQLite integers stop at 2**63 - 1, torch seeds at 2**64 - 1;
    paths are relative to the data folder)."""

    seq: int
    id: str
    model: str
    status: str
    progress: int
    created_at: int
    completed_at: int | None
    error: str | None
    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    num_frames: int
    fps: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    mode: str
    cache: str
    expand_prompt: bool
    attempts: int
    input_path: str | None
    output_path: str | None
    phase: str | None
    step: int
    total_steps: int
    num_outputs: int

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        values = {name: row[name] for name in row.keys()}
        values["seed"] = int(values["seed"])
        values["expand_prompt"] = bool(values["expand_prompt"])
        return cls(**values)

    @property
    def finished(self) -> bool:
        return self.status in FINAL_STATUSES

    @property
    def makes_images(self) -> bool:
        return self.mode in IMAGE_MODES


# the columns a new job sets (the rest take their defaults)
NEW_JOB_COLUMNS = (
    "id",
    "model",
    "status",
    "created_at",
    "prompt",
    "negative_prompt",
    "width",
    "height",
    "num_frames",
    "fps",
    "num_inference_steps",
    "guidance_scale",
    "seed",
    "mode",
    "cache",
    "expand_prompt",
    "input_path",
    "num_outputs",
)
JOB_COLUMNS = tuple(f.name for f in fields(Job))


@dataclass(frozen=True)
class Recovery:
    """What :meth:`JobStore.recover` did: ids per outcome."""

    completed: list[str]
    requeued: list[str]
    failed: list[str]
    removed_files: list[str]


class JobStore:
    """The jobs table and the job files of one data folder (see the module doc)."""

    def __init__(self, data_dir: str | os.PathLike):
        self.root = Path(data_dir).expanduser().absolute()
        for folder in (self.root, *(self.root / name for name in JOB_FOLDERS)):
            folder.mkdir(parents=True, exist_ok=True)
        self.database = self.root / DATABASE_FILE
        self._local = threading.local()
        self._lock_handle = None
        self.connection().executescript(SCHEMA)  # its own transaction
        self._add_missing_columns()

    def _add_missing_columns(self) -> None:
        """Add :data:`ADDED_COLUMNS` that the table (made by an earlier version) lacks."""
        with self.transaction() as db:
            present = {row["name"] for row in db.execute("PRAGMA table_info(jobs)").fetchall()}
            for name, definition in ADDED_COLUMNS.items():
                if name not in present:
                    db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {definition}")

    # ------------------------------------------------------------------ the folder's lock

    def acquire_lock(self) -> None:
        """Hold the data folder for this process (released when it exits, however it exits): two servers on one
        folder would run each job twice. Raises :class:`DataDirInUse`."""
        import fcntl

        handle = open(self.root / LOCK_FILE, "a+")  # held open for the life of the process
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            handle.close()
            raise DataDirInUse(f"{self.root} is in use by another server ({owner})") from err
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        self._lock_handle = handle

    # ------------------------------------------------------------------ connections

    def connection(self) -> sqlite3.Connection:
        """This thread's connection (autocommit: transactions are explicit, see :meth:`transaction`)."""
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.database, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed state change (completed, above all) survives a power loss, not only a crash
            db.execute("PRAGMA synchronous=FULL")
            db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            self._local.db = db
        return db

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``: the write lock is taken at once, so a read-then-write cannot
        be overtaken by another writer)."""
        db = self.connection()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        """Close this thread's connection."""
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    # ------------------------------------------------------------------ paths

    def video_path(self, job_id: str) -> Path:
        return self.root / VIDEOS_DIR / f"{job_id}{VIDEO_SUFFIX}"

    def image_path(self, job_id: str, index: int) -> Path:
        """The ``index``-th image (from 0) of an image job."""
        return self.root / IMAGES_DIR / f"{job_id}-{index}{IMAGE_SUFFIX}"

    def output_paths(self, job: Job) -> list[Path]:
        """Where a job's results are (or will be): its video, or its images."""
        if job.makes_images:
            return [self.image_path(job.id, index) for index in range(job.num_outputs)]
        return [self.video_path(job.id)]

    def preview_path(self, job_id: str) -> Path:
        return self.root / PREVIEWS_DIR / f"{job_id}{PREVIEW_SUFFIX}"

    def input_path(self, job_id: str) -> Path:
        return self.root / INPUTS_DIR / f"{job_id}{INPUT_SUFFIX}"

    def relative(self, path: Path) -> str:
        return str(path.relative_to(self.root))

    def remove_files(self, job_id: str) -> None:
        """Remove a job's video or images, preview and input (those that exist)."""
        images = sorted((self.root / IMAGES_DIR).glob(f"{job_id}-*{IMAGE_SUFFIX}"))
        for path in (self.video_path(job_id), *images, self.preview_path(job_id), self.input_path(job_id)):
            path.unlink(missing_ok=True)

    def remove_outputs(self, job: Job) -> None:
        """Remove what a run of ``job`` wrote of its results (a run that did not complete)."""
        for path in self.output_paths(job):
            path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ reading

    def get(self, job_id: str) -> Job | None:
        row = self.connection().execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else Job.from_row(row)

    def queue_position(self, job: Job) -> int | None:
        """1 for the queued job that runs next, 2 for the one after, ...; ``None`` unless ``job`` is queued."""
        if job.status != QUEUED:
            return None
        (ahead,) = (
            self.connection()
            .execute("SELECT COUNT(*) FROM jobs WHERE status = ? AND seq < ?", (QUEUED, job.seq))
            .fetchone()
        )
        return ahead + 1

    def list(self, limit: int, after: Job | None = None, order: str = "desc") -> tuple[list[Job], bool]:
        """Up to ``limit`` jobs in creation order (``asc``) or newest first (``desc``), starting after ``after``;
        and whether more follow."""
        if order not in LIST_ORDERS:
            raise ValueError(f"order must be one of {LIST_ORDERS}, got {order!r}")
        comparison, direction = (">", "ASC") if order == "asc" else ("<", "DESC")
        where, arguments = "", [limit + 1]
        if after is not None:
            where, arguments = f"WHERE seq {comparison} ?", [after.seq, limit + 1]
        rows = (
            self.connection()
            .execute(f"SELECT * FROM jobs {where} ORDER BY seq {direction} LIMIT ?", arguments)
            .fetchall()
        )
        jobs = [Job.from_row(row) for row in rows]
        return jobs[:limit], len(jobs) > limit

    def count(self, status: str) -> int:
        (number,) = self.connection().execute("SELECT COUNT(*) FROM jobs WHERE status = ?", (status,)).fetchone()
        return number

    # ------------------------------------------------------------------ state changes

    def insert(self, **values) -> Job:
        """A new queued job; ``values`` are :data:`NEW_JOB_COLUMNS` less ``status`` and ``created_at``
        (``num_outputs`` may be left out: 1)."""
        values = dict(values, status=QUEUED, created_at=int(time.time()))
        values.setdefault("num_outputs", 1)
        values["seed"] = str(values["seed"])
        missing = set(NEW_JOB_COLUMNS) - set(values)
        if missing or set(values) - set(NEW_JOB_COLUMNS):
            raise TypeError(f"a new job needs exactly the columns {NEW_JOB_COLUMNS}")
        with self.transaction() as db:
            db.execute(
                f"INSERT INTO jobs ({', '.join(NEW_JOB_COLUMNS)}) VALUES ({', '.join('?' * len(NEW_JOB_COLUMNS))})",
                [values[name] for name in NEW_JOB_COLUMNS],
            )
        return self.get(values["id"])

    def claim_next(self) -> Job | None:
        """The oldest queued job, now ``in_progress`` (``None`` when none is queued)."""
        with self.transaction() as db:
            row = db.execute("SELECT id FROM jobs WHERE status = ? ORDER BY seq LIMIT 1", (QUEUED,)).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET status = ?, progress = 0, phase = NULL, step = 0, total_steps = 0 WHERE id = ?",
                (IN_PROGRESS, row["id"]),
            )
        return self.get(row["id"])

    def update_progress(self, job_id: str, progress: int, phase: str | None, step: int, total_steps: int) -> None:
        with self.transaction() as db:
            db.execute(
                "UPDATE jobs SET progress = ?, phase = ?, step = ?, total_steps = ? WHERE id = ? AND status = ?",
                (progress, phase, step, total_steps, job_id, IN_PROGRESS),
            )

    def complete(self, job_id: str, output: Path) -> bool:
        """Mark a running job completed, its video (its first image) at ``output`` (already renamed into place);
        ``False`` when it is no longer running (cancelled meanwhile)."""
        with self.transaction() as db:
            changed = db.execute(
                "UPDATE jobs SET status = ?, progress = 100, completed_at = ?, output_path = ?, error = NULL "
                "WHERE id = ? AND status = ?",
                (COMPLETED, int(time.time()), self.relative(output), job_id, IN_PROGRESS),
            ).rowcount
        return changed == 1

    def fail(self, job_id: str, message: str) -> bool:
        """Mark a running job failed with ``message``; ``False`` when it is no longer running."""
        with self.transaction() as db:
            changed = db.execute(
                "UPDATE jobs SET status = ?, completed_at = ?, error = ? WHERE id = ? AND status = ?",
                (FAILED, int(time.time()), message, job_id, IN_PROGRESS),
            ).rowcount
        return changed == 1

    def requeue(self, job_id: str) -> bool:
        """Put a running job back in the queue, unchanged (the server is stopping: not an attempt)."""
        with self.transaction() as db:
            changed = db.execute(
                "UPDATE jobs SET status = ?, progress = 0, phase = NULL, step = 0, total_steps = 0 "
                "WHERE id = ? AND status = ?",
                (QUEUED, job_id, IN_PROGRESS),
            ).rowcount
        return changed == 1

    def cancel(self, job_id: str) -> str | None:
        """Cancel a queued or running job: the status it had (``None`` when it was neither: unknown or
        finished)."""
        with self.transaction() as db:
            row = db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row["status"] not in (QUEUED, IN_PROGRESS):
                return None
            db.execute(
                "UPDATE jobs SET status = ?, completed_at = ? WHERE id = ?", (CANCELLED, int(time.time()), job_id)
            )
        return row["status"]

    def delete(self, job_id: str) -> bool:
        """Remove a finished job's row; ``False`` when there is none or it is not finished."""
        with self.transaction() as db:
            changed = db.execute(
                f"DELETE FROM jobs WHERE id = ? AND status IN ({', '.join('?' * len(FINAL_STATUSES))})",
                (job_id, *sorted(FINAL_STATUSES)),
            ).rowcount
        return changed == 1

    # ------------------------------------------------------------------ crash recovery

    def recover(self) -> Recovery:
        """Make the folder consistent after a server stopped abruptly (see the module doc); run before the worker
        starts. Also removes what killed writes left (hidden temporary files), the files of cancelled jobs and
        files no job owns."""
        from kandinsky5.io.atomic import temporary_paths

        completed, requeued, failed, removed = [], [], [], []
        with self.transaction() as db:
            for row in db.execute("SELECT * FROM jobs WHERE status = ?", (IN_PROGRESS,)).fetchall():
                job = Job.from_row(row)
                outputs = self.output_paths(job)
                if all(path.is_file() for path in outputs):
                    db.execute(
                        "UPDATE jobs SET status = ?, progress = 100, completed_at = ?, output_path = ?, error = NULL "
                        "WHERE id = ?",
                        (COMPLETED, int(outputs[-1].stat().st_mtime), self.relative(outputs[0]), job.id),
                    )
                    completed.append(job.id)
                    continue
                for path in outputs:  # the images an interrupted run wrote before it stopped
                    path.unlink(missing_ok=True)
                if job.attempts + 1 >= MAX_ATTEMPTS:
                    message = (
                        f"the server stopped while this job ran, {job.attempts + 1} times; it is not retried "
                        "(it may be what stops the server: try a smaller size, fewer frames or fewer steps)"
                    )
                    db.execute(
                        "UPDATE jobs SET status = ?, attempts = attempts + 1, completed_at = ?, error = ? WHERE id = ?",
                        (FAILED, int(time.time()), message, job.id),
                    )
                    failed.append(job.id)
                else:
                    db.execute(
                        "UPDATE jobs SET status = ?, attempts = attempts + 1, progress = 0, phase = NULL, step = 0, "
                        "total_steps = 0 WHERE id = ?",
                        (QUEUED, job.id),
                    )
                    requeued.append(job.id)
            statuses = {row["id"]: row["status"] for row in db.execute("SELECT id, status FROM jobs").fetchall()}
        for folder in JOB_FOLDERS:
            for path in temporary_paths(self.root / folder):
                path.unlink(missing_ok=True)
                removed.append(self.relative(path))
            for path in (self.root / folder).iterdir():
                status = statuses.get(job_id_of_file(path))
                # nothing is kept for unknown or cancelled jobs, nor the preview of an interrupted run
                stale = status is None or status == CANCELLED or (folder == PREVIEWS_DIR and status == QUEUED)
                if path.is_file() and stale:
                    path.unlink(missing_ok=True)
                    removed.append(self.relative(path))
        return Recovery(completed, requeued, failed, removed)
