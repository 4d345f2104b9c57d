"""``kandinsky5 generate`` under torchrun (``python -m torch.distributed.run``), on the CPU with gloo; and the
communication model of ``benchmarks/parallel_model.py``; the smoke run of ``benchmarks/parallel_overhead.py`` (a world
of one in this process).

Two real launches of two processes on the package's tiny checkpoint: one writes a video (Ulysses 2 with sharded
weights: rank 0 alone writes the one MP4 and prints), one has rank 1 raise after the first denoising step (the
fault-injection switch ``KANDINSKY5_FAIL_RANK``) and must end both processes with one line naming rank 1. Mistakes
found before loading (degrees that do not fit) are checked in this process, with torchrun's environment variables
set by hand: every rank stops at once with status 2, rank 0 alone printing one line.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import av
import pytest
import torch.distributed as dist
from parallel_helpers import free_port

from kandinsky5.cli.main import main
from kandinsky5.tiny import write_tiny_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]
# 9 frames at 64x64: 3 latent frames of 4x4 tokens, divisible by 2
SIZE = ["--height", "64", "--width", "64", "--frames", "9"]
# a launch that hangs instead of failing would sit in a collective for this long; the test gives up sooner
HANG_TIMEOUT_S = 600
LAUNCH_LIMIT_S = 180


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> str:
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-cli")))


def torchrun(nproc: int, arguments: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    command += ["--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "kandinsky5", *arguments]
    environ = dict(os.environ, GLOO_SOCKET_IFNAME="lo", KANDINSKY5_DIST_TIMEOUT=str(HANG_TIMEOUT_S), **(env or {}))
    return subprocess.run(command, capture_output=True, text=True, env=environ, cwd=REPO_ROOT, timeout=LAUNCH_LIMIT_S)


def our_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("kandinsky5:")]


def traceback_frames_of_ours(stderr: str) -> list[str]:
    """Traceback lines in our package's files (torchrun's own report of a failed process has a traceback too)."""
    return [line for line in stderr.splitlines() if re.search(r'File ".*kandinsky5/kandinsky5/', line)]


def test_torchrun_writes_one_video_and_rank_0_alone_prints(tiny_folder, tmp_path):
    out = tmp_path / "fox.mp4"
    arguments = ["generate", "A red fox", "--model", tiny_folder, "--out", str(out), *SIZE, "--steps", "2"]
    result = torchrun(2, [*arguments, "--device", "cpu", "--ulysses-degree", "2", "--shard-weights"])
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fox.mp4"]  # nothing else, no temporary left
    with av.open(str(out)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 9
    summary = our_lines(result.stdout)
    assert len(summary) == 1 and "1 of 1 seed(s) run, 0 failed" in summary[0], result.stdout
    assert "2 processes (Ulysses 2 x CFG 1, sharded weights)" in summary[0]
    assert [line for line in result.stdout.splitlines() if ": ok, seed 0, 64x64, 9 frames" in line] != []
    # the progress bar and the phase lines come from rank 0 alone
    assert result.stderr.count(" 0/2 [") == 1, result.stderr
    phases = [line[line.index("kandinsky5:") :] for line in re.split(r"[\r\n]", result.stderr) if "kandinsky5:" in line]
    assert phases == ["kandinsky5: decoding the latents ...", "kandinsky5: writing the video ..."], result.stderr


def test_a_failing_rank_stops_every_rank_with_one_line(tiny_folder, tmp_path):
    out = tmp_path / "fox.mp4"
    arguments = ["generate", "A red fox", "--model", tiny_folder, "--out", str(out), *SIZE, "--steps", "6"]
    start = time.monotonic()
    fail = {"KANDINSKY5_FAIL_RANK": "1", "KANDINSKY5_FAIL_AT_STEP": "1"}
    result = torchrun(2, [*arguments, "--device", "cpu", "--no-progress"], env=fail)
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    lines = our_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("kandinsky5: error: rank 1 of 2: seed 0: sampling failed (InjectedFault: ")
    assert traceback_frames_of_ours(result.stderr) == []
    assert our_lines(result.stdout) == []  # no summary: the run stopped
    assert list(tmp_path.iterdir()) == []
    # far from the collectives' timeout: the other rank did not wait for it
    assert elapsed < LAUNCH_LIMIT_S < HANG_TIMEOUT_S


def run_as_rank(monkeypatch, capsys, rank: int, world_size: int, arguments: list[str]) -> tuple[int, str, str]:
    """``main(arguments)`` as rank ``rank`` of a torchrun launch of ``world_size`` (the environment only: a check
    that fails before loading needs no other process)."""
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    status = main(arguments)
    captured = capsys.readouterr()
    assert not dist.is_initialized()
    return status, captured.out, captured.err


@pytest.mark.parametrize(
    "world_size, options, message",
    [
        (2, ["--ulysses-degree", "3"], "--ulysses-degree (3) must divide the world size (2 processes)"),
        (4, ["--ulysses-degree", "1", "--cfg-degree", "2"], "--ulysses-degree (1) x --cfg-degree (2) = 2 must equal"),
        (6, ["--cfg-degree", "3"], "--cfg-degree must be 1 or 2"),
        (6, ["--ulysses-degree", "3"], "--ulysses-degree 3 must divide the transformer's 4 attention heads"),
        (2, ["--cfg-degree", "2", "--guidance", "1"], "--cfg-degree 2 splits the two guidance branches"),
        (2, ["--shard-weights", "--quantize-transformer", "int8"], "--shard-weights and --quantize-transformer"),
    ],
    ids=["not-dividing", "product", "cfg-3", "heads", "cfg-without-guidance", "shard-quantized"],
)
def test_bad_parallel_options_stop_every_rank_with_one_line(
    tiny_folder, tmp_path, monkeypatch, capsys, world_size, options, message
):
    arguments = ["generate", "A red fox", "--model", tiny_folder, "--out", str(tmp_path / "x.mp4"), *SIZE]
    arguments += ["--device", "cpu", *options]
    status, out, err = run_as_rank(monkeypatch, capsys, 0, world_size, arguments)
    assert status == 2 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("kandinsky5: error: ") and message in err, err
    assert run_as_rank(monkeypatch, capsys, 1, world_size, arguments) == (2, "", "")  # silent elsewhere
    assert list(tmp_path.iterdir()) == []


def test_parallel_options_need_torchrun(tiny_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    arguments = ["generate", "A red fox", "--model", tiny_folder, "--out", str(tmp_path / "x.mp4"), *SIZE]
    assert main([*arguments, "--shard-weights", "--ulysses-degree", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kandinsky5: error: --ulysses-degree and --shard-weights need several processes")
    assert "torchrun --nproc-per-node N -m kandinsky5 generate" in err


def test_launch_environment_and_timeout():
    from kandinsky5.runtime.parallel.launch import Launch, collective_timeout, launch_from_environ

    assert launch_from_environ({}) is None
    assert launch_from_environ({"WORLD_SIZE": "1", "RANK": "0"}) is None
    assert launch_from_environ({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0"}) == Launch(2, 4, 0)
    with pytest.raises(ValueError, match="RANK is not set"):
        launch_from_environ({"WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match=r"RANK \(5\) must lie within 0..1"):
        launch_from_environ({"WORLD_SIZE": "2", "RANK": "5"})
    assert collective_timeout(None, {}).total_seconds() == 1800
    assert collective_timeout(None, {"KANDINSKY5_DIST_TIMEOUT": "30"}).total_seconds() == 30
    assert collective_timeout(12.5, {"KANDINSKY5_DIST_TIMEOUT": "30"}).total_seconds() == 12.5
    with pytest.raises(ValueError, match="positive"):
        collective_timeout(0, {})
    with pytest.raises(ValueError, match="KANDINSKY5_DIST_TIMEOUT must be a number"):
        collective_timeout(None, {"KANDINSKY5_DIST_TIMEOUT": "soon"})


def test_fault_injection_switch():
    from kandinsky5.runtime.parallel.failure import InjectedFault, fault_injection
    from kandinsky5.sampling.control import Phase, ProgressEvent

    assert fault_injection(1, {}) is None
    assert fault_injection(0, {"KANDINSKY5_FAIL_RANK": "1"}) is None
    fail = fault_injection(1, {"KANDINSKY5_FAIL_RANK": "1", "KANDINSKY5_FAIL_AT_STEP": "2"})
    fail(ProgressEvent(Phase.DENOISE, 1, 4, 0.0, None))  # not yet
    with pytest.raises(InjectedFault, match="after step 2"):
        fail(ProgressEvent(Phase.DENOISE, 2, 4, 0.0, None))


# ---------------------------------------------------------------------------------------- the communication model


def load_benchmark(name: str):
    path = REPO_ROOT / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)  # (it puts benchmarks/ on sys.path for its `common`)
    return module


def load_parallel_model():
    return load_benchmark("parallel_model")


def test_parallel_model_arithmetic(tmp_path, capsys):
    model = load_parallel_model()
    import common

    lite = model.ModelFacts.of("lite")
    assert lite.heads == 28
    params = 2_007_702_848  # shared/reference/README.md: Lite 2.008 B
    total = lite.block_bytes + lite.rest_bytes
    assert 2 * params < total < 2.5 * params  # bf16, with the float32 islands (modulation, time embedding)
    assert lite.block_bytes == 32 * lite.visual_block_bytes + 2 * lite.text_block_bytes
    link = model.Link()
    tokens = common.visual_tokens(common.LITE, 512, 768, 121)
    assert tokens == 47_616

    single = model.predict(lite, 512, 768, 121, 1, 1, False, link)
    flops = common.transformer_flops(common.LITE, tokens, model.TEXT_TOKENS)
    assert single["step_s"] == pytest.approx(2 * common.roofline_seconds(common.LITE, flops))  # 2 guidance calls
    assert single["ulysses_s"] == single["cfg_s"] == single["fsdp_exposed_s"] == 0

    # CFG 2: one call per rank, plus the velocity exchange (latent-sized)
    cfg = model.predict(lite, 512, 768, 121, 1, 2, False, link)
    velocity = 31 * 64 * 96 * 16 * 2
    assert cfg["cfg_s"] == pytest.approx(velocity / (450e9 * model.ALL_GATHER_EFFICIENCY) + model.COLLECTIVE_LATENCY_S)
    assert cfg["step_s"] == pytest.approx(single["step_s"] / 2 + cfg["cfg_s"])

    # Ulysses 4: per block 4 all-to-alls of this rank's (L / 4) x d bf16 tokens, 3/4 of each sent
    ulysses = model.predict(lite, 512, 768, 121, 4, 1, False, link)
    per_all_to_all = tokens / 4 * 1792 * 2 * 3 / 4
    assert ulysses["ulysses_bytes_per_call"] == pytest.approx(4 * 32 * per_all_to_all)
    gather = link.all_gather_s(tokens * 1792 * 2 * 3 / 4)
    assert ulysses["ulysses_s"] == pytest.approx(2 * (4 * 32 * link.all_to_all_s(per_all_to_all) + gather))
    assert single["compute_s"] / 4 < ulysses["compute_s"] < single["compute_s"] / 3.9  # text work stays whole

    # sharded weights: every block gathered per call, (N - 1) / N of it; a quarter of the block bytes per GPU
    sharded = model.predict(lite, 512, 768, 121, 4, 1, True, link)
    assert sharded["fsdp_bytes_per_call"] == pytest.approx(lite.block_bytes * 3 / 4)
    assert sharded["weights_gib"] * 2**30 == pytest.approx(lite.rest_bytes + lite.block_bytes / 4)
    assert sharded["step_s"] >= ulysses["step_s"]

    # layouts: Lite's 28 heads refuse Ulysses 8; Pro's 32 take it
    assert model.splits(8, 28, tokens) == [(4, 2)]
    assert model.splits(8, 32, tokens) == [(8, 1), (4, 2)]
    # VAE: 11 temporal chunks at 121 frames, shared round-robin
    assert model.decode_seconds(512, 768, 121, 1) == pytest.approx(model.DECODE_SECONDS)
    assert model.decode_seconds(512, 768, 121, 8) == pytest.approx(model.DECODE_SECONDS * 2 / 11)

    out = tmp_path / "model.json"
    assert model.main(["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert len(result["best"]) == len(model.CASES) * len(model.GPU_COUNTS)
    for row in result["rows"]:
        assert 0 < row["efficiency"] <= 1 + 1e-9 and row["speedup"] <= row["gpus"] + 1e-9
    assert "lite 5 s 512x768" in printed and "pro 10 s 768x1280" in printed


# ------------------------------------------------------------------------------ the overhead at degree 1 (smoke)


def test_parallel_overhead_smoke(monkeypatch, capsys):
    """``benchmarks/parallel_overhead.py --smoke``: the tiny DiT plain and in a gloo world of one after
    ``enable_parallelism(1, 1)``; nothing installed, equal outputs, the world gone afterwards (no timing judged)."""
    if sys.platform.startswith("linux"):
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    overhead = load_benchmark("parallel_overhead")
    assert not dist.is_initialized()
    result = overhead.run(["--smoke", "--repeats", "2"], save=False)
    assert not dist.is_initialized()
    assert result["backend"] == "gloo" and result["mesh"] == {"ulysses_degree": 1, "cfg_degree": 1, "world": 1}
    assert result["installed_at_degree_1"] == [] and result["outputs_equal"] and result["passed"]
    assert [len(values) for values in result["seconds"].values()] == [2, 2]
    assert isinstance(result["relative_overhead"], float)
    printed = capsys.readouterr().out
    assert "installed at degree 1: none; outputs equal bit for bit: True" in printed and "PASS" in printed
