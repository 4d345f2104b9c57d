"""The benchmark scripts still run: ``bash benchmarks/gpu_check.sh --smoke`` runs every part of the GPU check (the
forward, VAE, attention, pipeline and memory benchmarks, with the arguments of the GPU run plus ``--smoke``) on tiny
models on the CPU, in one process, and its JSON must list every part, report float32-close numbers and stay within
the files a device run brings back. The shell script's
own bookkeeping (time boxes, the summary after each part, the verdict) is checked on a part that needs no GPU.

No timing is asserted here; timings come from GPU runs of the scripts themselves.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tolerances import FORWARD_REORDER_RELATIVE_L2, PIPELINE_FRAMES_RELATIVE_L2, VAE_DECODE_RELATIVE_L2

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import gpu_check  # noqa: E402  (imports no torch)

GPU_CHECK = ["bash", str(BENCHMARKS / "gpu_check.sh")]
FORWARD_VARIANTS = ("eager", "fused", "compiled", "fused+compiled")


def run_gpu_check(out: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*GPU_CHECK, *args], env={**os.environ, "OUT": str(out), **env}, capture_output=True, text=True, timeout=600
    )


def read(out: Path, name: str) -> dict:
    return json.loads((out / name).read_text())


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpu-check-smoke")
    done = run_gpu_check(out, "--smoke")
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-6000:]
    return out


def test_gpu_check_smoke_lists_every_part(smoke):
    summary = read(smoke, gpu_check.SUMMARY)
    assert summary["smoke"] is True
    assert summary["status"] == "ok"
    statuses = {part["name"]: part["status"] for part in summary["parts"]}
    # nothing to install, but the packages are checked; tests/test_gpu.py needs the GPU machine: skipped, with the
    # reason; every measured part ran
    assert statuses == {"install": "ok", "gpu-tests": "skipped", **dict.fromkeys(gpu_check.MEASURED, "ok")}
    assert list(statuses) == list(gpu_check.PARTS)
    entries = {part["name"]: part for part in summary["parts"]}
    for name in gpu_check.PARTS:
        if name in gpu_check.INLINE_PARTS:  # folded into the summary, its file removed
            part = entries[name]["detail"]
            assert entries[name]["json"] is None and not (smoke / f"gpu-check-{name}.json").exists()
        else:
            part = read(smoke, f"gpu-check-{name}.json")
        assert part["status"] == statuses[name]
        if name in gpu_check.MEASURED:
            assert part["result"]["benchmark"]
            assert part["command"].endswith("--smoke")
    assert entries["install"]["detail"]["versions"]["diffusers"] == gpu_check.DIFFUSERS_VERSION
    # the device tool brings back at most MAX_FILES files: the summary, the log and one JSON per part but install
    assert sorted(path.name for path in smoke.iterdir()) == sorted(
        [gpu_check.SUMMARY, "gpu-check.log"]
        + [f"gpu-check-{name}.json" for name in gpu_check.PARTS if name not in gpu_check.INLINE_PARTS]
    )
    assert len(list(smoke.iterdir())) <= gpu_check.MAX_FILES


def test_gpu_check_smoke_numbers_within_float32_bounds(smoke):
    """Same weights on both sides, float32: ours equals diffusers up to the summation order of its kernels."""
    l2 = read(smoke, gpu_check.SUMMARY)["relative_l2_vs_diffusers"]
    forward = {f"forward kandinsky5 {variant}" for variant in FORWARD_VARIANTS}
    vae = {"vae kandinsky5", "vae kandinsky5 channels-last"}
    assert set(l2) == forward | vae | {"pipeline frames", "memory frames, tiled VAE"}
    # the eager forward does diffusers' arithmetic operation for operation: bit-equal
    assert l2["forward kandinsky5 eager"] == 0.0
    # fused projections sum in another order; compiled variants run eagerly in smoke runs (their inductor numbers
    # are tests/test_compile.py's)
    assert max(l2[key] for key in forward) <= FORWARD_REORDER_RELATIVE_L2
    # the VAE's per-frame causal attention sums in another order; channels-last convolutions too
    assert max(l2[key] for key in vae) <= VAE_DECODE_RELATIVE_L2
    assert l2["pipeline frames"] <= PIPELINE_FRAMES_RELATIVE_L2
    # diffusers' model-offload frames against our resident ones (VAE tiling on in both)
    assert l2["memory frames, tiled VAE"] <= PIPELINE_FRAMES_RELATIVE_L2


def test_gpu_check_smoke_reports_what_the_gpu_run_needs(smoke):
    summary = read(smoke, gpu_check.SUMMARY)
    heads = {part["name"]: part.get("headline", {}) for part in summary["parts"]}
    # the pipeline's 50-step extrapolation: fixed costs + 50 x the mean step
    for label in ("kandinsky5", "diffusers"):
        row = heads["pipeline"][label]
        expected = row["fixed_seconds"] + 50 * row["seconds_per_step"]
        assert row["end_to_end_seconds_at_50_steps"] == pytest.approx(expected)
    # NABLA at both densities, with the first call's (compile) time
    (size,) = [value for key, value in heads["attention"].items() if key.startswith("L=")]
    assert size["compile_seconds"] is not None
    nabla = [key for key in size if key.startswith("nabla flex")]
    assert len(nabla) == 2 and "nabla flex 100%" in nabla
    # the VAE's layout audit of one short decode per layout: the default layout has no channels-last input
    # anywhere (only the attention's token reshape hands back a channels-last permuted view); in the channels-last
    # run GroupNorm keeps the layout it is given and convolutions receive it
    vae = read(smoke, "gpu-check-vae.json")["result"]
    default, channels_last = vae["default_layout"], vae["channels_last_layout"]
    assert {kind: count["channels_last_in"] for kind, count in default.items()} == dict.fromkeys(default, 0)
    assert default["CausalFrameAttention"] == {"calls": 1, "channels_last_in": 0, "channels_last_out": 1}
    assert {kind: count["calls"] for kind, count in channels_last.items()} == {
        kind: count["calls"] for kind, count in default.items()
    }
    assert 0 < channels_last["GroupNorm"]["channels_last_in"] == channels_last["GroupNorm"]["channels_last_out"]
    assert channels_last["Conv3d"]["channels_last_in"] > 0
    # memory: the issue's Lite modes, each with its three phases' peaks (None on a CPU) and its step time against
    # resident; offloading changes no arithmetic
    memory = heads["memory"]
    assert list(memory) == ["resident", "blocks", "model", "diffusers model"]
    for label, row in memory.items():
        assert list(row["phase_peaks_gib"]) == ["text encoding", "sampling", "decoding"]
        assert row["seconds_per_step"] > 0 and row["slowdown_vs_resident"] > 0
        if label != "resident":
            assert row["frames_relative_l2_vs_resident"] <= PIPELINE_FRAMES_RELATIVE_L2
    assert memory["blocks"]["frames_relative_l2_vs_resident"] == 0.0


def test_gpu_check_skips_a_part_whose_time_box_is_too_short(tmp_path):
    """Outside --smoke (the GPU run's path): a part whose box, or the budget's rest, is under the minimum is not
    started but recorded as skipped, with the reason."""
    done = run_gpu_check(tmp_path, "--parts", "gpu-tests", GPU_CHECK_BOXES="gpu-tests=1")
    assert done.returncode == 0, done.stdout + done.stderr
    summary = read(tmp_path, gpu_check.SUMMARY)
    assert summary["smoke"] is False and summary["status"] == "ok"
    statuses = {part["name"]: part["status"] for part in summary["parts"]}
    others = dict.fromkeys((name for name in gpu_check.PARTS if name != "gpu-tests"), "not requested")
    assert statuses == {"gpu-tests": "skipped", **others}
    assert read(tmp_path, "gpu-check-gpu-tests.json")["reason"].startswith("a time box of 1 s")
    assert "gpu-tests  skipped" in done.stdout  # the verdict table closes the output


def test_gpu_check_install_part_names_what_the_gpu_run_would_lack(tmp_path):
    import torch

    rc = gpu_check.check_install(tmp_path, smoke=False)
    install = read(tmp_path, "gpu-check-install.json")
    assert install["versions"]["diffusers"] == gpu_check.DIFFUSERS_VERSION
    if not torch.cuda.is_available():
        assert rc == 1 and install["problems"] == ["torch sees no CUDA device"]


@pytest.mark.parametrize(("rc", "status"), [(0, "ok"), (1, "failed"), (124, "timeout"), (137, "timeout")])
def test_gpu_check_record_reads_the_exit_code(tmp_path, rc, status):
    gpu_check.init(tmp_path, False, 480, {"gpu-tests": 90}, ["gpu-tests"])
    log = "tests/test_gpu.py::test_a PASSED\ntests/test_gpu.py::test_b FAILED\n==== 1 failed, 1 passed in 3.0s ====\n"
    summary = gpu_check.record(tmp_path, "gpu-tests", rc, 12.0, log=log)
    (entry,) = [part for part in summary["parts"] if part["name"] == "gpu-tests"]
    assert entry["status"] == status
    assert entry["headline"] == {"failed": 1, "passed": 1}
    part = read(tmp_path, "gpu-check-gpu-tests.json")
    assert part["tests"]["outcomes"] == {"tests/test_gpu.py::test_a": "PASSED", "tests/test_gpu.py::test_b": "FAILED"}
    assert ("log_tail" in part) == (status != "ok")


def test_gpu_check_targets_read_the_gpu_figures(tmp_path):
    """The summary checks the README's targets on the headline of each part that ran (here made-up GPU figures)."""
    gpu_check.init(tmp_path, False, 480, {}, ["forward", "attention", "memory"])
    rows = {
        "diffusers": {"seconds_per_forward": 1.9},
        "kandinsky5 eager": {"seconds_per_forward": 1.5, "relative_l2_vs_diffusers": 3e-3},
        "kandinsky5 compiled": {"seconds_per_forward": 1.2, "relative_l2_vs_diffusers": 2e-2},
    }
    kernels = [("dense cudnn", 1.0, 1.0), ("nabla flex", 0.0995, 7.5), ("nabla flex", 1.0, 0.7)]
    size = {
        "length": 47616,
        "recompiles_after_first_flex_call": 0,
        "rows": [
            {"kernel": k, "density": d, "ms": 34 / x, "first_call_s": 12.0, "speedup_vs_cudnn": x}
            for k, d, x in kernels
        ],
    }
    memory = {
        "resident": {"peak_allocated_gib": 24.1, "seconds_per_step": 2.6, "phases": {}},
        "blocks": {"peak_allocated_gib": 7.4, "seconds_per_step": 2.9, "slowdown_vs_resident": 2.9 / 2.6},
    }
    parts = (("forward", {"results": rows}), ("attention", {"sizes": [size]}), ("memory", {"results": memory}))
    for part, result in parts:
        gpu_check.write_json(tmp_path / f"gpu-check-{part}.json", {"part": part, "status": "ok", "result": result})
        summary = gpu_check.record(tmp_path, part, 0, 1.0)
    met = {name: target["met"] for name, target in summary["targets"].items()}
    assert met == {
        "forward: ours eager s/forward <= 1.32": False,
        "forward: ours compiled s/forward <= 1.32": True,
        "forward: ours eager relative L2 vs diffusers <= 1e-2": True,
        "forward: ours compiled relative L2 vs diffusers <= 1e-2": False,
        "attention: NABLA compile s <= 60": True,
        "attention: NABLA 10 % x faster than cuDNN >= 6": True,
        "attention: NABLA 100 % x faster than cuDNN >= 1/1.3": False,
        "memory: Lite 512x768x121 whole pipeline in blocks mode, peak GiB <= 8": True,
        "memory: Lite blocks mode s/step vs resident <= 1.10": False,
    }
    assert summary["status"] == "ok"  # the run went well; the targets are what it measured


def test_magcache_benchmark_smoke(capsys):
    """The MagCache benchmark runs exact and cached generations on the same weights; its decisions come from the
    Lite sft 5 s ratios alone, so 10 steps of CFG (20 calls) skip some calls and keep some."""
    import magcache

    result = magcache.run(["--smoke"], save=False)
    cached = result["magcache"]
    assert cached["total_calls"] == 20 and 0 < cached["skipped_calls"] < 20
    assert 0 < result["frames_relative_l2_vs_exact"] < 1  # it approximates
    assert "skipped" in capsys.readouterr().out


def test_memory_benchmark_smoke(monkeypatch, capsys):
    """Every mode of the memory benchmark runs on the same tiny weights (our transformer int8, so that the quantized
    path runs too), with the FP8 forward. Each row passes through the three phases in order; a phase's peak counters
    are reset once its network has arrived (checked here on the offload plans' bookkeeping: on a CPU there is no
    memory to read); offloading changes no arithmetic."""
    import memory

    pipes = {}

    def build_pipelines(components):
        pipes.update(original_build(components))
        return pipes

    original_build = memory.build_pipelines
    monkeypatch.setattr(memory, "build_pipelines", build_pipelines)
    settled = []  # (mode, phase, the networks our offload plan has on the device) at each reset of the counters
    original_settle = memory.PhaseMeter._settle

    def settle(self, *args):
        if self.current is not None and not self.settled:
            on_device = getattr(pipes["kandinsky5"]._offload_plan, "on_device", None)  # model and block offload
            settled.append((self.current, None if on_device is None else sorted(on_device)))
        return original_settle(self, *args)

    monkeypatch.setattr(memory.PhaseMeter, "_settle", settle)
    modes = "resident,blocks,model,sequential,diffusers"
    argv = ["--smoke", "--modes", modes, "--quantize-transformer", "int8", "--fp8-forward"]
    result = memory.run(argv, save=False)

    rows = result["results"]
    assert list(rows) == ["resident", "blocks", "model", "sequential", "diffusers model"]
    for label, row in rows.items():
        assert row["phase_order"] == list(memory.PHASES)
        assert set(row["phases"]) == set(memory.PHASES)
        assert all(phase["seconds"] >= 0 for phase in row["phases"].values())
        assert row["peak_allocated_gib"] is None  # no GPU
        assert row["seconds_per_step"] > 0 and row["slowdown_vs_resident"] > 0
        if label in ("blocks", "model", "sequential"):
            assert row["frames_relative_l2_vs_resident"] == 0.0
            assert row["quantize_transformer"] == "int8"
    # diffusers' transformer keeps the bf16... here float32 weights: its frames differ by the int8 error alone
    assert 0 < rows["diffusers model"]["frames_relative_l2_vs_resident"] < 0.1
    # two resets per row after the text encoding: once the DiT, then once the VAE has arrived (our model and block
    # offload: the network that has just left is gone by then); resident and sequential have nothing to wait for
    phases = [("sampling", ["transformer"]), ("decoding", ["vae"])]
    unplanned = [("sampling", None), ("decoding", None)]
    assert settled == unplanned + phases + phases + unplanned + unplanned
    fp8 = result["fp8_forward"]
    assert fp8["relative_l2"] <= memory.FP8_RELATIVE_L2_TARGET
    assert 1 < fp8["roofline_speedup_bound"] < 2
    assert set(result["targets"]) == {"smoke FP8 forward: speed-up >= 1.3", "smoke FP8 forward: relative L2 <= 0.03"}
    try:
        import kandinsky5.runtime.memory_plan  # noqa: F401
    except ImportError:
        pass
    else:  # the plan's estimate beside each row
        assert all(row["estimated_peak_gib"]["peak_gib"] > 0 for row in rows.values())
    out = capsys.readouterr().out
    assert "diffusers model" in out and "FP8" in out


def test_memory_targets_are_checked_on_the_blocks_row():
    import argparse

    import memory

    args = argparse.Namespace(height=512, width=768, frames=121)
    rows = {"resident": {}, "blocks": {"peak_allocated_gib": 7.9, "slowdown_vs_resident": 1.12}}
    targets = memory.check_targets("lite", args, rows, None)
    assert {key: t["met"] for key, t in targets.items()} == {
        "lite 512x768x121 blocks mode: whole-pipeline peak GiB <= 8": True,
        "lite 512x768x121 blocks mode: s/step vs resident <= 1.1": False,
    }
    args = argparse.Namespace(height=768, width=1024, frames=121)
    targets = memory.check_targets("pro", args, rows, {"speedup": 1.2, "relative_l2": 1e-2})
    assert {t["note"] for t in targets.values() if "note" in t} == {"measured at 768x1024x121"}
    assert targets["pro FP8 forward: speed-up >= 1.3"]["met"] is False
    assert targets["pro FP8 forward: relative L2 <= 0.03"]["met"] is True


@pytest.mark.parametrize("task", ["edit"])
def test_image_pipeline_benchmark_smoke(tmp_path, task):
    """``benchmarks/image_pipeline.py --smoke --edit`` as a user runs it: the tiny editing pipelines, ours and
    diffusers', on the same weights; its JSON holds each pipeline's figures and the images agree as the float32
    pipelines' frames do. One thread: the run costs ~11 s on a core, most of it imports. (Editing only: the
    text-to-image run is the same script without the image, and the suite's time is short.)"""
    out = tmp_path / "result.json"
    argv = [sys.executable, str(BENCHMARKS / "image_pipeline.py"), "--smoke", "--json", str(out)]
    argv += ["--edit"] if task == "edit" else []
    done = subprocess.run(argv, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-6000:]
    result = json.loads(out.read_text())
    assert result["task"] == task and result["model"] == "smoke"
    assert result["size"] == {"height": 1024, "width": 1024, "visual_tokens": 4096}
    assert result["steps"] == 2 and result["guidance_scale"] == 3.5 and result["offload"] is False
    assert result["image_shape"] == [1, 1024, 1024, 3]
    assert list(result["results"]) == list(result["vae_decode"]) == ["kandinsky5", "diffusers"]
    for row in result["results"].values():
        assert row["end_to_end_seconds"] > row["decode_seconds"] > 0 and row["seconds_per_step"] > 0
        assert row["fixed_seconds"] == pytest.approx(row["end_to_end_seconds"] - 2 * row["seconds_per_step"])
        assert row["peak_memory_gib"] is None  # no GPU
    assert all(row["seconds"] > 0 for row in result["vae_decode"].values())
    assert result["image_std"] > 0.01  # a picture, not a constant
    assert result["images_relative_l2_vs_diffusers"] <= PIPELINE_FRAMES_RELATIVE_L2
    assert "images relative L2 vs diffusers" in done.stdout
