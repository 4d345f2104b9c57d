"""Video export round trips through PyAV, the output-path checks, the frame fallback and image loading."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import PIL.Image
import pytest
import torch
from tolerances import CODEC_MEAN_ABS, UINT8_ROUNDING

from kandinsky5.io import check_output_path, export_to_video, load_image, save_frames_fallback
from kandinsky5.io.video import quality_to_crf

NUM_FRAMES, HEIGHT, WIDTH = 9, 48, 64


def gradient_video(num_frames: int = NUM_FRAMES, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    """(F, H, W, 3) float32 in [0, 1]: smooth horizontal/vertical ramps drifting over time."""
    t = np.linspace(0, 1, num_frames)[:, None, None]
    y = np.linspace(0, 1, height)[None, :, None]
    x = np.linspace(0, 1, width)[None, None, :]
    red = np.broadcast_to(0.2 + 0.6 * x, (num_frames, height, width))
    green = np.broadcast_to(0.2 + 0.6 * y, (num_frames, height, width))
    blue = np.broadcast_to(0.3 + 0.4 * t, (num_frames, height, width))
    return np.stack([red, green, blue], axis=-1).astype(np.float32)


def read_video(path) -> tuple[np.ndarray, Fraction, int, int]:
    """(frames as float in [0, 1], average rate, width, height) as PyAV reads them back."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        rate, width, height = stream.average_rate, stream.codec_context.width, stream.codec_context.height
        assert stream.codec_context.name == "h264"
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    return np.stack(frames).astype(np.float32) / 255.0, rate, width, height


def test_float_frames_round_trip(tmp_path):
    video = gradient_video()
    path = export_to_video(list(video), str(tmp_path / "out.mp4"), fps=24)
    assert path == str(tmp_path / "out.mp4")
    decoded, rate, width, height = read_video(path)
    assert decoded.shape[0] == NUM_FRAMES
    assert (width, height) == (WIDTH, HEIGHT)
    assert rate == 24
    assert np.abs(decoded - video).mean() < CODEC_MEAN_ABS


def test_array_uint8_and_fractional_fps(tmp_path):
    video = np.round(gradient_video() * 255).astype(np.uint8)
    path = export_to_video(video, tmp_path / "out.mp4", fps=Fraction(24000, 1001))
    decoded, rate, width, height = read_video(path)
    assert rate == Fraction(24000, 1001)
    assert decoded.shape == (NUM_FRAMES, HEIGHT, WIDTH, 3)
    assert np.abs(decoded - video / 255.0).mean() < CODEC_MEAN_ABS


def test_pil_list(tmp_path):
    video = gradient_video()
    images = [PIL.Image.fromarray(np.round(frame * 255).astype(np.uint8)) for frame in video]
    decoded, rate, width, height = read_video(export_to_video(images, tmp_path / "pil.mp4", fps=8))
    assert (decoded.shape[0], width, height, rate) == (NUM_FRAMES, WIDTH, HEIGHT, 8)
    assert np.abs(decoded - video).mean() < CODEC_MEAN_ABS


@pytest.mark.parametrize("channels_first", [False, True])
def test_tensor_input(tmp_path, channels_first):
    video = torch.from_numpy(gradient_video())
    if channels_first:
        video = video.permute(0, 3, 1, 2)
    decoded, _, width, height = read_video(export_to_video(video, tmp_path / "tensor.mp4"))
    assert (decoded.shape[0], width, height) == (NUM_FRAMES, WIDTH, HEIGHT)
    assert np.abs(decoded - gradient_video()).mean() < CODEC_MEAN_ABS


def test_default_path_is_a_new_mp4():
    path = export_to_video(gradient_video())
    try:
        assert path.endswith(".mp4")
        assert read_video(path)[0].shape[0] == NUM_FRAMES
    finally:
        import os

        os.remove(path)


