"""Nothing half-written: files and folders appear at their final path complete or not at all, also when the writer
fails or is interrupted (kandinsky5/io/atomic.py and the writers that use it)."""

from __future__ import annotations

import os
import signal

import av
import numpy as np
import pytest

from kandinsky5.io import export_to_video, save_frames_fallback
from kandinsky5.io.atomic import atomic_folder, atomic_path, discarded_writes, signals_held, temporary_paths

NUM_FRAMES, HEIGHT, WIDTH = 9, 32, 48


def video() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(NUM_FRAMES, HEIGHT, WIDTH, 3), dtype=np.uint8)


def entries(folder) -> list[str]:
    """Every name in ``folder``, hidden ones included."""
    return sorted(os.listdir(folder))


# ---------------------------------------------------------------------------------------------- atomic_path


def test_atomic_path_renames_the_complete_file_into_place(tmp_path):
    final = tmp_path / "video.mp4"
    with atomic_path(final) as temporary:
        assert temporary.parent == tmp_path and temporary.exists()
        assert temporary.name.startswith(".video.mp4.partial-") and temporary.suffix == ".mp4"
        temporary.write_bytes(b"complete")
        assert not final.exists()
    assert final.read_bytes() == b"complete"
    assert entries(tmp_path) == ["video.mp4"]
    # plain-open permissions (0o666 less the umask), not mkstemp's 0o600
    umask = os.umask(0)
    os.umask(umask)
    assert final.stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("error", [ValueError("disk on fire"), KeyboardInterrupt()])
def test_atomic_path_leaves_nothing_when_the_body_raises(tmp_path, error):
    final = tmp_path / "video.mp4"
    with pytest.raises(type(error)) as raised:
        with atomic_path(final) as temporary:
            temporary.write_bytes(b"half")
            raise error
    assert entries(tmp_path) == []
    assert discarded_writes(raised.value) == (final,)


def test_atomic_path_keeps_an_earlier_file_when_the_body_raises(tmp_path):
    final = tmp_path / "video.mp4"
    final.write_bytes(b"earlier")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(final) as temporary:
            temporary.write_bytes(b"half")
            raise KeyboardInterrupt
    assert final.read_bytes() == b"earlier"
    assert entries(tmp_path) == ["video.mp4"]


def test_atomic_path_writes_through_a_symbolic_link(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link.mp4").symlink_to(tmp_path / "real" / "video.mp4")
    with atomic_path(tmp_path / "link.mp4") as temporary:
        assert temporary.parent == tmp_path / "real"
        temporary.write_bytes(b"through")
    assert (tmp_path / "link.mp4").is_symlink() and (tmp_path / "real" / "video.mp4").read_bytes() == b"through"


def test_an_interrupt_during_the_rename_is_handled_after_it(tmp_path, monkeypatch):
    """SIGINT while the file is renamed: the rename completes, then KeyboardInterrupt (the default handler)."""
    final = tmp_path / "video.mp4"
    replace = os.replace

    def interrupted_replace(source, destination):
        signal.raise_signal(signal.SIGINT)  # held back: handled once the rename is done
        replace(source, destination)

    monkeypatch.setattr(os, "replace", interrupted_replace)
    with pytest.raises(KeyboardInterrupt) as raised:
        with atomic_path(final) as temporary:
            temporary.write_bytes(b"complete")
    assert final.read_bytes() == b"complete" and entries(tmp_path) == ["video.mp4"]
    assert discarded_writes(raised.value) == ()


def test_signals_held_delivers_after_the_body_and_restores_the_handler(tmp_path):
    received = []
    previous = signal.signal(signal.SIGTERM, lambda number, frame: received.append(number))
    try:
        handler = signal.getsignal(signal.SIGTERM)
        with signals_held():
            signal.raise_signal(signal.SIGTERM)
            assert received == []
        assert received == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) is handler
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------------------------------------- atomic_folder


def test_atomic_folder_appears_whole(tmp_path):
    final = tmp_path / "parents" / "checkpoint"
    with atomic_folder(final) as temporary:
        assert temporary.parent == final.parent and temporary.name.startswith(".checkpoint.partial-")
        (temporary / "sub").mkdir()
        (temporary / "sub" / "weights").write_bytes(b"w")
        assert not final.exists()
    assert (final / "sub" / "weights").read_bytes() == b"w"
    assert entries(final.parent) == ["checkpoint"]


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_atomic_folder_leaves_nothing_when_the_body_raises(tmp_path, error):
    final = tmp_path / "checkpoint"
    with pytest.raises(type(error)) as raised:
        with atomic_folder(final) as temporary:
            (temporary / "config.json").write_text("{}")
            raise error
    assert entries(tmp_path) == []
    assert discarded_writes(raised.value) == (final,)


