"""Writing generated images: PNG, JPEG or WebP by the path's suffix, complete or not at all.

``save_image`` writes under a temporary name beside the output and renames it when complete
(``kandinsky5/io/atomic.py``): an error or an interrupt leaves no partial file (an earlier file of that name is kept).
``quality`` is the 0..10 scale of ``export_to_video`` (10 = best): JPEG and WebP get Pillow's quality ``10 x
quality`` (default 9 -> 90), and 10 makes WebP lossless, as 10 makes the video lossless (CRF 0); JPEG has no
lossless mode (10 -> Pillow's 100), and from 9 up keeps full-resolution colour (4:4:4; below, Pillow's 4:2:0).
PNG is always lossless (``quality`` does not apply).
``check_image_output_path`` is the check the command line runs before loading any model.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import PIL.Image

from kandinsky5.io.atomic import atomic_path, check_writable_file

# suffix (lower case) -> Pillow's format name
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
IMAGE_SUFFIXES = tuple(IMAGE_FORMATS)
MAX_QUALITY = 10.0
# Pillow's JPEG / WebP quality per step of the 0..10 scale
PIL_QUALITY_PER_STEP = 10
DEFAULT_QUALITY = 9.0
# from this quality up, JPEG keeps full-resolution colour (Pillow's subsampling 0: 4:4:4; else 2: 4:2:0)
FULL_CHROMA_QUALITY = 9.0
JPEG_SUBSAMPLING = {True: 0, False: 2}


def suffixes_text() -> str:
    """``.png, .jpg, .jpeg or .webp``."""
    return ", ".join(IMAGE_SUFFIXES[:-1]) + f" or {IMAGE_SUFFIXES[-1]}"


def is_image_path(path: str | os.PathLike) -> bool:
    """Whether ``path``'s suffix is one ``save_image`` writes."""
    return Path(path).suffix.lower() in IMAGE_FORMATS


def image_format(path: str | os.PathLike) -> str:
    """Pillow's format name for ``path``'s suffix; ``ValueError`` for any other suffix."""
    suffix = Path(path).suffix.lower()
    if suffix not in IMAGE_FORMATS:
        raise ValueError(f"Output path {os.fspath(path)!r} must end in {suffixes_text()} (PNG, JPEG or WebP)")
    return IMAGE_FORMATS[suffix]


def save_options(image_format_name: str, quality: float | None) -> dict:
    """Pillow's ``save`` options of ``quality`` (0..10; ``None``: Pillow's defaults) for the format."""
    if quality is None or image_format_name == "PNG":
        return {}
    if not (isinstance(quality, int | float) and not isinstance(quality, bool) and 0 <= quality <= MAX_QUALITY):
        raise ValueError(f"quality: expected a number in [0, {MAX_QUALITY:g}] or None, got {quality!r}")
    if image_format_name == "WEBP" and quality >= MAX_QUALITY:
        return {"lossless": True}
    options = {"quality": round(quality * PIL_QUALITY_PER_STEP)}
    if image_format_name == "JPEG":
        options["subsampling"] = JPEG_SUBSAMPLING[quality >= FULL_CHROMA_QUALITY]
    return options


def to_pil(image) -> PIL.Image.Image:
    """A PIL image (converted to RGB), or an ``(H, W, 3)`` array / tensor, float in [0, 1] (rounded to bytes as
    the pipelines' ``output_type="pil"``) or uint8, as an RGB PIL image."""
    if isinstance(image, PIL.Image.Image):
        return image.convert("RGB")
    from kandinsky5.io.video import frames_to_uint8

    if hasattr(image, "detach"):  # a torch tensor
        image = image.detach().cpu().float().numpy() if image.is_floating_point() else image.detach().cpu().numpy()
    array = np.asarray(image)
    if array.ndim != 3:
        raise ValueError(f"image: expected an (H, W, 3) array or a PIL image, got shape {array.shape}")
    return PIL.Image.fromarray(frames_to_uint8(array[None], name="image")[0])


def save_image(image, path: str | os.PathLike, quality: float | None = DEFAULT_QUALITY) -> str:
    """Write ``image`` (a PIL image, or an ``(H, W, 3)`` array float in [0, 1] or uint8) at ``path`` as PNG, JPEG or
    WebP by its suffix, with ``quality`` on the 0..10 scale (see the module doc); return the path.

    The file is written under a temporary name beside ``path`` and renamed onto it when complete."""
    name = image_format(path)
    options = save_options(name, quality)
    picture = to_pil(image)
    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        picture.save(handle, format=name, **options)
        handle.flush()
        os.fsync(handle.fileno())
    return os.fspath(path)


def check_image_output_path(path: str | os.PathLike) -> Path:
    """Check, before any generation, that an image can be written at ``path``; return it as an absolute path.

    Raises ValueError (no image suffix), IsADirectoryError, FileNotFoundError (its folder does not exist),
    NotADirectoryError (its parent is a file) or PermissionError (not writable), each one line naming the path (as
    ``check_output_path`` for videos)."""
    image_format(Path(path))
    return check_writable_file(path, "a file name ending in .png")