def test_odd_size_is_padded_to_the_macro_block(tmp_path):
    video = gradient_video(height=45, width=61)
    _, _, width, height = read_video(export_to_video(video, tmp_path / "odd.mp4"))
    assert (width, height) == (64, 48)
    _, _, width, height = read_video(export_to_video(video, tmp_path / "even.mp4", macro_block_size=None))
    assert (width, height) == (62, 46)


def test_higher_quality_is_closer(tmp_path):
    rng = np.random.default_rng(0)
    video = rng.random((3, HEIGHT, WIDTH, 3), dtype=np.float32)
    errors = [
        np.abs(read_video(export_to_video(video, tmp_path / f"q{q}.mp4", quality=q))[0] - video).mean() for q in (2, 9)
    ]
    assert errors[1] < errors[0]


def test_quality_to_crf_mapping():
    assert [quality_to_crf(q) for q in (0, 2, 5, 8, 10)] == [51, 40, 25, 10, 0]


def test_bitrate(tmp_path):
    decoded, *_ = read_video(export_to_video(gradient_video(), tmp_path / "cbr.mp4", bitrate=200_000))
    assert decoded.shape[0] == NUM_FRAMES


@pytest.mark.parametrize(
    ("frames", "kwargs", "names"),
    [
        ([], {}, "video_frames"),
        (np.zeros((2, 8, 8)), {}, "video_frames"),
        (np.zeros((2, 8, 8, 4)), {}, "video_frames"),
        (np.zeros((1, 2, 8, 8, 3)), {}, "video_frames"),
        (np.full((2, 8, 8, 3), 2.0), {}, "video_frames"),
        (np.full((2, 8, 8, 3), np.nan), {}, "video_frames"),
        (np.zeros((2, 8, 8, 3), dtype=np.int32), {}, "video_frames"),
        ([np.zeros((8, 8, 3)), np.zeros((8, 6, 3))], {}, "video_frames"),
        ([np.zeros((8, 8, 3)), PIL.Image.new("RGB", (8, 8))], {}, "video_frames"),
        ("frames.png", {}, "video_frames"),
        (np.zeros((2, 8, 8, 3)), {"fps": 0}, "fps"),
        (np.zeros((2, 8, 8, 3)), {"fps": "24"}, "fps"),
        (np.zeros((2, 8, 8, 3)), {"quality": 11}, "quality"),
        (np.zeros((2, 8, 8, 3)), {"bitrate": -1}, "bitrate"),
        (np.zeros((2, 8, 8, 3)), {"macro_block_size": 0}, "macro_block_size"),
    ],
)
def test_bad_inputs_raise_value_error(tmp_path, frames, kwargs, names):
    path = tmp_path / "bad.mp4"
    with pytest.raises(ValueError, match=names):
        export_to_video(frames, path, **kwargs)
    assert not path.exists()


def test_check_output_path(tmp_path):
    good = tmp_path / "video.mp4"
    assert check_output_path(str(good)) == good
    assert not good.exists()  # checking writes nothing that stays
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError, match="missing"):
        check_output_path(tmp_path / "missing" / "video.mp4")
    directory = tmp_path / "folder.mp4"
    directory.mkdir()
    with pytest.raises(IsADirectoryError, match="folder.mp4"):
        check_output_path(directory)
    with pytest.raises(ValueError, match="video.avi"):
        check_output_path(tmp_path / "video.avi")
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(NotADirectoryError, match="file"):
        check_output_path(a_file / "video.mp4")


def test_check_output_path_read_only_directory(tmp_path):
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o500)
    try:
        probe = read_only / "probe"
        try:
            probe.write_text("")
        except PermissionError:
            pass
        else:
            pytest.skip("this user (root) can write to a read-only directory")
        with pytest.raises(PermissionError, match="read_only"):
            check_output_path(read_only / "video.mp4")
    finally:
        read_only.chmod(0o700)


