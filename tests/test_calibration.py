"""MagCache calibration: the recorder's ratios against their definition, calibrate() on the tiny pipeline, the ratios
file fed back (recording again reproduces it; the cache it drives decides as an independent computation from the
file predicts), and ``kandinsky5 calibrate-cache``."""

from __future__ import annotations

import json

import pytest
import torch

from kandinsky5 import MagCacheConfig
from kandinsky5.cli.calibrate import read_prompts
from kandinsky5.cli.main import main
from kandinsky5.models.forward_context import Branch, ForwardContext
from kandinsky5.sampling.caches import MagnitudeRecorder, calibrate, load_ratios, save_ratios
from kandinsky5.sampling.caches.calibration import FILE_FORMAT, average_ratios, magnitude_ratio

SIZE = dict(height=32, width=48, num_frames=5, guidance_scale=5.0)
PROMPTS = ["a red fox", "a blue car in the rain"]
STEPS = 6
BOTH = (Branch.CONDITION, Branch.NEGATIVE)


# ---- the recorder on synthetic calls ----


def drive(recorder, residuals, batched=False):
    """Calls through ``recorder`` whose blocks add ``residuals[step][branch index]``; returns the inputs."""
    for step, per_branch in enumerate(residuals):
        groups = [BOTH] if batched else [(b,) for b in BOTH]
        for branches in groups:
            visual = torch.randn(len(branches), 5, 4)
            added = torch.cat([per_branch[BOTH.index(b)] for b in branches])
            out = recorder(lambda v, i, a=added: v + a, visual, None, context=ForwardContext(branches, step, 3))
            assert torch.equal(out, visual + added)


def test_recorder_ratio_is_the_mean_token_norm_ratio():
    torch.manual_seed(0)
    residuals = [[torch.randn(1, 5, 4) for _ in BOTH] for _ in range(3)]
    recorder = MagnitudeRecorder()
    drive(recorder, residuals)
    (generation,) = recorder.generations
    for index, branch in enumerate(BOTH):
        expected = []
        for step in (1, 2):
            now, before = residuals[step][index][0], residuals[step - 1][index][0]
            expected.append((now.norm(dim=-1) / before.norm(dim=-1)).mean().item())
        assert generation[branch] == pytest.approx(expected, rel=1e-6)
        assert generation[branch][0] == pytest.approx(
            magnitude_ratio(residuals[1][index], residuals[0][index]), rel=1e-6
        )
    # batched guidance records each half as two calls would; a second generation starts a new record
    batched = MagnitudeRecorder()
    drive(batched, residuals, batched=True)
    drive(batched, residuals, batched=True)
    assert len(batched.generations) == 2
    for branch in BOTH:
        assert batched.generations[0][branch] == pytest.approx(generation[branch], rel=1e-6)
    assert average_ratios(batched.generations)["negative"] == pytest.approx(generation[Branch.NEGATIVE], rel=1e-6)


def test_recorder_refuses_a_gap_and_ignores_calls_without_context():
    recorder = MagnitudeRecorder()
    run = lambda v, i: v + 1  # noqa: E731
    x = torch.ones(1, 2, 2)
    assert torch.equal(recorder(run, x, None, context=None), x + 1)
    assert recorder.generations == []
    recorder(run, x, None, context=ForwardContext((Branch.CONDITION,), 0, 4))
    with pytest.raises(RuntimeError, match="step 2"):
        recorder(run, x, None, context=ForwardContext((Branch.CONDITION,), 2, 4))


# ---- the tiny pipeline ----


@pytest.fixture
def pipe(our_pipeline):
    yield our_pipeline
    our_pipeline.transformer.disable_cache()


@pytest.fixture(scope="module")
def calibrated(our_pipeline):
    return calibrate(our_pipeline, PROMPTS, STEPS, seed=3, **SIZE)


