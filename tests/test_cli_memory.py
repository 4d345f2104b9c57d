"""The command line's memory modes: ``kandinsky5 plan``, ``--offload auto`` (generate and decode), ``--offload
blocks``, ``--quantize-transformer`` / ``--quantize-text-encoder``, and the feed-forward chunking a plan asks for.
No weights are loaded: loading is replaced by a recording stand-in, and GPUs are simulated by their free memory."""

import argparse
import re
from types import SimpleNamespace

import pytest
import torch
from conftest import REFERENCE_DIR

from kandinsky5.cli import plan as plan_cli
from kandinsky5.cli.main import decode_command, load_pipeline, main
from kandinsky5.runtime.memory_plan import (
    DEFAULT_MARGIN,
    GIB,
    Mode,
    Phase,
    PipelineConfigs,
    PlanInputs,
    choose_mode,
    format_gib,
    plan_memory,
)
from kandinsky5.variants import get_variant

PRO_CHECKPOINT = REFERENCE_DIR / "checkpoint-pro-5s"


@pytest.fixture(autouse=True)
def no_hub_cache(monkeypatch):
    """Official names get their built-in configs, whatever this machine's hub cache holds."""
    monkeypatch.setattr(plan_cli, "cached_checkpoint", lambda repo_id: None)


@pytest.fixture(scope="module")
def pro_plan():
    return plan_memory(PipelineConfigs.for_variant(get_variant("pro-sft-5s")), PlanInputs(768, 1280, 121))


