"""Sampled latents on disk: what ``kandinsky5 generate`` keeps when decoding or writing a video fails, and what
``kandinsky5 decode`` reads back.

A latents file (``<video stem>.latents.safetensors``) is a safetensors file holding one tensor, ``latents``: the
channels-last ``(1, latent frames, height / 8, width / 8, channels)`` latents exactly as the pipeline decodes them
(after its ``finalize_latents``), in the dtype they were sampled in. Its string metadata says what it is
(``format``: ``kandinsky5-latents``, ``version``), how to write the video (``fps``, ``quality``) and, for
information, where it came from (``model``, ``seed``, ``prompt``, ``height``, ``width``, ``num_frames``,
``video``). It is written completely or not at all: to a temporary name in the same folder, then renamed
(kandinsky5/io/atomic.py).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

FORMAT = "kandinsky5-latents"
VERSION = "1"
SUFFIX = ".latents.safetensors"
TENSOR_NAME = "latents"
# (batch, latent frames, height, width, channels)
LATENT_DIMS = 5


class LatentsFileError(ValueError):
    """A file that is not a latents file written by ``kandinsky5 generate``, or one that cannot be used."""


@dataclass(frozen=True)
class LatentsHeader:
    """What a latents file says about itself, read without loading the tensor."""

    path: Path
    shape: tuple[int, ...]
    dtype: str
    metadata: dict[str, str]

    def number(self, key: str, default: float | None = None) -> float | None:
        """A numeric metadata field (``None``/``default`` when absent or unreadable)."""
        try:
            return float(self.metadata[key])
        except (KeyError, ValueError):
            return default


def latents_path_for(video: Path) -> Path:
    """``<stem>.latents.safetensors`` beside ``video``; ``<stem>.latents-N.safetensors`` when that one exists."""
    base = video.stem + ".latents"
    candidate = video.with_name(base + ".safetensors")
    number = 2
    while candidate.exists():
        candidate = video.with_name(f"{base}-{number}.safetensors")
        number += 1
    return candidate


def _write_completely(path: Path, data: bytes) -> None:
    """``data`` at ``path`` whole or not at all: written (and flushed to disk) under a temporary name beside it,
    then renamed (kandinsky5/io/atomic.py)."""
    from kandinsky5.io.atomic import atomic_path

    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def save_latents(latents: torch.Tensor, video: Path, metadata: dict[str, object]) -> Path:
    """Write ``latents`` beside ``video`` (else in the temporary directory) and return where they went.

    ``metadata`` values are stored as strings (``None`` values are left out). Raises ``OSError`` naming every place
    tried when none could be written.
    """
    from safetensors.torch import save

    fields = {key: str(value) for key, value in metadata.items() if value is not None}
    data = save(
        {TENSOR_NAME: latents.detach().to("cpu").contiguous()}, {**fields, "format": FORMAT, "version": VERSION}
    )
    video = Path(video).expanduser().absolute()
    errors = []
    for folder in (video.parent, Path(tempfile.gettempdir())):
        path = latents_path_for(folder / video.name)
        try:
            _write_completely(path, data)
        except OSError as err:
            errors.append(f"{path}: {err.strerror or err}")
            continue
        return path
    raise OSError("could not save the latents anywhere: " + "; ".join(errors))


def read_header(path: str | os.PathLike) -> LatentsHeader:
    """Check that ``path`` is a latents file of ours, reading only its header; :class:`LatentsFileError` with a
    one-line message otherwise."""
    from safetensors import safe_open

    path = Path(path).expanduser().absolute()
    if not path.exists():
        raise LatentsFileError(f"latents file {str(path)!r} does not exist")
    if not path.is_file():
        raise LatentsFileError(f"{str(path)!r} is not a file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            names = list(f.keys())
            if TENSOR_NAME not in names:
                raise LatentsFileError(f"{str(path)!r} holds no {TENSOR_NAME!r} tensor; it is no latents file")
            part = f.get_slice(TENSOR_NAME)
            shape, dtype = tuple(part.get_shape()), str(part.get_dtype())
    except LatentsFileError:
        raise
    except Exception as err:  # safetensors raises its own error types for files that are not safetensors
        reason = " ".join(str(err).split())
        raise LatentsFileError(
            f"{str(path)!r} is not a latents file written by `kandinsky5 generate` ({reason})"
        ) from err
    if metadata.get("format") != FORMAT:
        raise LatentsFileError(f"{str(path)!r} is a safetensors file but not one written by `kandinsky5 generate`")
    if metadata.get("version") != VERSION:
        raise LatentsFileError(
            f"{str(path)!r} is a latents file of version {metadata.get('version')!r}; this version reads {VERSION}"
        )
    if len(shape) != LATENT_DIMS or shape[0] != 1 or 0 in shape:
        raise LatentsFileError(
            f"{str(path)!r}: expected latents of shape (1, frames, height, width, channels), got {shape}"
        )
    return LatentsHeader(path, shape, dtype, metadata)


def load_latents(header: LatentsHeader) -> torch.Tensor:
    """The tensor of a checked latents file."""
    from safetensors.torch import load_file

    return load_file(str(header.path))[TENSOR_NAME]
