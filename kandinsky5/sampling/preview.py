"""Cheap previews of latents during sampling: a linear map from the 16 latent channels to RGB.

Where the numbers come from: the loaded VAE itself. Its decoder is linearised once around zero: one batched decode
of a small constant latent per channel (and one of zeros) gives, per channel, the mean RGB change per unit of
latent, and the zero latent gives the offset. Any checkpoint gets its own map, and no table is copied from
elsewhere. A preview costs one ``(..., 16) @ (16, 3)`` product per latent pixel: a latent-resolution image per
latent frame, no decode.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# The side of the constant latents decoded to linearise the decoder (latent pixels): big enough for every
# convolution's receptive field to see the constant, small enough to decode in milliseconds.
PROBE_SIDE = 4
# The size of the latent step of each probe: small enough for the decoder to respond almost linearly.
PROBE_STEP = 0.5


@dataclass(frozen=True)
class LatentPreviewer:
    """``rgb = latent @ weight + bias`` for scaled latents ``(..., C)``; the result in [0, 1]."""

    weight: torch.Tensor  # (C, 3)
    bias: torch.Tensor  # (3,)

    @classmethod
    @torch.no_grad()
    def from_vae(cls, vae) -> LatentPreviewer:
        """Linearise ``vae``'s decoder (see the module doc); works on the VAE's device and dtype."""
        channels = vae.config.latent_channels
        device, dtype = vae.device, vae.dtype
        # the video VAE decodes (batch, C, T, H, W); the image models' 2D VAE (batch, C, H, W)
        frames = (1,) if hasattr(vae.config, "temporal_compression_ratio") else ()
        probes = torch.zeros(channels + 1, channels, *frames, PROBE_SIDE, PROBE_SIDE, device=device, dtype=dtype)
        for channel in range(channels):
            probes[channel + 1, channel] = PROBE_STEP
        decoded = vae.decode(probes).sample.float()
        rgb = decoded.flatten(2).mean(dim=2)  # (C + 1, 3) in [-1, 1]
        # per unit of *scaled* latent (what the sampler holds): the decoder sees latent / scaling_factor
        weight = (rgb[1:] - rgb[:1]) / PROBE_STEP / vae.config.scaling_factor
        return cls(weight=weight.cpu(), bias=rgb[0].cpu())

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> np.ndarray:
        """Scaled channels-last latents ``(batch, T, H, W, C)`` -> uint8 RGB ``(batch, T, H, W, 3)``."""
        channels = self.weight.shape[0]
        rgb = latents[..., :channels].float().cpu() @ self.weight + self.bias
        return ((rgb * 0.5 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
