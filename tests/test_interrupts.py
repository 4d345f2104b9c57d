"""SIGINT and SIGTERM during ``kandinsky5 generate``: one line on stderr saying where it stopped, exit status 130 or
143, no traceback and no partial file.

The real command runs in a subprocess, through a wrapper script that slows one point down in the child only (a
denoising step, or the video encoder with the output file half-written) and prints a marker when it gets there; the
test then sends the signal.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kandinsky5.cli.main import Interrupted, InterruptSignals, PhaseTimes, interrupt_report, interrupted_during, main
from kandinsky5.io.atomic import temporary_paths

REPO_ROOT = Path(__file__).resolve().parents[1]
MARKER_TIMEOUT_S = 60
EXIT_TIMEOUT_S = 30
STEPS = 4

# Runs `kandinsky5` (argv[2:]) with one point slowed down (argv[1]: "sampling" or "writing"); prints
# "STALLED <temporary files in the output folder>" when it gets there, then waits to be interrupted.
WRAPPER = textwrap.dedent(
    """
    import os, signal, sys, time

    import kandinsky5.cli.main as cli

    # Ctrl-C as in a terminal, also when the tests run where SIGINT is ignored (a background job)
    signal.signal(signal.SIGINT, signal.default_int_handler)

    POINT, OUT = sys.argv[1], sys.argv[2 + sys.argv[2:].index("--out") + 1]


    def stall():
        folder = os.path.dirname(OUT)
        print("STALLED", *sorted(n for n in os.listdir(folder) if ".partial-" in n), flush=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # short sleeps: a signal another thread receives is handled soon
            time.sleep(0.01)


    if POINT == "sampling":
        from kandinsky5.models.dit import Kandinsky5Transformer3DModel

        forward, calls = Kandinsky5Transformer3DModel.forward, []

        def slow_forward(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                stall()
            return forward(self, *args, **kwargs)

        Kandinsky5Transformer3DModel.forward = slow_forward
    else:
        import av

        encode = av.video.stream.VideoStream.encode

        def slow_encode(stream, frame=None):
            packets = encode(stream, frame)
            if frame is None:  # the flush: half the packets written, then stall
                stream.container.mux(packets[: len(packets) // 2])
                stall()
            return packets

        av.video.stream.VideoStream.encode = slow_encode
    sys.exit(cli.main(sys.argv[2:]))
    """
)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("interrupts") / "tiny-ckpt"
    assert main(["tiny-checkpoint", str(folder)]) == 0
    return folder


def interrupted_generate(checkpoint: Path, folder: Path, point: str, signum: int, steps: int = STEPS):
    """Run ``kandinsky5 generate`` until it stalls at ``point``, send ``signum``; (exit status, stderr, the
    temporary files the folder held when it stalled)."""
    wrapper = folder / "wrapper.py"
    wrapper.write_text(WRAPPER)
    out = folder / "out" / "video.mp4"
    out.parent.mkdir()
    command = [sys.executable, str(wrapper), point, "generate", "a red fox", "--model", str(checkpoint)]
    command += ["--out", str(out), "--height", "32", "--width", "48", "--frames", "5", "--steps", str(steps)]
    command += ["--no-progress", "--device", "cpu"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + MARKER_TIMEOUT_S
        line = ""
        while not line.startswith("STALLED"):
            line = child.stdout.readline()
            assert line or child.poll() is None, f"the child ended before {point}: {child.stderr.read()}"
            assert time.monotonic() < deadline, f"no marker from the child within {MARKER_TIMEOUT_S} s"
        child.send_signal(signum)
        _, stderr = child.communicate(timeout=EXIT_TIMEOUT_S)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    return child.returncode, stderr, line.split()[1:], out


SIGNALS = {"SIGINT": (signal.SIGINT, 130), "SIGTERM": (signal.SIGTERM, 143)}
# (point, signal name) -> steps: a single step when only the write matters
CASES = {(point, name): STEPS if point == "sampling" else 1 for point in ("sampling", "writing") for name in SIGNALS}


@pytest.fixture(scope="module")
def interrupted_runs(tiny_checkpoint, tmp_path_factory):
    """The four interrupted runs, started together (each spends most of its time importing and loading):
    (point, signal name) -> a future of :func:`interrupted_generate`'s result."""
    with ThreadPoolExecutor(len(CASES)) as pool:
        return {
            (point, name): pool.submit(
                interrupted_generate,
                tiny_checkpoint,
                tmp_path_factory.mktemp(f"{point}-{name}"),
                point,
                SIGNALS[name][0],
                steps,
            )
            for (point, name), steps in CASES.items()
        }


def assert_nothing_partial(out: Path):
    assert not out.exists()
    assert temporary_paths(out.parent) == []


@pytest.mark.parametrize("name", SIGNALS)
def test_interrupt_during_sampling(interrupted_runs, name):
    code, stderr, _, out = interrupted_runs["sampling", name].result()
    assert code == SIGNALS[name][1], stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert re.fullmatch(
        rf"kandinsky5: interrupted by {name} during sampling \(step [1-{STEPS}] of {STEPS}\); no partial file was left",
        lines[0],
    ), lines[0]
    assert_nothing_partial(out)
    assert os.listdir(out.parent) == []  # nothing was written


@pytest.mark.parametrize("name", SIGNALS)
def test_interrupt_while_writing(interrupted_runs, name):
    code, stderr, partial, out = interrupted_runs["writing", name].result()
    assert len(partial) == 1 and partial[0].startswith(".video.mp4.partial-")  # the signal came mid-write
    assert code == SIGNALS[name][1], stderr
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    # one line: where it stopped, and the sampled latents kept (with the command that decodes them)
    assert lines[0].startswith(f"kandinsky5: interrupted by {name} while writing {out}; no partial file was left; ")
    assert "the sampled latents are kept in" in lines[0] and "kandinsky5 decode" in lines[0]
    assert_nothing_partial(out)


# ---------------------------------------------------------------------------------------------- in-process


def test_sigterm_in_process_is_reported_and_the_handlers_restored(capsys, monkeypatch):
    import kandinsky5.cli.main as cli

    def terminated(args):
        signal.raise_signal(signal.SIGTERM)
        raise AssertionError("SIGTERM did not interrupt the command")

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(cli, "cmd_models", terminated)
    assert main(["models"]) == 143
    assert capsys.readouterr().err == "kandinsky5: interrupted by SIGTERM; no partial file was left\n"
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_interrupted_tiny_checkpoint_names_the_folder(tmp_path, capsys, monkeypatch):
    import kandinsky5.tiny as tiny

    def interrupted(root, *args, **kwargs):
        signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(tiny, "write_tiny_text_components", interrupted)
    folder = tmp_path / "ckpt"
    assert main(["tiny-checkpoint", str(folder)]) == 130
    assert (
        capsys.readouterr().err
        == f"kandinsky5: interrupted by SIGINT while writing {folder}; no partial file was left\n"
    )
    assert os.listdir(tmp_path) == []


def test_an_ignored_sigint_stays_ignored(monkeypatch):
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with InterruptSignals():
            assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
            signal.raise_signal(signal.SIGINT)  # nothing happens
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_the_report_names_the_step_or_the_phase():
    from kandinsky5.sampling.control import Phase, RunControl

    times = PhaseTimes()
    control = RunControl(on_progress=times)
    progress = control.steps(50)
    progress.step_done()
    progress.step_done()
    assert times.current() == "sampling (step 3 of 50)"
    with pytest.raises(KeyboardInterrupt) as raised, interrupted_during("loading the model"):
        with interrupted_during(times.current), control.phase(Phase.DECODE):
            raise Interrupted(signal.SIGTERM)
    assert raised.value.stage == "decoding"  # the innermost stage named wins
    assert interrupt_report(raised.value) == (
        "kandinsky5: interrupted by SIGTERM during decoding; no partial file was left",
        143,
    )
    assert interrupt_report(KeyboardInterrupt())[1] == 130
