"""Output sizes: the resolution classes the models were trained at, the RoPE scale rule, and the sizes a model
cannot represent.

Sizes are written ``HEIGHTxWIDTH`` in pixels throughout (Lite's default ``512x768`` is 512 rows, 768 columns).

Three kinds of size:

- **trained**: a size of a resolution class the model was trained at. Runs silently.
- **untrained but representable**: runs, with one warning per model and size naming the trained sizes, since
  quality is not what the model was made for (see :func:`warn_if_untrained`).
- **unrepresentable**: a ``ValueError`` naming the parameter, raised before any loading or encoding (see
  :func:`check_size`): not a multiple of 16 pixels; for NABLA checkpoints not a multiple of 128 pixels (NABLA
  cuts the latent token grid into 8x8 tiles; we refuse rather than pad, since padding would change what the model
  computes); or beyond the reference's RoPE tables, which hold 128 positions per visual axis (the reference fails
  with an index error there).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from numbers import Integral
from typing import NamedTuple

logger = logging.getLogger(__name__)

# VAE spatial compression (8) times the DiT's spatial patch (2): one latent token covers 16x16 pixels.
VAE_SPATIAL_COMPRESSION = 8
DIT_SPATIAL_PATCH = 2
SIZE_MULTIPLE = VAE_SPATIAL_COMPRESSION * DIT_SPATIAL_PATCH
# The VAE's temporal compression: num_frames = 4k + 1 gives k + 1 latent frames.
VAE_TEMPORAL_COMPRESSION = 4
# NABLA reorders each frame's token grid into tiles of this many tokens per side (attention/nabla.FRACTAL_TILE);
# kept here as a number so that this module imports nothing heavy.
NABLA_TILE_TOKENS = 8
NABLA_SIZE_MULTIPLE = NABLA_TILE_TOKENS * SIZE_MULTIPLE
# The reference's RoPE tables (diffusers' Kandinsky5RoPE3D max_pos and Kandinsky5RoPE1D max_pos).
MAX_VISUAL_POSITIONS = 128
MAX_TEXT_POSITIONS = 1024

# The RoPE scale rule: the 512 class when both sides lie within this range (pixels, inclusive), else the 1024 class.
ROPE_SCALE_RANGE_512 = (480, 854)
ROPE_SCALE_512 = (1.0, 2.0, 2.0)
ROPE_SCALE_1024 = (1.0, 3.16, 3.16)


class SizeError(ValueError):
    """A size the model cannot represent; ``parameter`` names the argument at fault."""

    def __init__(self, parameter: str, message: str):
        super().__init__(message)
        self.parameter = parameter


class Size(NamedTuple):
    """A frame size in pixels."""

    height: int
    width: int

    def __str__(self) -> str:
        return f"{self.height}x{self.width}"


@dataclass(frozen=True)
class ResolutionClass:
    """Sizes the models were trained at together, with the RoPE scale factor the reference uses for them."""

    name: str
    sizes: tuple[Size, ...]
    rope_scale: tuple[float, float, float]

    def describe(self) -> str:
        return f"{self.name} class ({', '.join(str(s) for s in self.sizes)})"


# The original repository's size lists (its pipeline accepts exactly these).
RESOLUTION_512 = ResolutionClass(
    name="512",
    sizes=(Size(512, 512), Size(512, 768), Size(768, 512)),
    rope_scale=ROPE_SCALE_512,
)
RESOLUTION_1024 = ResolutionClass(
    name="1024",
    sizes=(
        Size(1024, 1024),
        Size(640, 1408),
        Size(1408, 640),
        Size(768, 1280),
        Size(1280, 768),
        Size(896, 1152),
        Size(1152, 896),
    ),
    rope_scale=ROPE_SCALE_1024,
)
RESOLUTION_CLASSES = (RESOLUTION_512, RESOLUTION_1024)
# The image models' sizes: the 1024 class, in the order diffusers' image pipelines search them (it lists them as
# (width, height): 1024x1024, 640x1408, 1408x640, ...), which decides ties between equally near aspect ratios.
IMAGE_RESOLUTIONS = tuple(
    Size(height, width)
    for width, height in ((1024, 1024), (640, 1408), (1408, 640), (768, 1280), (1280, 768), (896, 1152), (1152, 896))
)
# The image models' RoPE scale, whatever the size (diffusers' and the original's image pipelines).
IMAGE_ROPE_SCALE = (1.0, 1.0, 1.0)


def rope_scale_factor(height: int, width: int) -> tuple[float, float, float]:
    """RoPE scale factor ``(time, height, width)``: the 512 class when both sides lie within 480..854 pixels,
    else the 1024 class (the reference's rule, whatever the size)."""
    low, high = ROPE_SCALE_RANGE_512
    if low <= height <= high and low <= width <= high:
        return ROPE_SCALE_512
    return ROPE_SCALE_1024


def snap_image_size(height: int, width: int) -> Size:
    """``height x width`` when it is one of the image models' sizes, else the one nearest in aspect ratio (width
    over height, the first of equals in diffusers' order)."""
    if Size(height, width) in IMAGE_RESOLUTIONS:
        return Size(height, width)
    ratio = width / height
    return min(IMAGE_RESOLUTIONS, key=lambda size: abs(size.width / size.height - ratio))


def resolution_class_of(height: int, width: int) -> ResolutionClass:
    """The class whose RoPE scale a size gets."""
    return RESOLUTION_512 if rope_scale_factor(height, width) == ROPE_SCALE_512 else RESOLUTION_1024


def latent_frames(num_frames: int, temporal_compression: int = VAE_TEMPORAL_COMPRESSION) -> int:
    return (num_frames - 1) // temporal_compression + 1


def max_num_frames(temporal_compression: int = VAE_TEMPORAL_COMPRESSION) -> int:
    """The most frames the reference's RoPE covers (509 with the 4x temporal VAE)."""
    return (MAX_VISUAL_POSITIONS - 1) * temporal_compression + 1


def check_size(
    height: int,
    width: int,
    num_frames: int | None = None,
    *,
    nabla: bool = False,
    size_multiple: int = SIZE_MULTIPLE,
    temporal_compression: int = VAE_TEMPORAL_COMPRESSION,
) -> None:
    """Raise :class:`SizeError` (a ``ValueError``) naming ``height``, ``width`` or ``num_frames`` when the model
    cannot represent the size.

    ``size_multiple`` is the pixels per latent token (VAE compression times patch); ``nabla`` for checkpoints
    with NABLA attention, whose token grid must tile into 8x8 blocks.
    """
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, Integral) or value < size_multiple or value % size_multiple:
            raise SizeError(name, f"`{name}` must be a positive multiple of {size_multiple} pixels, got {value!r}")
        if nabla and value % (NABLA_TILE_TOKENS * size_multiple):
            multiple = NABLA_TILE_TOKENS * size_multiple
            raise SizeError(
                name,
                f"`{name}` must be a multiple of {multiple} pixels for this NABLA checkpoint (its attention cuts the "
                f"latent token grid into {NABLA_TILE_TOKENS}x{NABLA_TILE_TOKENS} tiles), got {value}; "
                f"e.g. {max(value // multiple, 1) * multiple} or {(value // multiple + 1) * multiple}",
            )
        largest = MAX_VISUAL_POSITIONS * size_multiple
        if value > largest:
            raise SizeError(
                name,
                f"`{name}` must be at most {largest} pixels (the reference's RoPE covers {MAX_VISUAL_POSITIONS} "
                f"positions per axis, one per {size_multiple} pixels), got {value}",
            )
    if num_frames is not None and latent_frames(num_frames, temporal_compression) > MAX_VISUAL_POSITIONS:
        raise SizeError(
            "num_frames",
            f"`num_frames` must be at most {max_num_frames(temporal_compression)} (the reference's RoPE covers "
            f"{MAX_VISUAL_POSITIONS} latent frames, one per {temporal_compression} frames), got {num_frames}",
        )


