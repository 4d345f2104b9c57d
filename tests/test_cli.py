"""The command line: a real MP4 from a tiny checkpoint, and one-line errors before any loading."""

import subprocess
import sys

import av
import pytest

from kandinsky5.cli.main import frames_for_seconds, main


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-ckpt")
    assert main(["tiny-checkpoint", str(folder)]) == 0
    return folder


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
            "--height",
            "64",
            "--width",
            "96",
            "--frames",
            "9",
            "--fps",
            "12",
            "--steps",
            "2",
            "--no-progress",
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
