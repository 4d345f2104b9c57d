"""Automatic spatial tiling of VAE decodes: tile only when the GPU's free memory would not hold an untiled decode.

The VAE itself (:mod:`kandinsky5.models.vae`) only knows the reference's switches: ``use_tiling`` (spatial tiles),
frame-wise temporal tiles, slicing. This module holds our policy on top of them: per ``decode`` call, estimate the
peak activation memory of an untiled decode (:func:`untiled_decode_peak_bytes`) and compare it, with
``AUTO_TILING_HEADROOM``, to what the device has left (``vae.free_memory(device)``, :func:`device_free_bytes` by
default). Untiled decodes equal the reference's default (tiling off); tiled ones its ``enable_tiling()``.

The VAE's ``enable_auto_tiling``, ``tiling_needed`` and ``untiled_decode_peak_bytes`` methods delegate here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from kandinsky5.models.vae import AutoencoderKLHunyuanVideo

# The peak activation memory of an untiled decode, from the reference's measured figure: 21.5 GiB above the weights
# for one 17-frame chunk at 512x768 in bfloat16 (shared/reference/README.md). The peak scales with the values of the
# full-resolution stage: frames x height x width x that stage's channels x bytes per value.
REFERENCE_DECODE_PEAK_BYTES = 21.5 * 2**30
REFERENCE_DECODE_VALUES = 17 * 512 * 768 * 128  # frames x height x width x channels of the last decoder stage
REFERENCE_DECODE_ITEMSIZE = 2  # bfloat16
# Margin over the estimate (allocator fragmentation, the decoded video itself). Small, because the figure is a
# measured peak of the same convolutions. (The reference's (tokens x tokens) attention mask, which we do not build,
# lives only in the mid block at latent resolution, far below the full-resolution stages where the peak lies: it is
# no part of the figure and no saving to subtract.)
AUTO_TILING_HEADROOM = 1.05

# bytes a decode on a device can still take, or None where unknown (then no tiles)
FreeMemory = Callable[[torch.device], int | None]


def estimate_decode_peak_bytes(frames: int, height: int, width: int, channels: int, itemsize: int) -> int:
    """Peak activation bytes of decoding ``frames`` sample frames of ``height`` x ``width`` pixels in one piece
    (no spatial tiles), for a decoder whose full-resolution stage has ``channels`` channels:

        peak = 21.5 GiB * (frames * height * width * channels) / (17 * 512 * 768 * 128) * itemsize / 2

    The peak lies in the full-resolution stages, whose every tensor has ``frames * height * width`` voxels times a
    channel count proportional to ``channels``; the constant is the reference's measured peak above the weights
    (bf16, one 17-frame chunk at 512x768, no tiles).
    """
    values = frames * height * width * channels
    return int(REFERENCE_DECODE_PEAK_BYTES * values / REFERENCE_DECODE_VALUES * itemsize / REFERENCE_DECODE_ITEMSIZE)


def device_free_bytes(device: torch.device) -> int | None:
    """Memory a decode on ``device`` can still take: free device memory plus what PyTorch's allocator holds
    unused; ``None`` where it is not known (CPU), which never tiles."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def untiled_decode_peak_bytes(vae: AutoencoderKLHunyuanVideo, z: torch.Tensor) -> int:
    """Estimated peak activation bytes of ``vae`` decoding latents ``z`` without spatial tiles, in the VAE's
    storage dtype: one temporal chunk at a time when the frame-wise path takes it, one batch element when slicing."""
    num_frames, height, width = z.shape[2:]
    if vae.use_framewise_decoding and num_frames > vae._tile_latent_min_num_frames:
        num_frames = vae._tile_latent_min_num_frames + 1  # one temporal chunk at a time
    ratio = vae.spatial_compression_ratio
    sample_frames = (num_frames - 1) * vae.temporal_compression_ratio + 1
    batch = 1 if vae.use_slicing else z.shape[0]
    itemsize = vae.decoder.conv_out.conv.weight.element_size()
    return batch * estimate_decode_peak_bytes(
        sample_frames, height * ratio, width * ratio, vae.config.block_out_channels[0], itemsize
    )


def auto_tiling_needed(vae: AutoencoderKLHunyuanVideo, z: torch.Tensor) -> bool:
    """The automatic policy's decision for decoding ``z``: the estimated untiled peak, with
    ``AUTO_TILING_HEADROOM``, exceeds what ``vae.free_memory`` reports for ``z``'s device."""
    available = vae.free_memory(z.device)
    return available is not None and untiled_decode_peak_bytes(vae, z) * AUTO_TILING_HEADROOM > available


def enable_auto_tiling(vae: AutoencoderKLHunyuanVideo, free_memory: FreeMemory | None = None) -> None:
    """Let ``vae`` decode in spatial tiles only when memory needs it (see :func:`auto_tiling_needed`); forced
    tiling (``enable_tiling``) is turned off. ``free_memory(device)`` (bytes, or None for "unknown: don't tile")
    defaults to :func:`device_free_bytes`."""
    if free_memory is not None and not callable(free_memory):
        raise TypeError(
            f"free_memory: expected a function of a torch.device returning bytes (or None), got {free_memory!r}"
        )
    vae.use_tiling = False
    vae.use_auto_tiling = True
    vae.free_memory = free_memory or device_free_bytes