def predicted_decisions(ratios, num_steps, threshold, max_skips=2, retention=0.2):
    """MagCache's rule written out from the file's per-branch ratios (1.0 prepended for step 0), one call counter
    over the generation (condition 2s, negative 2s+1): ``(step, branch, skipped)`` per call, in order."""
    per_branch = {branch: [1.0, *ratios[str(branch)]] for branch in BOTH}
    state = {branch: [1.0, 0.0, 0] for branch in BOTH}  # accumulated ratio, error, calls counted
    decisions = []
    for step in range(num_steps):
        for offset, branch in enumerate(BOTH):
            skip = False
            if 2 * step + offset >= int(2 * num_steps * retention):
                s = state[branch]
                s[0] *= per_branch[branch][step]
                s[2] += 1
                s[1] += abs(1 - s[0])
                skip = s[1] < threshold and s[2] <= max_skips
                if not skip:
                    state[branch] = [1.0, 0.0, 0]
            decisions.append((step, branch, skip))
    return decisions


def test_calibrate_gives_per_branch_ratios_averaged_over_prompts(pipe, calibrated):
    assert set(calibrated) == {"condition", "negative"}
    for values in calibrated.values():
        assert len(values) == STEPS - 1
        assert all(0 < r < 100 for r in values)
    # the average of each prompt's own calibration (prompt i from seed 3 + i)
    singles = [calibrate(pipe, [prompt], STEPS, seed=3 + i, **SIZE) for i, prompt in enumerate(PROMPTS)]
    for name, values in calibrated.items():
        expected = [(a + b) / 2 for a, b in zip(singles[0][name], singles[1][name], strict=True)]
        assert values == pytest.approx(expected, rel=1e-12)
    assert not pipe.transformer._stage_wrappers["visual_blocks"]  # the recorder is removed


def test_ratios_file_fed_back_reproduces_the_recorded_ratios(pipe, calibrated, tmp_path):
    path = save_ratios(tmp_path / "ratios.json", calibrated, {"model": "tiny", "prompts": PROMPTS})
    document = json.loads(path.read_text())
    assert document["format"] == FILE_FORMAT and document["steps"] == STEPS and document["model"] == "tiny"
    assert document["ratios"] == calibrated
    assert load_ratios(path) == {
        "ratios": {name: tuple(values) for name, values in calibrated.items()},
        "calibrated_steps": STEPS,
    }
    config = MagCacheConfig.from_ratios_file(path, threshold=0.0)
    assert config.calibrated_steps == STEPS
    for branch in BOTH:
        assert config.ratios_at(branch, STEPS) == (1.0, *calibrated[str(branch)])
    # the cache at threshold 0 runs every call: recording through it, same prompts and seeds, gives the file's ratios
    cache = pipe.transformer.enable_cache(config)
    recorder = MagnitudeRecorder()
    handle = pipe.transformer.wrap_stage("visual_blocks", recorder)
    try:
        for index, prompt in enumerate(PROMPTS):
            generator = torch.Generator("cpu").manual_seed(3 + index)
            pipe(prompt, num_inference_steps=STEPS, generator=generator, output_type="latent", **SIZE)
    finally:
        handle.remove()
    assert cache.skipped_calls == 0
    assert average_ratios(recorder.generations) == json.loads(path.read_text())["ratios"]