def test_atomic_folder_replaces_an_empty_folder_and_merges_into_a_full_one(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_folder(empty) as temporary:
        (temporary / "a").write_text("new")
    assert entries(empty) == ["a"]

    full = tmp_path / "full"
    (full / "sub").mkdir(parents=True)
    (full / "mine.txt").write_text("the user's")
    (full / "sub" / "old").write_text("old")
    (full / "sub" / "same").write_text("old")
    with atomic_folder(full) as temporary:
        (temporary / "sub").mkdir()
        (temporary / "sub" / "same").write_text("new")
        (temporary / "added").write_text("new")
    assert (full / "mine.txt").read_text() == "the user's" and (full / "sub" / "old").read_text() == "old"
    assert (full / "sub" / "same").read_text() == "new" and (full / "added").read_text() == "new"
    assert temporary_paths(tmp_path) == []


# ---------------------------------------------------------------------------------------------- export_to_video


def test_export_renames_the_closed_container(tmp_path, monkeypatch):
    """The temporary file keeps the .mp4 suffix and is a complete, closed MP4 when it is renamed."""
    renamed = []
    replace = os.replace

    def checked_replace(source, destination):
        with av.open(str(source)) as container:
            renamed.append((os.path.basename(source), sum(1 for _ in container.decode(video=0))))
        replace(source, destination)

    monkeypatch.setattr(os, "replace", checked_replace)
    out = tmp_path / "out.mp4"
    assert export_to_video(video(), str(out), fps=8) == str(out)
    [(name, frames)] = renamed
    assert name.startswith(".out.mp4.partial-") and name.endswith(".mp4") and frames == NUM_FRAMES
    assert entries(tmp_path) == ["out.mp4"]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_export_failing_mid_write_leaves_no_file(tmp_path, monkeypatch, error):
    """The encoder fails (or is interrupted) after some of its packets are in the file."""
    encode = av.video.stream.VideoStream.encode

    def failing_encode(stream, frame=None):
        packets = encode(stream, frame)
        if frame is not None:
            return packets
        # x264 holds every frame of so short a clip until the flush: write half of them, then fail
        stream.container.mux(packets[: len(packets) // 2])
        [temporary] = temporary_paths(tmp_path)
        assert temporary.stat().st_size > 0
        raise error("encoder gave up")

    monkeypatch.setattr(av.video.stream.VideoStream, "encode", failing_encode)
    out = tmp_path / "out.mp4"
    with pytest.raises(error) as raised:
        export_to_video(video(), str(out), fps=8)
    assert entries(tmp_path) == []
    assert discarded_writes(raised.value) == (out,)

    # an earlier video of that name is kept as it was
    out.write_bytes(b"earlier video")
    with pytest.raises(error):
        export_to_video(video(), str(out), fps=8)
    assert out.read_bytes() == b"earlier video" and entries(tmp_path) == ["out.mp4"]


def test_export_to_a_new_temporary_file_removes_it_on_failure(monkeypatch):
    """Without a path, a new temporary .mp4 is reserved; a failed export removes it with the partial file."""
    opened = []

    def interrupted_open(path, *args, **kwargs):
        opened.append(path)
        raise KeyboardInterrupt

    monkeypatch.setattr(av, "open", interrupted_open)
    with pytest.raises(KeyboardInterrupt):
        export_to_video(video())
    [partial] = opened
    folder, name = os.path.split(partial)
    reserved = os.path.join(folder, name[1:].split(".partial-")[0])
    assert reserved.endswith(".mp4") and not os.path.exists(reserved) and not os.path.exists(partial)


# ---------------------------------------------------------------------------------------------- save_frames_fallback


def test_fallback_names_are_unique(tmp_path):
    frames = video()
    first = save_frames_fallback(frames, tmp_path / "lost.mp4")
    second = save_frames_fallback(frames[:2], tmp_path / "lost.mp4")
    third = save_frames_fallback(frames[:3], tmp_path / "lost.mp4")
    assert [os.path.basename(p) for p in (first, second, third)] == [
        "lost.frames.npy",
        "lost.frames-2.npy",
        "lost.frames-3.npy",
    ]
    assert [len(np.load(p)) for p in (first, second, third)] == [NUM_FRAMES, 2, 3]
    assert entries(tmp_path) == ["lost.frames-2.npy", "lost.frames-3.npy", "lost.frames.npy"]


def test_fallback_interrupted_mid_write_leaves_no_file(tmp_path, monkeypatch):
    def half_save(file, array, *args, **kwargs):
        file.write(b"\x93NUMPY half")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "save", half_save)
    with pytest.raises(KeyboardInterrupt):
        save_frames_fallback(video(), tmp_path / "lost.mp4")
    assert entries(tmp_path) == []


# ---------------------------------------------------------------------------------------------- checkpoints


def test_save_pretrained_interrupted_leaves_no_folder(tmp_path, monkeypatch):
    import safetensors.torch

    from kandinsky5.models.dit import Kandinsky5Transformer3DModel
    from kandinsky5.tiny import TINY_TRANSFORMER

    model = Kandinsky5Transformer3DModel(TINY_TRANSFORMER)

    def half_save(state, filename, *args, **kwargs):
        with open(filename, "wb") as handle:
            handle.write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", half_save)
    with pytest.raises(KeyboardInterrupt) as raised:
        model.save_pretrained(tmp_path / "transformer")
    assert entries(tmp_path) == []
    assert discarded_writes(raised.value) == (tmp_path / "transformer",)
    monkeypatch.undo()

    # a complete save, into a folder that already holds a file of the user's: merged
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "README.md").write_text("mine")
    model.save_pretrained(tmp_path / "transformer")
    assert entries(tmp_path / "transformer") == ["README.md", "config.json", "diffusion_pytorch_model.safetensors"]
    assert entries(tmp_path) == ["transformer"]


def test_tiny_checkpoint_interrupted_mid_write_leaves_no_folder(tmp_path, monkeypatch):
    import kandinsky5.tiny as tiny

    def interrupted(root, *args, **kwargs):
        assert (root / "transformer" / "config.json").exists()  # mid-write: the transformer is written
        (root / "text_encoder").mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(tiny, "write_tiny_text_components", interrupted)
    final = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt) as raised:
        tiny.write_tiny_checkpoint(final)
    assert entries(tmp_path) == []
    assert discarded_writes(raised.value) == (final,)


def test_tiny_checkpoint_into_an_existing_empty_folder(tmp_path):
    from kandinsky5.tiny import write_tiny_checkpoint

    final = tmp_path / "ckpt"
    final.mkdir()
    assert write_tiny_checkpoint(final) == final
    assert {"model_index.json", "transformer", "vae", "scheduler", "text_encoder"} <= set(entries(final))
    assert entries(tmp_path) == ["ckpt"]
