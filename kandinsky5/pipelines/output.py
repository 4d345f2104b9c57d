"""Pipeline output and the conversion of decoded video to the requested type."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from PIL import Image

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


class PipelineOutput:
    """diffusers' ``BaseOutput`` access: by field name (``out["frames"]``), by position, or as a tuple."""

    def __getitem__(self, index):
        if isinstance(index, str):
            return getattr(self, index)
        return self.to_tuple()[index]

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, field.name) for field in fields(self))


@dataclass
class KandinskyPipelineOutput(PipelineOutput):
    """``frames``: per video, a list of PIL images (``"pil"``), or an array/tensor ``(batch, frames, ...)``."""

    frames: Any


@dataclass
class KandinskyImagePipelineOutput(PipelineOutput):
    """``image``: a list of PIL images (``"pil"``), an array ``(batch, H, W, 3)`` (``"np"``), a tensor
    ``(batch, 3, H, W)`` (``"pt"``), or the latents ``(batch, 1, H/8, W/8, C)`` (``"latent"``)."""

    image: Any


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Channels-last latents ``(batch, T, H, W, C)``, as the sampler holds them (scaled) -> decoded video
    ``(batch, 3, frames, H, W)`` in [-1, 1], with ``vae`` (the pipeline's decode; ``kandinsky5 decode`` uses it with
    the VAE alone)."""
    latents = latents.to(vae.dtype).permute(0, 4, 1, 2, 3)
    return vae.decode(latents / vae.config.scaling_factor).sample


def postprocess_video(video: torch.Tensor, output_type: str):
    """Decoded video ``(batch, 3, frames, H, W)`` in [-1, 1] -> ``"np"`` ``(batch, frames, H, W, 3)`` float32,
    ``"pt"`` ``(batch, frames, 3, H, W)``, or ``"pil"`` lists of images; values in [0, 1] (PIL: rounded bytes)."""
    video = (video.permute(0, 2, 1, 3, 4) * 0.5 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return video
    array = video.permute(0, 1, 3, 4, 2).float().cpu().numpy()
    if output_type == "np":
        return array
    if output_type == "pil":
        return [[Image.fromarray(frame) for frame in (clip * 255).round().astype(np.uint8)] for clip in array]
    raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")


def decode_image_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Channels-last one-frame latents ``(batch, 1, H, W, C)`` (scaled) -> decoded images ``(batch, 3, H, W)`` in
    [-1, 1], with the image models' 2D ``vae`` (scaled by its ``scaling_factor`` alone, as diffusers' and the
    original's image pipelines: the FLUX VAE's ``shift_factor`` is not applied)."""
    # contiguous, as diffusers' reshape leaves it (a channels-last view would take other convolution kernels)
    latents = latents.to(vae.dtype)[:, 0].permute(0, 3, 1, 2).contiguous()
    return vae.decode(latents / vae.config.scaling_factor).sample


def postprocess_image(images: torch.Tensor, output_type: str):
    """Decoded images ``(batch, 3, H, W)`` in [-1, 1] -> ``"np"`` ``(batch, H, W, 3)`` float32, ``"pt"``
    ``(batch, 3, H, W)``, or ``"pil"`` a list of images; values in [0, 1] (PIL: rounded bytes). Each image is a
    one-frame video to :func:`postprocess_video`."""
    video = postprocess_video(images.unsqueeze(2), output_type)
    return [clip[0] for clip in video] if output_type == "pil" else video[:, 0]