# (model name, size) pairs already warned about in this process: one warning each, not one per call.
_warned_untrained: set[tuple[str, Size]] = set()


def untrained_size_message(
    height: int, width: int, trained_classes: Iterable[ResolutionClass], model_name: str
) -> str | None:
    """Why ``height x width`` is not a size ``model_name`` was trained at, naming the trained sizes; ``None``
    for a trained size."""
    size = Size(height, width)
    trained_classes = tuple(trained_classes)
    if any(size in c.sizes for c in trained_classes):
        return None
    own_class = resolution_class_of(height, width)
    named = (own_class,) if own_class in trained_classes else trained_classes
    return (
        f"{size} (height x width) is not a size {model_name} was trained at; it runs, but expect lower quality. "
        f"Trained sizes: {'; '.join(c.describe() for c in named)}."
    )


def warn_if_untrained(height: int, width: int, trained_classes: Iterable[ResolutionClass], model_name: str) -> bool:
    """Log one warning (once per model and size in this process) when the size was not trained; whether it is
    untrained."""
    message = untrained_size_message(height, width, trained_classes, model_name)
    if message is None:
        return False
    key = (model_name, Size(height, width))
    if key not in _warned_untrained:
        _warned_untrained.add(key)
        logger.warning(message)
    return True


def closest_trained_size(aspect_ratio: float, resolution_class: ResolutionClass) -> Size:
    """The size of ``resolution_class`` whose width/height ratio is closest to ``aspect_ratio`` (on a log scale,
    so that 2:1 and 1:2 are equally far from 1:1)."""
    return min(resolution_class.sizes, key=lambda s: abs(math.log(s.width / s.height / aspect_ratio)))
