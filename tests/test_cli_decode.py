"""Nothing lost, nothing half-written: ``generate`` samples and decodes separately, keeps the sampled latents when
decoding or writing fails, goes on with the next seed, and ``kandinsky5 decode`` turns kept latents into the video
``generate`` would have written."""

import dataclasses
import shlex

import av
import numpy as np
import PIL.Image
import pytest
import torch

from kandinsky5.cli.latents import LatentsFileError, latents_path_for, load_latents, read_header, save_latents
from kandinsky5.cli.main import PhaseTimes, decode_frames, main
from kandinsky5.pipelines.base import Kandinsky5PipelineBase
from kandinsky5.pipelines.i2v import NORMALIZED_LEADING_FRAMES
from kandinsky5.sampling.control import GenerationCancelled, Phase, ProgressEvent

SIZE = ["--height", "32", "--width", "48", "--frames", "5", "--steps", "2", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-ckpt")
    assert main(["tiny-checkpoint", str(folder)]) == 0
    return folder


def generate(checkpoint, out, *options):
    return main(["generate", "a red fox", "--model", str(checkpoint), "--out", str(out), *SIZE, *options])


def read_frames(path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)]), stream.average_rate


def out_of_memory_on_calls(monkeypatch, *failing_calls):
    """``decode_latents`` raises CUDA's out-of-memory error on the given calls (1-based), decodes otherwise."""
    decode = Kandinsky5PipelineBase.decode_latents
    calls = []

    def failing(self, latents):
        calls.append(len(calls) + 1)
        if calls[-1] in failing_calls:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB.\nGPU 0 has a total capacity")
        return decode(self, latents)

    monkeypatch.setattr(Kandinsky5PipelineBase, "decode_latents", failing)


# ---------------------------------------------------------------------------------------------- same videos as before


@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_latents_then_decode_is_the_one_call_video(tmp_path, task):
    """The CLI's two steps (output_type="latent", then the pipeline's decode and "np" conversion) give exactly the
    frames of one ``pipe.generate`` call with output_type="np". Image-to-video at 21 frames = 6 latent frames, so
    that its re-normalisation of the leading latent frames (finalize_latents) takes part."""
    from kandinsky5 import Kandinsky5I2VPipeline, Kandinsky5T2VPipeline
    from kandinsky5.pipelines.request import GenerationRequest

    folder = tmp_path / task
    assert main(["tiny-checkpoint", str(folder), "--task", task]) == 0
    pipeline_class = Kandinsky5I2VPipeline if task == "i2v" else Kandinsky5T2VPipeline
    pipe = pipeline_class.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    image = PIL.Image.new("RGB", (48, 32), (200, 40, 90)) if task == "i2v" else None
    frames = 21 if task == "i2v" else 9
    request = GenerationRequest.build(
        pipe.model_facts(), prompt="a fox", height=32, width=48, num_frames=frames, num_inference_steps=2, image=image
    )

    def seeded(output_type):
        return dataclasses.replace(request, generator=torch.Generator().manual_seed(7), output_type=output_type)

    expected = pipe.generate(seeded("np")).frames[0]
    latents = pipe.generate(seeded("latent")).frames
    if task == "i2v":
        assert latents.shape[1] > NORMALIZED_LEADING_FRAMES  # frames to re-normalise to: finalize_latents acts
    actual = decode_frames(pipe.decode_latents, latents)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape == (frames, 32, 48, 3)
    np.testing.assert_array_equal(actual, expected)


def test_cli_video_is_the_pipeline_video(tiny_checkpoint, tmp_path):
    """The MP4 of ``generate`` holds exactly the frames of the pipeline's one-call output, exported the same way."""
    from kandinsky5 import Kandinsky5T2VPipeline, export_to_video

    out = tmp_path / "cli.mp4"
    assert generate(tiny_checkpoint, out, "--seed", "5", "--fps", "12") == 0
    pipe = Kandinsky5T2VPipeline.from_pretrained(tiny_checkpoint)
    pipe.set_progress_bar_config(disable=True)
    video = pipe(
        "a red fox",
        height=32,
        width=48,
        num_frames=5,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(5),
        output_type="np",
    ).frames[0]
    export_to_video(video, str(tmp_path / "api.mp4"), fps=12, quality=9)
    cli_frames, rate = read_frames(out)
    api_frames, _ = read_frames(tmp_path / "api.mp4")
    assert rate == 12
    np.testing.assert_array_equal(cli_frames, api_frames)


