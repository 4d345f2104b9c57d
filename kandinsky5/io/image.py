"""Loading a conditioning image, with the behaviour of ``diffusers.utils.load_image``."""

from __future__ import annotations

import io
import os
import urllib.error
import urllib.request
from collections.abc import Callable

import PIL.Image
import PIL.ImageOps

URL_SCHEMES = ("http://", "https://")
# Seconds to wait for an image server, as diffusers' DIFFUSERS_REQUEST_TIMEOUT.
DOWNLOAD_TIMEOUT_S = 60


def _download(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            return response.read()
    except (urllib.error.URLError, TimeoutError, ValueError) as error:
        reason = getattr(error, "reason", error)
        raise OSError(f"Could not download the image from {url}: {reason}") from error


def load_image(
    image: str | os.PathLike | PIL.Image.Image,
    convert_method: Callable[[PIL.Image.Image], PIL.Image.Image] | None = None,
) -> PIL.Image.Image:
    """Load ``image`` (a local path, an http(s) URL or a PIL image) as a PIL image.

    The EXIF orientation is applied; then ``convert_method`` when given, else a conversion to RGB.
    Raises ValueError for a path that is not a file or an argument of another type, OSError when a download fails
    or the file is not an image.
    """
    if isinstance(image, str) and image.startswith(URL_SCHEMES):
        image = PIL.Image.open(io.BytesIO(_download(image)))
        image.load()
    elif isinstance(image, str | os.PathLike):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise ValueError(
                f"Incorrect path or URL: {path!r} is not a file, and URLs must start with http:// or https://"
            )
        image = PIL.Image.open(path)
        image.load()  # reads the pixels now; Pillow then closes the file it opened
    elif not isinstance(image, PIL.Image.Image):
        raise ValueError(f"image: expected a local path, an http(s) URL or a PIL image, got {type(image).__name__}")

    image = PIL.ImageOps.exif_transpose(image)
    if convert_method is not None:
        return convert_method(image)
    return image.convert("RGB")