def test_save_frames_fallback(tmp_path):
    video = gradient_video()
    saved = save_frames_fallback(torch.from_numpy(video), tmp_path / "lost.mp4")
    assert saved == str(tmp_path / "lost.frames.npy")
    frames = np.load(saved)
    assert frames.dtype == np.uint8 and frames.shape == (NUM_FRAMES, HEIGHT, WIDTH, 3)
    assert np.abs(frames / 255.0 - video).max() <= UINT8_ROUNDING
    # Frames export_to_video refuses are still kept, as they came.
    out_of_range = np.full((2, 4, 4, 3), 3.0, dtype=np.float32)
    np.testing.assert_array_equal(np.load(save_frames_fallback(out_of_range, tmp_path / "raw.mp4")), out_of_range)


def test_save_frames_fallback_to_temp_dir_when_directory_is_gone(tmp_path):
    saved = save_frames_fallback(list(gradient_video()), tmp_path / "gone" / "kandinsky5-test-fallback.mp4")
    try:
        assert np.load(saved).shape == (NUM_FRAMES, HEIGHT, WIDTH, 3)
        assert "gone" not in saved
    finally:
        import os

        os.remove(saved)


def test_load_image_applies_exif_orientation(tmp_path):
    width, height = 6, 4
    pixels = np.zeros((height, width, 4), dtype=np.uint8)
    pixels[0, 0] = (255, 0, 0, 255)  # mark the top-left corner
    image = PIL.Image.fromarray(pixels, mode="RGBA")
    exif = PIL.Image.Exif()
    orientation_tag, rotate_90_clockwise = 0x0112, 6
    exif[orientation_tag] = rotate_90_clockwise
    path = tmp_path / "rotated.png"
    image.save(path, exif=exif)

    loaded = load_image(str(path))
    assert loaded.mode == "RGB"
    assert loaded.size == (height, width)
    # Shown rotated 90 degrees clockwise, the stored top-left corner is at the top right.
    assert loaded.getpixel((height - 1, 0)) == (255, 0, 0)
    assert load_image(path).size == (height, width)
    assert load_image(PIL.Image.open(path), convert_method=lambda img: img.convert("L")).mode == "L"


def test_load_image_errors(tmp_path):
    with pytest.raises(ValueError, match="missing.png"):
        load_image(str(tmp_path / "missing.png"))
    with pytest.raises(ValueError, match="image"):
        load_image(42)
    # Nothing listens on port 9 of this machine (and there is no network here): a clear OSError, no hang.
    with pytest.raises(OSError, match="http://127.0.0.1:9/image.png"):
        load_image("http://127.0.0.1:9/image.png")


@pytest.mark.parametrize("as_list", [False, True])
def test_float_frames_convert_exactly_frame_by_frame(as_list):
    """The frame-by-frame conversion gives the whole-array formula's bytes, halves included (rounded to even)."""
    from kandinsky5.io.video import frames_to_uint8

    frames = np.random.default_rng(0).random((4, 6, 10, 3), dtype=np.float32)
    frames[0, 0, 0, :] = [0.5 / 255, 1.5 / 255, 1.0]
    frames[1, 0, 0, :] = [-1e-4, 1.0 + 1e-4, 0.0]  # within the tolerance: clipped
    expected = np.round(np.clip(frames, 0.0, 1.0) * 255).astype(np.uint8)
    got = frames_to_uint8(list(frames) if as_list else frames)
    assert got.dtype == np.uint8 and np.array_equal(got, expected)


@pytest.mark.parametrize("bad", [np.nan, np.inf, 1.5])
def test_bad_values_in_a_later_frame_are_named(bad):
    from kandinsky5.io.video import frames_to_uint8

    frames = [np.zeros((4, 6, 3), np.float32) for _ in range(3)]
    frames[2][1, 1, 1] = bad
    with pytest.raises(ValueError, match=r"video_frames: .*frame 2"):
        frames_to_uint8(frames)
