"""The command line with the image models: ``generate`` writes PNG, JPEG or WebP images from the tiny text-to-image
and editing checkpoints (the pipeline's own images, pixel for pixel where the format is lossless), refuses what only
a video model takes and mismatched outputs in one line before loading, and leaves nothing half-written."""

import logging

import numpy as np
import PIL.Image
import pytest
import torch

import kandinsky5
from kandinsky5.cli.main import main
from kandinsky5.io.atomic import temporary_paths
from kandinsky5.io.image_output import check_image_output_path, save_image, save_options
from kandinsky5.tiny import write_tiny_checkpoint

PROMPT = "a red fox"
STEPS = ["--steps", "2", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-image-cli")
    return {task: write_tiny_checkpoint(root / task, task=task) for task in ("t2i", "i2i")}


@pytest.fixture(scope="session")
def pipelines(checkpoints):
    """The pipelines the command line should reproduce (float32 on the CPU, as ``--device cpu`` runs)."""
    classes = {"t2i": kandinsky5.Kandinsky5T2IPipeline, "i2i": kandinsky5.Kandinsky5I2IPipeline}
    pipes = {}
    for task, folder in checkpoints.items():
        pipe = classes[task].from_pretrained(folder, torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        pipes[task] = pipe
    return pipes


def pipeline_images(pipe, seed: int, *image, **options) -> list[np.ndarray]:
    """The pipeline's own images (``output_type="pil"``) for ``seed``, as uint8 arrays."""
    generator = torch.Generator("cpu").manual_seed(seed)
    output = pipe(*image, prompt=PROMPT, num_inference_steps=2, generator=generator, **options)
    return [np.asarray(picture) for picture in output.image]


@pytest.fixture(scope="session")
def reference(pipelines):
    """The text-to-image pipeline's image of seed 0 at the default 1024x1024."""
    return pipeline_images(pipelines["t2i"], 0)[0]


def generate(checkpoint, out, *options):
    return main(["generate", PROMPT, "--model", str(checkpoint), "--out", str(out), *STEPS, *options])


def read(path) -> tuple[np.ndarray, str]:
    with PIL.Image.open(path) as picture:
        return np.asarray(picture.convert("RGB")), picture.format


def test_text_to_image_png_is_the_pipeline_image(checkpoints, reference, tmp_path, capsys):
    out = tmp_path / "fox.png"
    assert generate(checkpoints["t2i"], out) == 0
    pixels, image_format = read(out)
    assert image_format == "PNG" and pixels.shape == (1024, 1024, 3)
    assert np.array_equal(pixels, reference)  # PNG is lossless: the very bytes of the pipeline's PIL image
    assert pixels.std() > 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith(f"{out}: ok, seed 0, 1024x1024, 2 steps") and "fps" not in summary
    assert temporary_paths(tmp_path) == []


@pytest.mark.parametrize(
    "name,image_format,options,tolerance",
    [
        ("fox.jpg", "JPEG", [], 12.0),  # quality 9: Pillow's 90, full-resolution colour
        ("fox.webp", "WEBP", ["--quality", "10"], 0.0),  # quality 10: lossless WebP
    ],
)
def test_jpeg_and_webp_by_the_suffix(checkpoints, reference, tmp_path, name, image_format, options, tolerance):
    out = tmp_path / name
    assert generate(checkpoints["t2i"], out, *options) == 0
    pixels, written_format = read(out)
    assert written_format == image_format and pixels.shape == reference.shape
    difference = np.abs(pixels.astype(int) - reference.astype(int)).mean()
    assert difference <= tolerance, difference


def test_untrained_size_is_snapped_with_a_warning_line(checkpoints, reference, tmp_path, capsys):
    """960x960 is no trained size: the nearest in aspect ratio, 1024x1024, is made, with a warning on stderr."""
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers.clear()  # as in a terminal: no logging configured (pytest's capture handlers set aside)
    try:
        assert generate(checkpoints["t2i"], tmp_path / "fox.png", "--height", "960", "--width", "960") == 0
    finally:
        root.handlers[:] = saved
    pixels, _ = read(tmp_path / "fox.png")
    assert np.array_equal(pixels, reference)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("kandinsky5: warning:")]
    assert len(warnings) == 1 and "960x960" in warnings[0] and "1024x1024" in warnings[0]


def test_editing_takes_the_image_and_its_snapped_size(checkpoints, pipelines, tmp_path, capsys):
    source = tmp_path / "source.png"
    pixels = np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    PIL.Image.fromarray(pixels).save(source)
    out = tmp_path / "edited.png"
    assert generate(checkpoints["i2i"], out, "--image", str(source)) == 0
    edited, _ = read(out)
    assert edited.shape == (768, 1280, 3)  # 200x300 (h x w) snapped to the trained 768x1280
    (expected,) = pipeline_images(pipelines["i2i"], 0, PIL.Image.open(source))
    assert np.array_equal(edited, expected)
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith(f"{out}: ok, seed 0, 1280x768") and "image encode" in summary


def test_num_images_writes_one_file_per_image(checkpoints, pipelines, tmp_path, capsys):
    out = tmp_path / "many.png"
    assert generate(checkpoints["t2i"], out, "--num-images", "2", "--seed", "5") == 0
    assert not out.exists()
    written = [read(tmp_path / f"many-{index}.png")[0] for index in range(2)]
    expected = pipeline_images(pipelines["t2i"], 5, num_images_per_prompt=2)
    assert all(np.array_equal(a, b) for a, b in zip(written, expected, strict=True))
    assert not np.array_equal(written[0], written[1])
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert f"{tmp_path / 'many-0.png'}, {tmp_path / 'many-1.png'}: ok, seed 5, 1024x1024, 2 images" in summary


@pytest.mark.parametrize(
    "task,options,named",
    [
        ("t2i", ["--out", "{tmp}/fox.gif"], "--out"),
        ("t2i", ["--out", "{tmp}/fox.mp4"], "--out"),
        ("video", ["--out", "{tmp}/fox.png"], "--out"),
        ("t2i", ["--seconds", "2"], "--seconds"),
        ("t2i", ["--frames", "5"], "--frames"),
        ("t2i", ["--fps", "12"], "--fps"),
        ("t2i", ["--expand-prompt"], "--expand-prompt"),
        ("t2i", ["--image", "{tmp}/source.png"], "--image"),
        ("i2i", [], "--image"),
        ("t2i", ["--num-images", "0"], "--num-images"),
        ("video", ["--out", "{tmp}/fox.mp4", "--num-images", "2"], "--num-images"),
    ],
)
def test_bad_inputs_are_one_line_before_loading(checkpoints, tmp_path, capsys, monkeypatch, task, options, named):
    from kandinsky5.pipelines.base import Kandinsky5PipelineBase

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(Kandinsky5PipelineBase, "from_pretrained", classmethod(forbidden))
    PIL.Image.new("RGB", (32, 32), "blue").save(tmp_path / "source.png")
    before = sorted(tmp_path.iterdir())
    options = [option.format(tmp=tmp_path) for option in options]
    model = "lite-sft-5s" if task == "video" else str(checkpoints[task])
    argv = ["generate", PROMPT, "--model", model, "--out", str(tmp_path / "fox.png"), *STEPS, *options]
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("kandinsky5: error:") and named in line, line
    assert sorted(tmp_path.iterdir()) == before


def test_failed_write_leaves_nothing_half_written_and_keeps_the_latents(
    checkpoints, reference, tmp_path, capsys, monkeypatch
):
    """A write that fails half-way leaves neither a partial image nor a temporary file, keeps an earlier file of that
    name, and keeps the sampled latents, which ``kandinsky5 decode`` turns into the image the run meant to write."""
    out = tmp_path / "fox.png"
    out.write_bytes(b"an earlier image")
    save = PIL.Image.Image.save

    def failing(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG half an image")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PIL.Image.Image, "save", failing)
    assert generate(checkpoints["t2i"], out, "--overwrite") == 1
    monkeypatch.setattr(PIL.Image.Image, "save", save)
    assert out.read_bytes() == b"an earlier image"
    assert temporary_paths(tmp_path) == []
    err = capsys.readouterr().err.strip().splitlines()
    failure = [line for line in err if line.startswith("kandinsky5: error:")]
    assert len(failure) == 1 and f"writing {out} failed" in failure[0] and "No space left" in failure[0]
    latents = tmp_path / "fox.latents.safetensors"
    assert latents.is_file() and f"kandinsky5 decode {latents}" in failure[0]

    decoded = tmp_path / "decoded.png"
    assert main(["decode", str(latents), "--model", str(checkpoints["t2i"]), "--out", str(decoded)]) == 0
    assert np.array_equal(read(decoded)[0], reference)
    # the latents of an image decode into an image, never a video
    assert main(["decode", str(latents), "--model", str(checkpoints["t2i"]), "--out", str(tmp_path / "v.mp4")]) == 2
    assert "--out" in capsys.readouterr().err


def test_models_lists_the_image_models_without_a_frame_rate(capsys):
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    images = {line.split()[0]: line for line in lines if line.split()[2] in ("t2i", "i2i")}
    assert set(images) == {"lite-t2i-sft", "lite-t2i-pretrain", "lite-edit-sft", "lite-edit-pretrain"}
    for line in images.values():
        assert "height=1024 width=1024" in line and "fps=" not in line and "output=image" in line


def test_plan_takes_an_image_model_and_refuses_video_options(capsys):
    assert main(["plan", "--model", "lite-t2i-sft"]) == 0
    assert "1024x1024" in capsys.readouterr().out
    assert main(["plan", "--model", "lite-t2i-sft", "--seconds", "5"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "--seconds" in line


def test_save_image_formats_and_quality(tmp_path):
    pixels = np.random.default_rng(1).random((32, 48, 3), dtype=np.float32)
    expected = (pixels * 255).round().astype(np.uint8)
    for name in ("a.png", "a.webp"):  # PNG always lossless; WebP at quality 10
        save_image(pixels, tmp_path / name, quality=10)
        assert np.array_equal(read(tmp_path / name)[0], expected)
    assert save_options("JPEG", 9) == {"quality": 90, "subsampling": 0}
    assert save_options("JPEG", 5) == {"quality": 50, "subsampling": 2}
    assert save_options("WEBP", 9) == {"quality": 90} and save_options("WEBP", 10) == {"lossless": True}
    assert save_options("PNG", 3) == {}
    with pytest.raises(ValueError, match=r"\.png, \.jpg, \.jpeg or \.webp"):
        check_image_output_path(tmp_path / "a.bmp")
    assert temporary_paths(tmp_path) == []
