"""The command line: a real MP4 from a tiny checkpoint, and one-line errors before any loading."""

import logging
import subprocess
import sys
from types import SimpleNamespace

import av
import PIL.Image
import pytest
import torch

from kandinsky5.cli.main import frames_for_seconds, main


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-ckpt")
    assert main(["tiny-checkpoint", str(folder)]) == 0
    return folder


# 64x96 pixels, 9 frames, 2 steps: big enough to read the video back meaningfully
VIDEO_64x96x9 = ["--height", "64", "--width", "96", "--frames", "9", "--steps", "2", "--no-progress"]
TINY_RUN = ["--height", "32", "--width", "48", "--frames", "5", "--no-progress"]


def generate_tiny(checkpoint, out, *options):
    """``kandinsky5 generate`` on the tiny checkpoint at a tiny size; ``options`` add to or override it."""
    return main(["generate", "a red fox", "--model", str(checkpoint), "--out", str(out), *TINY_RUN, *options])


def read_video(path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        return frames, stream.average_rate, stream.codec_context.name


def test_generate_writes_the_asked_video(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "video.mp4"
    code = main(
        [
            "generate",
            "a red fox in the snow",
            "--model",
            str(tiny_checkpoint),
            "--out",
            str(out),
            *VIDEO_64x96x9,
            "--fps",
            "12",
        ]
    )
    assert code == 0
    frames, rate, codec = read_video(out)
    assert len(frames) == 9
    assert frames[0].shape == (64, 96, 3)
    assert rate == 12
    assert codec == "h264"
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert str(out) in summary and "96x64" in summary and "9 frames" in summary and "s/step" in summary


def test_seconds_become_4k_plus_1_frames():
    assert frames_for_seconds(5, 24) == 121
    assert frames_for_seconds(10, 24) == 241
    assert frames_for_seconds(1, 24) == 25


def test_missing_model_directory_is_one_line_error(tmp_path, capsys):
    code = main(["generate", "x", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "v.mp4")])
    assert code != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not found" in err


def test_unwritable_output_is_rejected_before_loading(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    import kandinsky5.pipelines.base as base

    def forbidden(*args, **kwargs):
        raise AssertionError("the model was loaded before the output path was checked")

    monkeypatch.setattr(base.Kandinsky5PipelineBase, "from_pretrained", classmethod(forbidden))
    for out in (tmp_path / "missing-dir" / "v.mp4", tmp_path):
        code = main(["generate", "x", "--model", str(tiny_checkpoint), "--out", str(out)])
        assert code != 0
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("kandinsky5: error:")


@pytest.mark.parametrize(
    "extra,name",
    [
        (["--height", "100"], "--height"),
        (["--steps", "0"], "--steps"),
        (["--quality", "11"], "--quality"),
        (["--seconds", "-1"], "--seconds"),
    ],
)
def test_bad_options_are_named(tiny_checkpoint, tmp_path, capsys, extra, name):
    code = main(["generate", "x", "--model", str(tiny_checkpoint), "--out", str(tmp_path / "v.mp4"), *extra])
    assert code == 2
    assert name in capsys.readouterr().err


def test_hub_id_offline_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(
        [
            "generate",
            "x",
            "--model",
            "kandinskylab/no-such-model-Diffusers",
            "--out",
            str(tmp_path / "v.mp4"),
            "--device",
            "cpu",
        ]
    )
    assert code != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "offline" in err and "local directory" in err


def test_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "kandinsky5", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "generate" in result.stdout


# ---------------------------------------------------------------------------------------------- models and variants


def test_models_lists_every_variant_with_its_defaults(capsys):
    from kandinsky5.variants import VARIANTS

    assert main(["models"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(VARIANTS)
    for line, variant in zip(lines, VARIANTS, strict=True):
        fields = line.split()
        assert fields[:3] == [variant.short_name, variant.repo_id, str(variant.task)]
        d = variant.defaults
        assert f"steps={d.num_inference_steps}" in fields and f"guidance={d.guidance_scale:.1f}" in fields
        assert f"height={d.height}" in fields and f"width={d.width}" in fields and f"frames={d.num_frames}" in fields
    distilled = next(line for line in lines if line.startswith("lite-distilled-5s "))
    assert "steps=16" in distilled and "guidance=1.0" in distilled


class FakePipeline:
    """Stands in for a loaded pipeline: records how it was loaded and the requests it ran, returns a few small
    frames."""

    loaded: list = []
    calls: list = []

    model_variant = None
    transformer = SimpleNamespace(cache=None)

    def __init__(self, pipeline_class, model):
        self.loaded.append((pipeline_class.__name__, model))

    def encode_prompt(self, prompt, **kwargs):
        return (prompt, None, None)  # stands in for the three embedding tensors

    def to(self, device):
        return self

    def set_progress_bar_config(self, **kwargs):
        pass

    def generate(self, request, control):
        self.calls.append(request)
        return SimpleNamespace(frames=torch.zeros(1, 2, 2, 2, 16))  # output_type="latent"

    def decode_latents(self, latents):
        return torch.zeros(1, 3, 5, 16, 16)  # 5 frames of 16x16

    def maybe_free_model_hooks(self):
        pass


@pytest.fixture
def fake_loading(monkeypatch):
    """from_pretrained of both pipeline classes returns a FakePipeline: no weights are read."""
    import kandinsky5
    from kandinsky5 import resolutions

    FakePipeline.loaded, FakePipeline.calls = [], []
    for cls in (kandinsky5.Kandinsky5T2VPipeline, kandinsky5.Kandinsky5I2VPipeline):
        monkeypatch.setattr(cls, "from_pretrained", classmethod(lambda c, model, **kw: FakePipeline(c, model)))
    monkeypatch.setattr(resolutions, "_warned_untrained", set())
    return FakePipeline


def generate(tmp_path, *options):
    return main(["generate", "a red fox", "--out", str(tmp_path / "v.mp4"), "--device", "cpu", *options])


@pytest.mark.parametrize(
    "short_name,repo_id,expected",
    [
        (
            "lite-distilled-5s",
            "kandinskylab/Kandinsky-5.0-T2V-Lite-distilled16steps-5s-Diffusers",
            dict(num_inference_steps=16, guidance_scale=1.0, height=512, width=768, num_frames=121),
        ),
        (
            "pro-sft-10s",
            "kandinskylab/Kandinsky-5.0-T2V-Pro-sft-10s-Diffusers",
            dict(num_inference_steps=50, guidance_scale=5.0, height=768, width=1280, num_frames=241),
        ),
    ],
)
def test_short_name_loads_its_hub_id_with_its_defaults(fake_loading, tmp_path, short_name, repo_id, expected):
    assert generate(tmp_path, "--model", short_name) == 0
    assert fake_loading.loaded == [("Kandinsky5T2VPipeline", repo_id)]
    request = fake_loading.calls[0]
    assert request.image is None and {k: getattr(request, k) for k in expected} == expected


def test_given_options_override_the_model_defaults(fake_loading, tmp_path):
    assert generate(tmp_path, "--model", "lite-nocfg-10s", "--steps", "7", "--guidance", "3", "--seconds", "5") == 0
    request = fake_loading.calls[0]
    assert (request.num_inference_steps, request.guidance_scale, request.num_frames) == (7, 3.0, 121)


def write_image(path, width, height):
    PIL.Image.new("RGB", (width, height), "blue").save(path)
    return path


def test_image_selects_image_to_video_and_a_size_of_its_shape(fake_loading, tmp_path):
    image = write_image(tmp_path / "portrait.png", 400, 600)
    assert generate(tmp_path, "--model", "pro-i2v-5s", "--image", str(image)) == 0
    assert fake_loading.loaded == [("Kandinsky5I2VPipeline", "kandinskylab/Kandinsky-5.0-I2V-Pro-sft-5s-Diffusers")]
    request = fake_loading.calls[0]
    assert isinstance(request.image, PIL.Image.Image) and request.image.size == (400, 600)
    assert (request.height, request.width) == (1280, 768)  # the portrait 1024-class size


def test_image_with_explicit_size(fake_loading, tmp_path):
    image = write_image(tmp_path / "square.png", 64, 64)
    assert generate(tmp_path, "--model", "lite-i2v-5s", "--image", str(image), "--height", "512", "--width", "768") == 0
    assert (fake_loading.calls[0].height, fake_loading.calls[0].width) == (512, 768)


@pytest.mark.parametrize(
    "options,expected",
    [
        (["--model", "lite-i2v-5s", "--image", "{missing}"], "--image"),
        (["--model", "lite-i2v-5s", "--image", "{not_an_image}"], "--image"),
        (["--model", "lite-sft-5s", "--image", "{image}"], "text-to-video"),
        (["--model", "pro-i2v-5s"], "--image"),
        (["--model", "lite-sft-5s", "--height", "2064"], "--height"),
        (["--model", "lite-sft-5s", "--frames", "601"], "--frames"),
        (["--model", "lite-sft-5s", "--seconds", "30"], "--seconds"),
        (["--model", "lite-sft-10s", "--width", "720"], "multiple of 128"),  # NABLA: whole 8x8 token tiles
        (["--model", "lite-sft-6s"], "kandinsky5 models"),
    ],
)
def test_bad_model_image_or_size_fails_before_loading(fake_loading, tmp_path, capsys, options, expected):
    files = dict(
        missing=tmp_path / "missing.png",
        not_an_image=tmp_path / "notes.png",
        image=write_image(tmp_path / "ok.png", 32, 32),
    )
    files["not_an_image"].write_text("not a picture")
    options = [o.format(**files) for o in options]
    assert generate(tmp_path, *options) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err
    assert fake_loading.loaded == []


def test_local_checkpoint_task_is_checked_before_loading(fake_loading, tiny_checkpoint, tmp_path, capsys):
    image = write_image(tmp_path / "ok.png", 32, 32)
    assert generate(tmp_path, "--model", str(tiny_checkpoint), "--image", str(image)) == 2
    assert "text-to-video" in capsys.readouterr().err and fake_loading.loaded == []


def test_untrained_size_is_warned_before_loading(fake_loading, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert generate(tmp_path, "--model", "lite-sft-5s", "--height", "480", "--width", "832") == 0
    warnings = [r.getMessage() for r in caplog.records if "trained" in r.getMessage()]
    assert len(warnings) == 1 and "480x832" in warnings[0] and "512x768" in warnings[0]


def test_several_seeds_encode_the_prompt_once(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    from kandinsky5.pipelines.base import Kandinsky5PipelineBase

    encoded = []
    encode = Kandinsky5PipelineBase.encode_prompt

    def counting(self, prompt, *args, **kwargs):
        encoded.append(prompt)
        return encode(self, prompt, *args, **kwargs)

    monkeypatch.setattr(Kandinsky5PipelineBase, "encode_prompt", counting)
    out = tmp_path / "fox.mp4"
    code = generate_tiny(tiny_checkpoint, out, "--steps", "2", "--guidance", "3", "--seed", "1", "2")
    assert code == 0
    assert len(encoded) == 2  # the prompt and the negative prompt, once for both seeds
    first, _, _ = read_video(tmp_path / "fox-seed1.mp4")
    second, _, _ = read_video(tmp_path / "fox-seed2.mp4")
    assert len(first) == len(second) == 5
    assert max(abs(a.astype(int) - b.astype(int)).max() for a, b in zip(first, second, strict=True)) > 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "seed 1" in lines[-2] and "seed 2" in lines[-1]


LUMA = (0.299, 0.587, 0.114)  # BT.601 weights, as the RGB -> YUV conversion of the export


def test_image_to_video_first_frame_carries_the_image(tmp_path):
    """--image: the MP4 starts from the image. A loose check, since a random-weight VAE does not reproduce images:

    1. the sampled latents keep the image's VAE latent as frame 0, exactly (drawn as the reference draws it:
       the noise first, then the image's posterior sample, from the seed's generator);
    2. the MP4's first frame equals the decode of those latents (within H.264 loss at quality 9, on luma);
    3. a different image gives a clearly different first frame (the random VAE damps differences: > 0.03).
    9 frames = 3 latent frames: too few for the reference's re-normalisation of the leading latent frames.
    """
    import numpy as np
    import torch
    from PIL import Image

    from kandinsky5 import Kandinsky5I2VPipeline

    folder = tmp_path / "tiny-i2v"
    assert main(["tiny-checkpoint", str(folder), "--task", "i2v"]) == 0
    pipe = Kandinsky5I2VPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    size = dict(height=64, width=96, num_frames=9, num_inference_steps=2)
    first_frames = []
    for color in ((230, 60, 30), (20, 90, 220)):
        pixels = np.zeros((64, 96, 3), dtype=np.uint8)
        pixels[:, :48] = color
        pixels[:, 48:] = 255 - np.array(color, dtype=np.uint8)
        image_path = tmp_path / f"image-{color[0]}.png"
        Image.fromarray(pixels).save(image_path)
        out = tmp_path / f"video-{color[0]}.mp4"
        code = main(
            [
                "generate",
                "a flag",
                "--model",
                str(folder),
                "--image",
                str(image_path),
                "--out",
                str(out),
                *VIDEO_64x96x9,
                "--seed",
                "0",
            ]
        )
        assert code == 0
        frames, _, _ = read_video(out)
        assert len(frames) == 9
        first_frames.append(frames[0].astype(np.float32) / 255)

        image = Image.open(image_path)
        latents = pipe(
            image, prompt="a flag", generator=torch.Generator().manual_seed(0), output_type="latent", **size
        ).frames
        generator = torch.Generator().manual_seed(0)
        torch.randn(latents.shape, generator=generator)  # the noise comes first
        image_latent = pipe.encode_image(image, 64, 96, generator, 1, "cpu")
        assert torch.equal(latents[:, :1], image_latent)
        decoded = np.clip(pipe.decode_latents(latents)[0, :, 0].permute(1, 2, 0).numpy() * 0.5 + 0.5, 0, 1)
        # compared on luma: yuv420p keeps it at full resolution (chroma is subsampled, lossy on noise-like frames)
        assert np.abs((first_frames[-1] - decoded) @ LUMA).mean() < 0.02
    assert np.abs(first_frames[0] - first_frames[1]).mean() > 0.03  # well above the codec error


@pytest.mark.parametrize(
    "extra,name",
    [
        (["--attention-backend", "warp"], "--attention-backend"),
        (["--attention-backend", "cudnn"], "--attention-backend"),
        (["--offload", "model", "--device", "cpu"], "--offload"),
    ],
)
def test_runtime_options_checked_before_loading(tiny_checkpoint, tmp_path, capsys, monkeypatch, extra, name):
    import kandinsky5.pipelines.base as base

    def forbidden(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(base.Kandinsky5PipelineBase, "from_pretrained", classmethod(forbidden))
    code = main(["generate", "x", "--model", str(tiny_checkpoint), "--out", str(tmp_path / "v.mp4"), *extra])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and name in err


def test_attention_backend_and_compile_options_reach_the_model(tiny_checkpoint, tmp_path, monkeypatch):
    from kandinsky5.models.dit import Kandinsky5Transformer3DModel

    seen = {}
    set_backend = Kandinsky5Transformer3DModel.set_attention_backend

    def recording(self, name):
        seen["backend"] = name
        set_backend(self, name)

    monkeypatch.setattr(Kandinsky5Transformer3DModel, "set_attention_backend", recording)
    monkeypatch.setattr(Kandinsky5Transformer3DModel, "compile", lambda self, **kw: seen.setdefault("compile", True))
    out = tmp_path / "v.mp4"
    code = generate_tiny(tiny_checkpoint, out, "--steps", "1", "--attention-backend", "math", "--compile")
    assert code == 0 and out.is_file()
    assert seen == {"backend": "math", "compile": True}


def test_unknown_vae_tiling_mode_is_refused_by_the_parser(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    import kandinsky5.pipelines.base as base

    def forbidden(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(base.Kandinsky5PipelineBase, "from_pretrained", classmethod(forbidden))
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "x", "--model", str(tiny_checkpoint), "--out", str(tmp_path / "v.mp4"), "--vae-tiling", "x"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--vae-tiling" in err and "auto" in err and "off" in err


@pytest.mark.parametrize("tiling", ["on", "off", "auto"])
def test_speed_options_reach_the_models(tiny_checkpoint, tmp_path, monkeypatch, tiling):
    """--fuse-qkv, --vae-channels-last and --vae-tiling set the pipeline up as the Python API does."""
    from kandinsky5.pipelines.base import Kandinsky5PipelineBase

    pipes = []
    load = Kandinsky5PipelineBase.from_pretrained.__func__

    def recording(cls, *args, **kwargs):
        pipes.append(load(cls, *args, **kwargs))
        return pipes[-1]

    monkeypatch.setattr(Kandinsky5PipelineBase, "from_pretrained", classmethod(recording))
    out = tmp_path / "v.mp4"
    options = ["--steps", "1", "--fuse-qkv", "--vae-channels-last", "--vae-tiling", tiling]
    assert generate_tiny(tiny_checkpoint, out, *options) == 0 and out.is_file()
    (pipe,) = pipes
    assert pipe.transformer.visual_transformer_blocks[0].self_attention.fused == ("to_query", "to_key", "to_value")
    weight = pipe.vae.decoder.conv_in.conv.weight
    assert weight.is_contiguous(memory_format=torch.channels_last_3d) and not weight.is_contiguous()
    if tiling == "on":
        assert pipe.vae.use_tiling  # forced tiles, whatever the automatic policy says
    else:
        assert (pipe.vae.use_tiling, pipe.vae.use_auto_tiling) == (False, tiling == "auto")


@pytest.mark.parametrize(
    "options,expected",
    [
        (["--seed", "-1"], "--seed must be within 0.."),
        (["--seed", str(2**64)], "--seed must be within 0.."),
        (["--seconds", "nan"], "--seconds must be a positive number"),
        (["--seconds", "inf"], "--seconds must be a positive number"),
        (["--quality", "nan"], "--quality"),
        (["--guidance", "nan"], "--guidance"),
        (["--device", "tpu"], "--device"),
        (["--device", "quantum:0"], "--device"),
        (["--out", "{existing}"], "pass --overwrite"),
        ([" "], "PROMPT"),
    ],
)
def test_bad_numbers_devices_and_outputs_fail_before_loading(fake_loading, tmp_path, capsys, options, expected):
    existing = tmp_path / "old.mp4"
    existing.write_bytes(b"an earlier video")
    options = [o.format(existing=existing) for o in options]
    if options == [" "]:  # an empty prompt
        argv = ["generate", " ", "--model", "lite-sft-5s", "--out", str(tmp_path / "v.mp4"), "--device", "cpu"]
    else:
        argv = ["generate", "a red fox", "--model", "lite-sft-5s", "--out", str(tmp_path / "v.mp4"), *options]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err
    assert fake_loading.loaded == []
    assert existing.read_bytes() == b"an earlier video"


def test_overwrite_replaces_an_existing_video(fake_loading, tmp_path):
    out = tmp_path / "v.mp4"
    out.write_bytes(b"an earlier video")
    assert generate(tmp_path, "--model", "lite-sft-5s", "--overwrite") == 0
    assert out.read_bytes()[4:8] == b"ftyp"  # an MP4 now


def test_tiny_checkpoint_refuses_a_folder_that_is_not_empty(tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    assert main(["tiny-checkpoint", str(folder)]) == 2
    assert "--force" in capsys.readouterr().err
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]


def test_progress_says_when_decoding_and_writing_start(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "v.mp4"
    argv = ["generate", "a red fox", "--model", str(tiny_checkpoint), "--out", str(out)]
    assert main(argv + ["--height", "32", "--width", "48", "--frames", "5", "--steps", "2"]) == 0
    err = capsys.readouterr().err
    assert err.index("kandinsky5: decoding the latents ...") < err.index("kandinsky5: writing the video ...")


def test_a_folder_that_is_no_checkpoint_is_refused_before_loading(tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    assert main(["generate", "a fox", "--model", str(folder), "--out", str(tmp_path / "v.mp4")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no checkpoint folder" in err


def test_argparse_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as raised:
        main(["generate", "a fox", "--model", "lite-sft-5s", "--out", "v.mp4", "--steps", "many"])
    assert raised.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--steps" in err and "--help" in err


@pytest.mark.parametrize(
    "options,expected",
    [
        (["--model", "lite-distilled-5s", "--cache", "magcache"], "no official"),
        (["--model", "lite-sft-5s", "--cache-threshold", "0.2"], "need --cache magcache"),
        (["--model", "lite-sft-5s", "--cache-ratios", "r.json"], "need --cache magcache"),
        (["--model", "lite-sft-5s", "--cache", "magcache", "--cache-ratios", "/no/such/ratios.json"], "--cache-ratios"),
        (["--model", "lite-sft-5s", "--cache", "magcache", "--cache-threshold", "nan"], "--cache-threshold"),
        (["--model", "lite-sft-5s", "--cache", "magcache", "--cache-threshold", "-1"], "--cache-threshold"),
    ],
)
def test_bad_cache_options_fail_before_loading(fake_loading, tmp_path, capsys, options, expected):
    assert generate(tmp_path, *options) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err
    assert fake_loading.loaded == []


def test_magcache_skips_model_calls_and_says_how_many(tiny_checkpoint, tmp_path, capsys):
    """A tiny checkpoint named after Lite sft 5 s gets its official ratios; a high threshold skips calls."""
    import shutil

    named = tmp_path / "Kandinsky-5.0-T2V-Lite-sft-5s-Diffusers"
    shutil.copytree(tiny_checkpoint, named)
    out = tmp_path / "v.mp4"
    cache = ["--cache", "magcache", "--cache-threshold", "10", "--guidance", "5"]
    assert generate_tiny(named, out, "--steps", "10", *cache) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    skipped, total = summary.split("cache skipped ")[1].split(" model calls")[0].split(" of ")
    assert int(total) == 20 and 0 < int(skipped) < int(total)


def test_calibrated_ratios_drive_the_cache_of_any_checkpoint(tiny_checkpoint, tmp_path, capsys):
    """A checkpoint without official ratios (the tiny one is no known variant) runs MagCache on a ratios file."""
    from kandinsky5.sampling.caches.calibration import save_ratios

    ratios = save_ratios(tmp_path / "ratios.json", {"condition": [0.97] * 9, "negative": [0.98] * 9})
    cache = ["--cache", "magcache", "--cache-ratios", str(ratios), "--cache-threshold", "0.5", "--guidance", "5"]
    assert generate_tiny(tiny_checkpoint, tmp_path / "v.mp4", "--steps", "10", *cache) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    skipped, total = summary.split("cache skipped ")[1].split(" model calls")[0].split(" of ")
    assert int(total) == 20 and 0 < int(skipped) < int(total)


def kohya_lora(path, rank: int = 2, seed: int = 0):
    """A kohya-format LoRA on the tiny checkpoint's first visual block's feed-forward (64 -> 128 -> 64)."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    layer = "lora_unet_visual_transformer_blocks_0_feed_forward_in_layer"
    tensors = {
        f"{layer}.lora_down.weight": torch.randn(rank, 64, generator=gen),
        f"{layer}.lora_up.weight": torch.randn(128, rank, generator=gen),
        f"{layer}.alpha": torch.tensor(float(rank)),
    }
    save_file(tensors, str(path), metadata={"trigger": "kndnsk5 style, "})
    return path


def test_lora_option_changes_the_video_and_scale_zero_does_not(tiny_checkpoint, tmp_path):
    lora = kohya_lora(tmp_path / "style.safetensors")
    runs = {
        "base": [],
        "lora": ["--lora", f"{lora}:1.0", "--no-trigger-words"],
        "zero": ["--lora", f"{lora}:0", "--no-trigger-words"],
        "trigger": ["--lora", f"{lora}:0"],  # scale 0: only the trigger words before the prompt change the video
    }
    frames = {}
    for name, options in runs.items():
        out = tmp_path / f"{name}.mp4"
        assert generate_tiny(tiny_checkpoint, out, "--seed", "1", *options) == 0
        frames[name] = read_video(out)[0]
    same = [(a == b).all() for a, b in zip(frames["base"], frames["zero"], strict=True)]
    assert all(same)
    assert any((a != b).any() for a, b in zip(frames["base"], frames["lora"], strict=True))
    assert any((a != b).any() for a, b in zip(frames["base"], frames["trigger"], strict=True))


def test_bad_lora_option_is_one_line_before_loading(tiny_checkpoint, tmp_path, capsys):
    code = generate_tiny(tiny_checkpoint, tmp_path / "v.mp4", "--lora", str(tmp_path / "missing.safetensors"))
    assert code != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--lora" in err


def test_expand_prompt_prints_the_expansion_first(tiny_checkpoint, tmp_path, capsys):
    assert generate_tiny(tiny_checkpoint, tmp_path / "v.mp4", "--expand-prompt", "--steps", "1") == 0
    lines = capsys.readouterr().out.splitlines()
    expanded = [line for line in lines if line.startswith("kandinsky5: expanded prompt: ")]
    assert len(expanded) == 1 and expanded[0] != "kandinsky5: expanded prompt: a red fox"