# ---------------------------------------------------------------------------------------------- a failed decode


def test_failed_decode_keeps_the_latents_and_decode_writes_the_video(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    """An out-of-memory decode keeps the latents and prints one line with the decode command; that very command
    (the fps taken from the file) writes the video a successful run writes, frame for frame."""
    good = tmp_path / "good.mp4"
    assert generate(tiny_checkpoint, good, "--seed", "3", "--fps", "12") == 0
    capsys.readouterr()

    out = tmp_path / "video.mp4"
    with monkeypatch.context() as patch:
        out_of_memory_on_calls(patch, 1)
        assert generate(tiny_checkpoint, out, "--seed", "3", "--fps", "12") == 1
    captured = capsys.readouterr()
    latents = tmp_path / "video.latents.safetensors"
    assert latents.is_file() and not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left over
    (error,) = captured.err.strip().splitlines()
    assert error.startswith("kandinsky5: error: seed 3: decoding failed (OutOfMemoryError: CUDA out of memory")
    assert str(latents) in error
    command = error.split("decode them with: ")[1]
    assert command.startswith(f"kandinsky5 decode {latents} --model {tiny_checkpoint} --out {out}")
    assert "--vae-tiling on" in command  # the way out of an out-of-memory decode
    summary = captured.out.strip().splitlines()[-1]
    assert summary.startswith(f"{out}: FAILED, seed 3: decode (OutOfMemoryError)") and str(latents) in summary

    header = read_header(latents)
    assert header.shape == (1, 2, 4, 6, 16) and header.metadata["fps"] == "12" and header.metadata["seed"] == "3"

    assert main(shlex.split(command)[1:] + ["--device", "cpu"]) == 0
    assert f"{out}: ok, decoded from {latents}" in capsys.readouterr().out
    decoded, rate = read_frames(out)
    expected, _ = read_frames(good)
    assert rate == 12
    np.testing.assert_array_equal(decoded, expected)


def test_decode_loads_only_the_vae(tiny_checkpoint, tmp_path, monkeypatch):
    from kandinsky5.loading import diffusers_format

    with monkeypatch.context() as patch:
        out_of_memory_on_calls(patch, 1)
        assert generate(tiny_checkpoint, tmp_path / "v.mp4") == 1
    loaded = []
    load = diffusers_format.load_component

    def recording(cls, folder, *args, **kwargs):
        loaded.append((cls.__name__, folder.name))
        return load(cls, folder, *args, **kwargs)

    monkeypatch.setattr(diffusers_format, "load_component", recording)
    latents = tmp_path / "v.latents.safetensors"
    options = ["--vae-tiling", "on", "--vae-channels-last", "--quality", "7"]
    assert (
        main(["decode", str(latents), "--model", str(tiny_checkpoint), "--out", str(tmp_path / "v.mp4"), *options]) == 0
    )
    assert loaded == [("AutoencoderKLHunyuanVideo", "vae")]
    assert len(read_frames(tmp_path / "v.mp4")[0]) == 5


# ---------------------------------------------------------------------------------------------- several seeds


def test_several_seeds_go_on_after_failures(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    """Seed 2's decode runs out of memory and seed 3's video cannot be written: each is one line on stderr, seed 3
    still runs, the summary has one line per seed and the exit status is 1."""
    import kandinsky5.io

    export = kandinsky5.io.export_to_video

    def refusing_seed3(frames, path, **kwargs):
        if "seed3" in str(path):
            raise OSError(28, "No space left on device")
        return export(frames, path, **kwargs)

    out_of_memory_on_calls(monkeypatch, 2)
    monkeypatch.setattr(kandinsky5.io, "export_to_video", refusing_seed3)
    assert generate(tiny_checkpoint, tmp_path / "fox.mp4", "--seed", "1", "2", "3") == 1
    captured = capsys.readouterr()
    assert read_frames(tmp_path / "fox-seed1.mp4")[0].shape == (5, 32, 48, 3)
    assert not (tmp_path / "fox-seed2.mp4").exists() and not (tmp_path / "fox-seed3.mp4").exists()
    assert (tmp_path / "fox-seed2.latents.safetensors").is_file()
    assert (tmp_path / "fox-seed3.latents.safetensors").is_file() and (tmp_path / "fox-seed3.frames.npy").is_file()
    errors = captured.err.strip().splitlines()
    assert len(errors) == 2
    assert errors[0].startswith("kandinsky5: error: seed 2: decoding failed")
    assert errors[1].startswith(f"kandinsky5: error: seed 3: writing {tmp_path / 'fox-seed3.mp4'} failed")
    assert "No space left on device" in errors[1] and "fox-seed3.frames.npy" in errors[1]
    assert "kandinsky5 decode" in errors[1] and "--vae-tiling" not in errors[1]
    header, *seeds = captured.out.strip().splitlines()[-4:]
    assert header.startswith("kandinsky5: 3 of 3 seed(s) run, 2 failed; load ")
    assert "text encode" in header and "total" in header
    assert seeds[0].startswith(f"{tmp_path / 'fox-seed1.mp4'}: ok, seed 1, 48x32, 5 frames at 24 fps")
    for phase in ("s/step", "sampling", "decode", "write"):
        assert phase in seeds[0]
    assert seeds[1].startswith(f"{tmp_path / 'fox-seed2.mp4'}: FAILED, seed 2: decode (OutOfMemoryError)")
    assert seeds[2].startswith(f"{tmp_path / 'fox-seed3.mp4'}: FAILED, seed 3: write (OSError)")
    assert "fox-seed2.latents.safetensors" in seeds[1] and "fox-seed3.latents.safetensors" in seeds[2]


def test_cancel_after_sampling_keeps_the_latents(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    """A cancellation that comes after sampling (before the decode starts) stops the run, the latents kept."""
    run = Kandinsky5PipelineBase.generate

    def cancelled_after_sampling(self, request, control=None):
        output = run(self, request, control)
        control.cancel()
        return output

    monkeypatch.setattr(Kandinsky5PipelineBase, "generate", cancelled_after_sampling)
    with pytest.raises(GenerationCancelled):
        generate(tiny_checkpoint, tmp_path / "v.mp4", "--seed", "1", "2")
    assert (tmp_path / "v-seed1.latents.safetensors").is_file()
    assert not (tmp_path / "v-seed2.latents.safetensors").exists()  # seed 2 never ran
    assert "kandinsky5 decode" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- decode's checks


@pytest.fixture(scope="module")
def kept_latents(tiny_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("kept")
    path = save_latents(torch.randn(1, 2, 4, 6, 16), folder / "v.mp4", {"fps": 24, "quality": 9})
    assert path == folder / "v.latents.safetensors"
    return path


@pytest.mark.parametrize(
    "case,expected",
    [
        ("missing", "does not exist"),
        ("directory", "is not a file"),
        ("text", "not a latents file"),
        ("weights", "no 'latents' tensor"),
        ("foreign", "not one written by `kandinsky5 generate`"),
        ("out_dir", "does not exist"),
        ("out_suffix", ".mp4"),
        ("quality", "--quality"),
        ("fps", "--fps"),
        ("model", "model not found"),
        ("no_vae", "no 'vae' folder"),
        ("channels", "latent channels"),
        ("offload", "--offload"),
    ],
)
def test_decode_checks_everything_before_loading(
    tiny_checkpoint, kept_latents, tmp_path, capsys, monkeypatch, case, expected
):
    from safetensors.torch import save_file

    from kandinsky5.loading import diffusers_format

    def forbidden(*args, **kwargs):
        raise AssertionError("the VAE was loaded before the inputs were checked")

    monkeypatch.setattr(diffusers_format, "load_component", forbidden)
    latents, model, out, extra = str(kept_latents), str(tiny_checkpoint), str(tmp_path / "v.mp4"), []
    if case == "missing":
        latents = str(tmp_path / "nope.latents.safetensors")
    elif case == "directory":
        latents = str(tmp_path)
    elif case == "text":
        (tmp_path / "notes.txt").write_text("not latents")
        latents = str(tmp_path / "notes.txt")
    elif case == "weights":
        latents = str(tiny_checkpoint / "vae" / "diffusion_pytorch_model.safetensors")
    elif case == "foreign":
        save_file({"latents": torch.zeros(1, 2, 4, 6, 16)}, tmp_path / "x.safetensors", {"fps": "24"})
        latents = str(tmp_path / "x.safetensors")
    elif case == "out_dir":
        out = str(tmp_path / "missing" / "v.mp4")
    elif case == "out_suffix":
        out = str(tmp_path / "v.avi")
    elif case == "quality":
        extra = ["--quality", "11"]
    elif case == "fps":
        extra = ["--fps", "0"]
    elif case == "model":
        model = str(tmp_path / "no-model")
    elif case == "no_vae":
        model = str(tiny_checkpoint / "transformer")
    elif case == "channels":
        latents = str(save_latents(torch.zeros(1, 2, 4, 6, 8), tmp_path / "c.mp4", {}))
    elif case == "offload":
        extra = ["--offload", "model", "--device", "cpu"]
    assert main(["decode", latents, "--model", model, "--out", out, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("kandinsky5: error:") and expected in err


def test_help_lists_decode(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "decode" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["decode", "--help"])
    text = capsys.readouterr().out
    for option in ("--model", "--out", "--fps", "--quality", "--device", "--dtype", "--vae-tiling", "--offload"):
        assert option in text


# ---------------------------------------------------------------------------------------------- the latents file


def test_latents_file_round_trip_and_unique_names(tmp_path):
    latents = torch.randn(1, 3, 4, 6, 16).to(torch.bfloat16)
    first = save_latents(latents, tmp_path / "v.mp4", {"fps": 30, "prompt": "a fox — in snow", "image": None})
    second = save_latents(latents, tmp_path / "v.mp4", {})
    assert (first.name, second.name) == ("v.latents.safetensors", "v.latents-2.safetensors")
    assert latents_path_for(tmp_path / "v.mp4").name == "v.latents-3.safetensors"
    header = read_header(first)
    assert header.shape == (1, 3, 4, 6, 16) and header.dtype == "BF16"
    assert header.metadata["prompt"] == "a fox — in snow" and "image" not in header.metadata
    assert header.number("fps") == 30 and header.number("quality", 9.0) == 9.0
    loaded = load_latents(header)
    assert loaded.dtype == torch.bfloat16 and torch.equal(loaded, latents)


def test_latents_file_is_whole_or_absent(tmp_path, monkeypatch):
    """A write that fails midway leaves neither the file nor its temporary; an unwritable folder sends the latents
    to the temporary directory."""
    import os
    import tempfile

    def failing_replace(source, target):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", failing_replace)
        patch.setattr(tempfile, "gettempdir", lambda: str(tmp_path / "no-such-temp-dir"))
        with pytest.raises(OSError, match="could not save the latents anywhere"):
            save_latents(torch.zeros(1, 1, 1, 1, 16), tmp_path / "v.mp4", {})
    assert list(tmp_path.iterdir()) == []

    spare = tmp_path / "spare"
    spare.mkdir()
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(spare))
    kept = save_latents(torch.zeros(1, 1, 1, 1, 16), tmp_path / "gone" / "v.mp4", {})
    assert kept == spare / "v.latents.safetensors" and read_header(kept).shape == (1, 1, 1, 1, 16)


def test_latents_file_of_a_batch_is_refused(tmp_path):
    path = save_latents(torch.zeros(2, 1, 1, 1, 16), tmp_path / "v.mp4", {})
    with pytest.raises(LatentsFileError, match="expected latents of shape"):
        read_header(path)


# ---------------------------------------------------------------------------------------------- phase times


def test_phase_times_from_progress_events():
    times = PhaseTimes()
    events = [
        (Phase.ENCODE_TEXT, 0, 1, 0.0),
        (Phase.ENCODE_TEXT, 1, 1, 0.5),
        (Phase.DENOISE, 0, 2, 0.5),
        (Phase.DENOISE, 1, 2, 1.5),
        (Phase.DENOISE, 2, 2, 2.5),
        (Phase.DECODE, 0, 1, 2.5),
        (Phase.DECODE, 1, 1, 4.0),
        (Phase.WRITE, 0, 1, 4.0),  # never finished: a failed write
    ]
    for phase, completed, total, elapsed in events:
        times(ProgressEvent(phase, completed, total, elapsed, None))
    assert times.seconds(Phase.ENCODE_TEXT) == 0.5
    assert times.seconds(Phase.DENOISE) == 2.0 and times.seconds_per_step() == 1.0
    assert times.seconds(Phase.DECODE) == 1.5
    assert times.seconds(Phase.WRITE) == 0.0 and not times.ran(Phase.WRITE) and times.ran(Phase.DECODE)
