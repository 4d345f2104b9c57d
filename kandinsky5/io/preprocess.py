"""Conditioning images to the VAE's input, as diffusers' ``VaeImageProcessor.preprocess`` prepares them.

An image is a PIL image, a numpy array ``(H, W, 3)`` / ``(N, H, W, 3)``, a torch tensor ``(3, H, W)`` /
``(N, 3, H, W)``, or a list of one of these kinds. Float pixels lie in [0, 1]; uint8 pixels in 0..255. PIL images
are resized with Lanczos, arrays and tensors with nearest-neighbour interpolation (the reference's choices), then
the pixels are mapped to [-1, 1]. Invalid input raises ``ValueError`` naming ``image`` before any work.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

ImageInput = PIL.Image.Image | np.ndarray | torch.Tensor | list

PARAMETER = "image"
RGB_CHANNELS = 3
UINT8_SCALE = 255.0
PIL_RESAMPLE = PIL.Image.Resampling.LANCZOS
ARRAY_RESIZE_MODE = "nearest"
# The most pixels an input image may have: PIL's decompression-bomb threshold (about 89 million), far beyond any
# size the models take; a larger image would only cost memory and time to resize.
MAX_IMAGE_PIXELS = PIL.Image.MAX_IMAGE_PIXELS or 89_478_485
# Float pixels: [0, 1]; a batch whose minimum is negative is taken as already in [-1, 1] (as the reference does).
PIXEL_RANGE = (-1.0, 1.0)


def _invalid(message: str) -> ValueError:
    return ValueError(f"`{PARAMETER}`: {message}")


def _items(image) -> list:
    """The images as a non-empty list of one kind (PIL, numpy or torch)."""
    if image is None:
        raise _invalid(
            "an input image is required for image-to-video and image editing (a PIL image, a numpy array, a torch "
            "tensor or a list of them)"
        )
    items = image if isinstance(image, list) else [image]
    if not items:
        raise _invalid("got an empty list")
    kinds = (PIL.Image.Image, np.ndarray, torch.Tensor)
    kind = next((k for k in kinds if isinstance(items[0], k)), None)
    if kind is None or not all(isinstance(item, kind) for item in items):
        names = sorted({type(item).__name__ for item in items})
        raise _invalid(
            f"expected a PIL image, a numpy array, a torch tensor or a list of one of these kinds, got {names}"
        )
    return items


def _check_array(item: np.ndarray | torch.Tensor) -> int:
    """Validate one numpy array or tensor; the number of images it holds."""
    is_numpy = isinstance(item, np.ndarray)
    layout = "(H, W, 3) or (N, H, W, 3)" if is_numpy else "(3, H, W) or (N, 3, H, W)"
    channels = item.shape[-1] if is_numpy else item.shape[-3] if item.ndim >= 3 else None
    if item.ndim not in (3, 4) or channels != RGB_CHANNELS or 0 in item.shape:
        raise _invalid(f"a {type(item).__name__} must have shape {layout} (RGB), got {tuple(item.shape)}")
    height, width = item.shape[-3:-1] if is_numpy else item.shape[-2:]
    _check_pixel_count(int(height) * int(width))
    is_uint8 = item.dtype == np.uint8 if is_numpy else item.dtype == torch.uint8
    is_float = np.issubdtype(item.dtype, np.floating) if is_numpy else item.is_floating_point()
    if not (is_uint8 or is_float):
        raise _invalid(f"pixels must be floats in [0, 1] or uint8, got dtype {item.dtype}")
    if is_float:
        low, high = (float(item.min()), float(item.max()))
        if not (PIXEL_RANGE[0] <= low and high <= PIXEL_RANGE[1]):  # also false for NaN
            raise _invalid(f"float pixels must lie in [0, 1], got values in [{low}, {high}]")
    return item.shape[0] if item.ndim == 4 else 1


def _check_pixel_count(pixels: int) -> None:
    if pixels > MAX_IMAGE_PIXELS:
        raise _invalid(f"an image of {pixels:,} pixels is too large (at most {MAX_IMAGE_PIXELS:,}); downscale it first")


def count_images(image: ImageInput) -> int:
    """Validate ``image`` and return how many images it holds (cheap: nothing is resized)."""
    items = _items(image)
    if isinstance(items[0], PIL.Image.Image):
        for item in items:
            if item.width < 1 or item.height < 1:
                raise _invalid(f"got an empty PIL image of size {item.size}")
            _check_pixel_count(item.width * item.height)
        return len(items)
    return sum(_check_array(item) for item in items)


def image_size(image: ImageInput) -> tuple[int, int]:
    """``(height, width)`` of the first image of ``image`` (validated)."""
    count_images(image)
    first = _items(image)[0]
    if isinstance(first, PIL.Image.Image):
        return first.height, first.width
    if isinstance(first, np.ndarray):
        return int(first.shape[-3]), int(first.shape[-2])
    return int(first.shape[-2]), int(first.shape[-1])


def to_pil_images(image: ImageInput) -> list[PIL.Image.Image]:
    """Every image of ``image`` as an RGB PIL image (arrays and tensors through uint8, as PIL holds pixels)."""
    items = _items(image)
    if isinstance(items[0], PIL.Image.Image):
        return [item if item.mode == "RGB" else item.convert("RGB") for item in items]
    images = []
    for item in items:
        batch = _array_to_tensor(item, *_array_hw(item)).float()  # in [0, 1], or [-1, 1]
        if batch.min() < 0:
            batch = batch * 0.5 + 0.5
        pixels = (batch.clamp(0, 1) * UINT8_SCALE).round().to(torch.uint8)
        images += [PIL.Image.fromarray(one.permute(1, 2, 0).cpu().numpy()) for one in pixels]
    return images


def _array_hw(item: np.ndarray | torch.Tensor) -> tuple[int, int]:
    return (int(item.shape[-3]), int(item.shape[-2])) if isinstance(item, np.ndarray) else tuple(item.shape[-2:])


def _pil_to_tensor(item: PIL.Image.Image, height: int, width: int) -> torch.Tensor:
    # the reference does not convert modes (RGBA or grayscale images fail in its VAE); we convert to RGB first
    item = item if item.mode == "RGB" else item.convert("RGB")
    item = item.resize((width, height), resample=PIL_RESAMPLE)
    pixels = np.array(item).astype(np.float32) / UINT8_SCALE
    return torch.from_numpy(pixels).permute(2, 0, 1)[None]


def _array_to_tensor(item: np.ndarray | torch.Tensor, height: int, width: int) -> torch.Tensor:
    if isinstance(item, np.ndarray):
        batch = item if item.ndim == 4 else item[None]
        batch = torch.from_numpy(np.array(batch)).permute(0, 3, 1, 2)  # a copy: the caller's array may be read-only
    else:
        batch = item if item.ndim == 4 else item[None]
    if batch.dtype == torch.uint8:
        batch = batch.to(torch.float32) / UINT8_SCALE  # what the PIL path does with the same pixels
    # the reference interpolates even at the target size (the identity for nearest-neighbour)
    return F.interpolate(batch, size=(height, width), mode=ARRAY_RESIZE_MODE)


def preprocess_image(image: ImageInput, height: int, width: int) -> torch.Tensor:
    """``image`` resized to ``height x width``, as ``(N, 3, height, width)`` in [-1, 1].

    The dtype is float32 for PIL and uint8 input, the input's own float dtype otherwise (the reference maps to
    [-1, 1] before casting to the model dtype).
    """
    count_images(image)
    items = _items(image)
    if isinstance(items[0], PIL.Image.Image):
        # diffusers stacks the pixels as numpy (H, W, 3) arrays and transposes them: a channels-last batch, which
        # the VAE's convolutions compute with other kernels (other rounding) than a contiguous one
        batch = torch.cat([_pil_to_tensor(item, height, width) for item in items])
        batch = batch.contiguous(memory_format=torch.channels_last)
    else:
        batch = torch.cat([_array_to_tensor(item, height, width) for item in items])
    if batch.min() < 0:  # already in [-1, 1]
        return batch
    return 2.0 * batch - 1.0


def repeat_images(pixels: torch.Tensor, times: int) -> torch.Tensor:
    """Each image of a preprocessed batch ``times`` times in a row, in the batch's memory layout (see
    :func:`preprocess_image`)."""
    if times == 1:
        return pixels
    layout = torch.channels_last if pixels.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    return pixels.repeat_interleave(times, dim=0).contiguous(memory_format=layout)