def table_rows(out: str) -> dict[tuple[str, str], list[str]]:
    """``{(mode, phase): [GPU weights, activations, GPU peak, host, pinned]}`` of ``plan``'s table."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("mode "))
    rows, mode = {}, None
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        cells = re.split(r"\s{2,}", line.strip())
        if not line.startswith(" "):
            mode, cells = cells[0], cells[1:]
        rows[(mode, cells[0])] = cells[1:]
    return rows


# ---------------------------------------------------------------------------------------------------- plan


def test_plan_prints_every_mode_and_phase_and_picks_a_mode(capsys, pro_plan):
    assert main(["plan", "--model", "pro-sft-5s", "--free-gib", "24"]) == 0
    out = capsys.readouterr().out
    assert "1280x768, 121 frames: 119,040 visual tokens per video" in out
    assert "transformer 40.4 GiB (19.311 B)" in out and "text encoder 15.4 GiB (8.292 B)" in out
    rows = table_rows(out)
    tiled = pro_plan.replace(vae_tiling=True)
    for mode_plan in pro_plan.modes:
        for phase in mode_plan.phases:
            expected = [format_gib(x) for x in (phase.gpu_weights, phase.gpu_activations, phase.gpu, phase.host)]
            assert rows[(mode_plan.mode.value, phase.phase.value)][:4] == expected
        decode = tiled.mode(mode_plan.mode).phase(Phase.DECODING)
        assert rows[(mode_plan.mode.value, "decoding (tiled)")][2] == format_gib(decode.gpu)
    # the figures themselves: Pro's DiT needs 51.4 GiB with model offload, block streaming 13.3 GiB
    assert rows[("model", "sampling")][2] == "51.4 GiB" and rows[("blocks", "sampling")][2] == "13.3 GiB"
    assert rows[("blocks", "sampling")][4] == format_gib(pro_plan.mode(Mode.BLOCKS).phase(Phase.SAMPLING).host_pinned)
    choice = choose_mode(pro_plan, 24 * GIB)
    assert choice.mode is Mode.BLOCKS
    assert out.strip().splitlines()[-1] == f"free GPU memory: 24.0 GiB (--free-gib): {choice.reason}"


def test_plan_of_a_checkpoint_folder_reads_its_configs(capsys):
    """The reference's Pro config files give the table the built-in configs give; --seconds as generate's."""
    assert main(["plan", "--model", "pro-sft-5s", "--seconds", "5", "--free-gib", "24"]) == 0
    builtin = capsys.readouterr().out
    folder = ["plan", "--model", str(PRO_CHECKPOINT), "--height", "768", "--width", "1280", "--free-gib", "24"]
    assert main(folder) == 0
    from_files = capsys.readouterr().out
    assert f"({PRO_CHECKPOINT})" in from_files.splitlines()[0]
    assert table_rows(from_files) == table_rows(builtin)
    assert from_files.splitlines()[-1] == builtin.splitlines()[-1]


def test_plan_options_change_the_figures(capsys):
    assert main(["plan", "--model", "lite-sft-5s", "--free-gib", "10", "--quantize-text-encoder", "nf4"]) == 0
    out = capsys.readouterr().out
    plan = plan_memory(
        PipelineConfigs.for_variant(get_variant("lite-sft-5s")), PlanInputs(512, 768, 121, quantize_text_encoder="nf4")
    )
    assert "quantized: text encoder nf4" in out
    assert table_rows(out)[("model", "text encoding")][2] == format_gib(plan.mode(Mode.MODEL).phase(Phase.TEXT).gpu)
    assert out.strip().splitlines()[-1].endswith(choose_mode(plan, 10 * GIB).reason)


def test_plan_without_a_gpu_says_how_to_choose(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["plan", "--model", "lite-sft-5s"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("no GPU here: pass --free-gib")


@pytest.mark.parametrize(
    "options,expected",
    [
        (["--quantize-transformer", "fp4"], "--quantize-transformer: invalid choice: 'fp4' (choose from fp8, int8)"),
        (
            ["--quantize-text-encoder", "int4"],
            "--quantize-text-encoder: invalid choice: 'int4' (choose from int8, nf4)",
        ),
        (["--height", "500"], "--height"),
        (["--free-gib", "-1"], "--free-gib"),
        (["--batch", "0"], "--batch"),
    ],
)
def test_plan_bad_values_are_one_line(capsys, options, expected):
    try:
        code = main(["plan", "--model", "lite-sft-5s", *options])
    except SystemExit as exit_info:
        code = exit_info.code
    assert code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("kandinsky5: error:") and expected in line


def test_an_unknown_model_without_configs_is_refused(capsys):
    assert main(["plan", "--model", "someone/some-model"]) == 2
    assert "no configs for someone/some-model" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- generate


class RecordingPipeline:
    """Stands in for a loaded pipeline: records the calls that set it up, returns a few small frames."""

    model_variant = None

    def __init__(self):
        self.calls = []
        self.transformer = SimpleNamespace(
            cache=None, enable_forward_chunking=lambda chunk: self.calls.append(("enable_forward_chunking", chunk))
        )

    def __getattr__(self, name):
        if name.startswith(("enable_", "quantize", "fuse_")):
            return lambda *args, **kwargs: self.calls.append((name, args, kwargs))
        raise AttributeError(name)

    def to(self, device):
        self.calls.append(("to", str(device)))
        return self

    def set_progress_bar_config(self, **kwargs):
        pass

    def encode_prompt(self, prompt, **kwargs):
        return (prompt, None, None)

    def generate(self, request, control):
        return SimpleNamespace(frames=torch.zeros(1, 2, 2, 2, 16))

    def decode_latents(self, latents):
        return torch.zeros(1, 3, 5, 16, 16)

    def maybe_free_model_hooks(self):
        pass


@pytest.fixture
def recording(monkeypatch):
    import kandinsky5

    pipes = []

    def from_pretrained(cls, model, **kwargs):
        pipes.append(RecordingPipeline())
        return pipes[-1]

    for cls in (kandinsky5.Kandinsky5T2VPipeline, kandinsky5.Kandinsky5I2VPipeline):
        monkeypatch.setattr(cls, "from_pretrained", classmethod(from_pretrained))
    return pipes


def generate(tmp_path, *options):
    out = tmp_path / "v.mp4"
    return main(["generate", "a red fox", "--model", "lite-sft-5s", "--out", str(out), "--no-progress", *options])


def test_offload_auto_on_a_cpu_is_none_silently(recording, tmp_path, capsys):
    assert generate(tmp_path, "--device", "cpu", "--steps", "1") == 0
    (pipe,) = recording
    assert pipe.calls == [("to", "cpu")]
    assert "offload" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "options,expected",
    [
        (["--offload", "blocks"], "--offload moves networks between the CPU and a GPU; it needs --device cuda"),
        (
            ["--quantize-transformer", "fp8"],
            "--quantize-transformer fp8 needs bfloat16 weights; pass --dtype bfloat16 (got float32)",
        ),
    ],
)
def test_memory_options_refused_on_a_cpu_before_loading(recording, tmp_path, capsys, options, expected):
    assert generate(tmp_path, "--device", "cpu", *options) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == f"kandinsky5: error: {expected}"
    assert recording == []


def test_bad_quantize_value_is_one_line(recording, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        generate(tmp_path, "--device", "cpu", "--quantize-transformer", "int4")
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "--quantize-transformer" in line and "(choose from fp8, int8)" in line
    assert recording == []


def test_quantization_comes_before_placement(recording, tmp_path):
    options = ["--device", "cpu", "--dtype", "bfloat16", "--steps", "1"]
    assert generate(tmp_path, *options, "--quantize-transformer", "int8", "--quantize-text-encoder", "int8") == 0
    (pipe,) = recording
    assert pipe.calls == [("quantize", (), {"transformer": "int8", "text_encoder": "int8"}), ("to", "cpu")]


def load_args(**changes) -> SimpleNamespace:
    args = dict(
        model="lite-sft-5s",
        fuse_qkv=False,
        vae_channels_last=False,
        vae_tiling="auto",
        offload="blocks",
        quantize_transformer="int8",
        quantize_text_encoder="nf4",
        ff_chunk_tokens=8192,
        attention_backend=None,
        compile=False,
        cache_config=None,
        no_progress=True,
    )
    return SimpleNamespace(**(args | changes))


def test_load_pipeline_quantizes_then_streams_blocks_then_chunks(recording):
    device = torch.device("cuda")
    load_pipeline(load_args(), SimpleNamespace(image=None), device, torch.bfloat16)
    (pipe,) = recording
    assert pipe.calls == [
        ("quantize", (), {"transformer": "int8", "text_encoder": "nf4"}),
        ("enable_block_offload", (), {"device": device}),
        ("enable_forward_chunking", 8192),
    ]


def simulated_gpu(monkeypatch, free_bytes):
    """A CUDA device with ``free_bytes`` free, as the automatic choice sees it."""
    monkeypatch.setattr(plan_cli, "free_gpu_bytes", lambda device: free_bytes)
    return torch.device("cuda", 0)


def pro_request():
    return SimpleNamespace(height=768, width=1280, num_frames=121, uses_guidance=True, max_sequence_length=512)


def generate_args(offload: str) -> argparse.Namespace:
    variant = get_variant("pro-sft-5s")
    return argparse.Namespace(
        model=variant.repo_id,
        variant=variant,
        offload=offload,
        quantize_transformer=None,
        quantize_text_encoder=None,
        vae_tiling="auto",
    )


def test_offload_auto_on_a_gpu_says_the_mode_and_why(monkeypatch, capsys, pro_plan):
    device = simulated_gpu(monkeypatch, 24 * GIB)
    args = generate_args("auto")
    plan_cli.resolve_generate_offload(args, pro_request(), device, torch.bfloat16)
    choice = choose_mode(pro_plan, 24 * GIB)
    assert (args.offload, args.offload_asked, args.ff_chunk_tokens) == ("blocks", "auto", choice.ff_chunk_tokens)
    assert capsys.readouterr().err == f"kandinsky5: {choice.reason}\n"


def test_an_explicit_mode_short_of_memory_gets_feed_forward_chunks(monkeypatch, capsys, pro_plan):
    blocks = pro_plan.mode(Mode.BLOCKS).phase(Phase.SAMPLING).gpu
    least = pro_plan.replace(ff_chunk_tokens=64).mode(Mode.BLOCKS).phase(Phase.SAMPLING).gpu
    device = simulated_gpu(monkeypatch, int((blocks + least) / 2 * (1 + DEFAULT_MARGIN)))
    args = generate_args("blocks")
    plan_cli.resolve_generate_offload(args, pro_request(), device, torch.bfloat16)
    assert args.offload == "blocks" and args.ff_chunk_tokens is not None
    assert f"feed-forward in chunks of {args.ff_chunk_tokens} tokens" in capsys.readouterr().err


def test_decode_command_repeats_the_offload_asked_for():
    args = SimpleNamespace(
        model="lite-sft-5s", device="cuda", dtype="auto", vae_tiling="auto", vae_channels_last=False, offload="none"
    )
    for asked, expected in (("auto", []), ("none", ["--offload", "none"]), ("blocks", ["--offload", "blocks"])):
        args.offload_asked = asked
        command = decode_command(args, "v.latents.safetensors", "v.mp4").split()
        assert command[command.index("--device") + 2 :] == expected


@pytest.mark.parametrize("free_gib,mode", [(40, "none"), (3, "sequential")])
def test_decode_auto_keeps_the_vae_unless_it_does_not_fit(monkeypatch, capsys, free_gib, mode):
    device = simulated_gpu(monkeypatch, free_gib * GIB)
    args = SimpleNamespace(offload="auto", vae_tiling="auto", vae_folder=PRO_CHECKPOINT / "vae")
    header = SimpleNamespace(shape=(1, 31, 64, 96, 16))  # 121 frames at 512x768
    plan_cli.resolve_decode_offload(args, header, device, torch.bfloat16)
    assert (args.offload, args.offload_asked) == (mode, "auto")
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"kandinsky5: offload: {mode} (the VAE and its decode need ")


def test_offload_auto_without_configs_loads_resident_and_says_why(monkeypatch, capsys):
    device = simulated_gpu(monkeypatch, 24 * GIB)
    args = generate_args("auto")
    args.model, args.variant = "someone/some-model", None
    plan_cli.resolve_generate_offload(args, pro_request(), device, torch.bfloat16)
    assert (args.offload, args.ff_chunk_tokens) == ("none", None)
    assert capsys.readouterr().err.startswith("kandinsky5: offload: none (no memory plan: --model: no configs for ")


# ---------------------------------------------------------------------------------------------------- image models


def image_plan(name: str, height: int = 1024, width: int = 1024):
    variant = get_variant(name)
    inputs = PlanInputs(height, width, 1, max_sequence_length=variant.defaults.max_sequence_length)
    return plan_memory(PipelineConfigs.for_variant(variant), inputs)


@pytest.mark.parametrize("name", ["lite-t2i-sft", "lite-edit-sft"])
def test_plan_of_an_image_model(capsys, name):
    assert main(["plan", "--model", name, "--free-gib", "24"]) == 0
    out = capsys.readouterr().out
    plan = image_plan(name)
    what = "image editing" if "edit" in name else "text-to-image"
    assert f"1024x1024 {what}: 4,096 visual tokens per image; batch 1; guidance two calls per step" in out
    assert "frames" not in out and "transformer 12.4 GiB (6.022 B)" in out
    rows = table_rows(out)
    assert not any(phase == "decoding (tiled)" for _, phase in rows)  # the 2D VAE tiles only when told
    for mode_plan in plan.modes:
        for phase in mode_plan.phases:
            assert rows[(mode_plan.mode.value, phase.phase.value)][2] == format_gib(phase.gpu)
    assert ("vision tower" in out) == ("edit" in name)
    lines = out.strip().splitlines()
    assert lines[-2].startswith("image models: estimates") and "GPU measurement" in lines[-2]
    assert lines[-1] == f"free GPU memory: 24.0 GiB (--free-gib): {choose_mode(plan, 24 * GIB).reason}"
    assert choose_mode(plan, 24 * GIB).mode is Mode.MODEL


def test_plan_of_an_image_model_snaps_the_size(capsys, caplog):
    assert main(["plan", "--model", "lite-edit-sft", "--height", "1000", "--width", "1500", "--free-gib", "80"]) == 0
    captured = capsys.readouterr()
    assert "using 768x1280" in caplog.text  # the pipeline's warning
    assert "1280x768 image editing: 3,840 visual tokens per image" in captured.out
    plan = image_plan("lite-edit-sft", 768, 1280)
    assert table_rows(captured.out)[("blocks", "text encoding")][2] == format_gib(
        plan.mode(Mode.BLOCKS).phase(Phase.TEXT).gpu
    )


@pytest.mark.parametrize(
    "options,flags",
    [(["--seconds", "5"], "--seconds is a video option"), (["--frames", "9", "--fps", "8"], "--frames and --fps are")],
)
def test_plan_refuses_video_options_for_an_image_model(capsys, options, flags):
    assert main(["plan", "--model", "lite-t2i-sft", *options]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"kandinsky5: error: {flags}") and "text-to-image model: it makes still images" in line


def test_plan_of_an_image_checkpoint_folder(capsys, tmp_path):
    """A local editing checkpoint: its task from model_index.json, the 2D VAE from vae/config.json."""
    from kandinsky5.tiny import write_tiny_checkpoint

    folder = write_tiny_checkpoint(tmp_path / "edit", task="i2i")
    assert main(["plan", "--model", str(folder), "--free-gib", "1"]) == 0
    out = capsys.readouterr().out
    assert f"({folder})" in out.splitlines()[0] and "1024x1024 image editing" in out and "vision tower" in out


def image_generate_args(name: str, offload: str) -> argparse.Namespace:
    variant = get_variant(name)
    args = generate_args(offload)
    args.model, args.variant, args.task = variant.repo_id, variant, variant.task
    return args


def image_request(name: str):
    length = get_variant(name).defaults.max_sequence_length
    return SimpleNamespace(height=1024, width=1024, num_frames=1, uses_guidance=True, max_sequence_length=length)


@pytest.mark.parametrize("name", ["lite-t2i-sft", "lite-edit-sft"])
@pytest.mark.parametrize("free_gib,mode", [(48, "none"), (24, "model"), (12, "blocks")])
def test_offload_auto_for_an_image_model_uses_the_plan(monkeypatch, capsys, name, free_gib, mode):
    device = simulated_gpu(monkeypatch, free_gib * GIB)
    args = image_generate_args(name, "auto")
    plan_cli.resolve_generate_offload(args, image_request(name), device, torch.bfloat16)
    choice = choose_mode(image_plan(name), free_gib * GIB)
    assert (
        (args.offload, args.offload_asked, args.ff_chunk_tokens)
        == (mode, "auto", None)
        == (
            choice.offload,
            "auto",
            choice.ff_chunk_tokens,
        )
    )
    assert capsys.readouterr().err == f"kandinsky5: {choice.reason}\n"


def test_offload_auto_for_an_image_model_on_a_cpu_is_none_silently(capsys):
    args = image_generate_args("lite-t2i-sft", "auto")
    plan_cli.resolve_generate_offload(args, image_request("lite-t2i-sft"), torch.device("cpu"), torch.float32)
    assert args.offload == "none" and capsys.readouterr().err == ""
