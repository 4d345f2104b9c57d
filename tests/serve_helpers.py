"""Shared helpers of the server tests: a real ``kandinsky5 serve`` process on a free loopback port, with a tiny
checkpoint and a temporary data folder; waiting for jobs; reading videos and the job log back.

The server is a subprocess (``python -m kandinsky5 serve``), as a user runs it: nothing is monkeypatched, and a
test can kill it (SIGKILL) and start it again on the same data folder.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

SERVE_COMMAND = (sys.executable, "-m", "kandinsky5", "serve")
# importing torch and loading the tiny checkpoint takes a few seconds; a busy 2-core machine needs more
STARTUP_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 30.0
FINAL_STATUSES = ("completed", "failed", "cancelled")
# A tiny video: 5 frames of 96x64 (the tiny checkpoint takes any multiple of 16).
TINY_VIDEO = {"size": "96x64", "num_frames": 5}


def free_port() -> int:
    """A loopback port free now (the server binds it a moment later; a clash is unlikely and fails loudly)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tiny_checkpoint(folder: Path, task: str = "t2v") -> Path:
    """The package's tiny random-weight checkpoint of ``task`` ("t2v" or "i2v") in ``folder``."""
    from kandinsky5.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(folder, seed=0, task=task)


class Server:
    """``kandinsky5 serve --model MODEL --data-dir DATA_DIR --port <free>`` and ``options``; its output goes to
    ``data_dir/../<name>.log``. ``start()`` waits for ``/health``; ``stop()`` sends SIGTERM, ``kill()`` SIGKILL."""

    def __init__(self, model: Path, data_dir: Path, *options: str, token: str | None = None):
        self.model = Path(model)
        self.data_dir = Path(data_dir)
        self.options = options
        self.token = token
        self.port: int | None = None
        self.process: subprocess.Popen | None = None
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}-server.log"
        self.starts = 0
        self._log = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        command = [*SERVE_COMMAND, "--model", str(self.model), "--data-dir", str(self.data_dir)]
        command += ["--port", str(self.port), *self.options]
        if self.token is not None:
            command += ["--token", self.token]
        return command

    def launch(self) -> Server:
        """Start the process on a free port (see :meth:`wait_ready`)."""
        self.port = free_port()
        self.starts += 1
        self._log = open(self.log_path, "a")  # noqa: SIM115 (the child writes to it; closed in _reap)
        self._log.write(f"---- start {self.starts}: {' '.join(self.command())}\n")
        self._log.flush()
        self.process = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT)
        return self

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> Server:
        """Wait until ``/health`` answers; the server's log in the error when it exits or never answers."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.kill()
        raise TimeoutError(f"the server did not answer /health within {timeout} s:\n{self.log_tail()}")

    def start(self, timeout: float = STARTUP_TIMEOUT_S) -> Server:
        return self.launch().wait_ready(timeout)

    def client(self, token: str | None | bool = True) -> httpx.Client:
        """A client of this server; ``token=True``: the server's token (if any), ``None``/``False``: none."""
        if token is True:
            token = self.token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=REQUEST_TIMEOUT_S)

    def terminate(self) -> None:
        """SIGTERM (see :meth:`stop`): several servers can be told at once, then waited for."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait; the exit status."""
        if self.process is None or self.process.poll() is not None:
            return self._reap()
        self.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
        return self._reap()

    def kill(self) -> int:
        """SIGKILL: the server dies at once, as in a crash."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
        return self._reap()

    def _reap(self) -> int:
        code = self.process.wait() if self.process is not None else 0
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.05, what: str = "the condition"):
    """Poll ``predicate()`` until it returns something truthy; that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout} s for {what}")
        time.sleep(interval)


def wait_for_job(client: httpx.Client, job_id: str, statuses=FINAL_STATUSES, timeout: float = 90.0) -> dict:
    """The job once its status is one of ``statuses``."""

    def reached():
        job = client.get(f"/v1/videos/{job_id}").json()
        return job if job["status"] in statuses else None

    return wait_for(reached, timeout, what=f"{job_id} to be {' or '.join(statuses)}")


def video_frames(data: bytes | Path) -> list:
    """The decoded frames (RGB arrays) of an MP4 (bytes or a path), read back with PyAV."""
    import io

    import av

    source = io.BytesIO(data) if isinstance(data, bytes) else str(data)
    with av.open(source) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(container.streams.video[0])]


def job_log(data_dir: Path) -> list[tuple[str, str]]:
    """``(event, job id)`` per line of the data folder's ``jobs.log``, in order."""
    path = Path(data_dir) / "jobs.log"
    if not path.exists():
        return []
    return [tuple(line.split()[1:3]) for line in path.read_text().splitlines() if line.strip()]


def png_bytes(width: int, height: int, color=(200, 40, 30)) -> bytes:
    """A PNG image of two colours (left and right halves)."""
    import io

    import numpy as np
    import PIL.Image

    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2] = color
    pixels[:, width // 2 :] = 255 - np.array(color, dtype=np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