def test_cache_driven_by_the_file_decides_as_predicted(pipe, calibrated, tmp_path):
    path = save_ratios(tmp_path / "ratios.json", calibrated)
    ratios = json.loads(path.read_text())["ratios"]
    deviations = sorted(abs(1 - r) for values in ratios.values() for r in values)
    mixed = 0
    for threshold in (0.0, deviations[0] + 1e-9, deviations[len(deviations) // 2] + 1e-9, 10.0):
        cache = pipe.transformer.enable_cache(MagCacheConfig.from_ratios_file(path, threshold=threshold))
        generator = torch.Generator().manual_seed(0)
        pipe(PROMPTS[0], num_inference_steps=STEPS, generator=generator, output_type="latent", **SIZE)
        expected = predicted_decisions(ratios, STEPS, threshold)
        assert cache.decisions == expected
        mixed += 0 < cache.skipped_calls < cache.total_calls
    assert mixed > 0


def test_bad_ratios_files_are_refused(tmp_path):
    bad = tmp_path / "bad.json"
    for content in ("not json", "[]", '{"steps": 3, "ratios": {"condition": [1.0]}}', '{"steps": 3}'):
        bad.write_text(content)
        with pytest.raises(ValueError, match="bad.json"):
            load_ratios(bad)
    bad.write_text('{"steps": 3, "ratios": [1.0, 0.9, 1.1, 0.8]}')  # the original's interleaved layout
    assert MagCacheConfig.from_ratios_file(bad).ratios_at(Branch.NEGATIVE, 3) == (1.0, 0.9, 0.8)


# ---- the command ----


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-ckpt-calibrate")
    assert main(["tiny-checkpoint", str(folder)]) == 0
    return folder


def test_prompts_file_formats(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("a red fox\n\n  a blue car  \n")
    assert read_prompts(text) == ["a red fox", "a blue car"]
    table = tmp_path / "p.csv"
    table.write_text('prompt,concept\n"a fox, running",animal\n"a car",vehicle\n')
    assert read_prompts(table) == ["a fox, running", "a car"]


def test_bad_options_are_one_line_errors_before_loading(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    import kandinsky5.pipelines.base as base

    def forbidden(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(base.Kandinsky5PipelineBase, "from_pretrained", classmethod(forbidden))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    no_column = tmp_path / "table.csv"
    no_column.write_text("text,concept\na fox,animal\n")
    prompts = tmp_path / "ok.txt"
    prompts.write_text("a fox\n")
    existing = tmp_path / "exists.json"
    existing.write_text("{}")
    cases = [
        ["--prompts", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "r.json")],
        ["--prompts", str(empty), "--out", str(tmp_path / "r.json")],
        ["--prompts", str(no_column), "--out", str(tmp_path / "r.json")],
        ["--prompts", str(prompts), "--out", str(tmp_path / "r.txt")],
        ["--prompts", str(prompts), "--out", str(existing)],
        ["--prompts", str(prompts), "--out", str(tmp_path / "nope" / "r.json")],
        ["--prompts", str(prompts), "--out", str(tmp_path / "r.json"), "--steps", "1"],
        ["--prompts", str(prompts), "--out", str(tmp_path / "r.json"), "--height", "33"],
        ["--prompts", str(prompts), "--out", str(tmp_path / "r.json"), "--device", "tpu"],
    ]
    for options in cases:
        assert main(["calibrate-cache", "--model", str(tiny_checkpoint), *options]) == 2, options
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("kandinsky5: error:"), err
    assert existing.read_text() == "{}"


def test_command_writes_the_ratios_calibrate_gives(tiny_checkpoint, tmp_path, capsys):
    prompts = tmp_path / "bench.csv"
    prompts.write_text('prompt,concept\n"a red fox",animal\n"a blue car in the rain",vehicle\n"unused",x\n')
    out = tmp_path / "ratios.json"
    options = ["--height", "32", "--width", "48", "--frames", "5", "--guidance", "5", "--steps", "4", "--seed", "7"]
    code = main(
        ["calibrate-cache", "--model", str(tiny_checkpoint), "--prompts", str(prompts), "--limit", "2", "--out",
         str(out), "--device", "cpu", "--no-progress", *options]
    )  # fmt: skip
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and str(out) in lines[0]
    document = json.loads(out.read_text())
    assert document["steps"] == 4 and document["num_prompts"] == 2 and document["guidance_scale"] == 5.0
    config = MagCacheConfig.from_ratios_file(out)
    assert config.calibrated_steps == 4 and set(config.branch_ratios) == set(BOTH)

    from kandinsky5 import Kandinsky5T2VPipeline

    pipe = Kandinsky5T2VPipeline.from_pretrained(tiny_checkpoint)
    pipe.set_progress_bar_config(disable=True)
    assert document["ratios"] == calibrate(pipe, PROMPTS, 4, seed=7, **SIZE)
    # an existing file is replaced with --overwrite only
    assert main(["calibrate-cache", "--model", str(tiny_checkpoint), "--prompts", str(prompts), "--out", str(out)]) == 2
