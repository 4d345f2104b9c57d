"""The FLUX-style 2D image VAE of the Kandinsky 5.0 image models (Diffusers' ``AutoencoderKL``), written for this
package.

Parameter names equal Diffusers' so the image checkpoints' ``vae/`` folders load as they are (``load_component``
assigns their tensors directly). Encoding and decoding follow the reference step by step, spatial tiling and its
blending included: ``encode(image).latent_dist`` and ``decode(latents).sample``, as in Diffusers.

Layout: an image ``(B, 3, H, W)`` in [-1, 1] maps to latents ``(B, latent_channels, H / 2**(n-1), W / 2**(n-1))``
with ``n = len(block_out_channels)`` (8x for the official four blocks). The model applies neither ``scaling_factor``
nor ``shift_factor``: like Diffusers, callers do (``latents = (z - shift_factor) * scaling_factor``).
"""

from __future__ import annotations

import dataclasses
import sys

import torch
import torch.nn.functional as F
from torch import nn

from kandinsky5.models.base import ComponentConfig, ModelBase
from kandinsky5.models.vae import (
    DecoderOutput,
    DiagonalGaussianDistribution,
    EncoderOutput,
    MidBlock,
    make_activation,
    resnet_stack,
    run_stage,
    spatial_tiles,
    stitch_tiles,
)

DOWN_BLOCK_TYPE = "DownEncoderBlock2D"
UP_BLOCK_TYPE = "UpDecoderBlock2D"
CONV_KERNEL = 3
NORM_EPS = 1e-6
# Each resampling layer halves (encoder) or doubles (decoder) height and width.
RESAMPLE_FACTOR = 2
# The reference's downsampling convolution has no padding of its own: one zero row and column after the image.
DOWNSAMPLE_PAD = (0, 1, 0, 1)
# Resnet-attention pairs after the mid block's first resnet.
# The reference's tiles overlap by this fraction of a tile.
TILE_OVERLAP_FACTOR = 0.25


@dataclasses.dataclass
class AutoencoderKL2DConfig(ComponentConfig):
    """Diffusers' ``AutoencoderKL`` config; defaults are Diffusers' (a key missing from ``config.json`` means what it
    means there). The official image checkpoints (FLUX's VAE) set every key: 16 latent channels, blocks
    (128, 256, 512, 512), 2 layers per block, no quant convolutions."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = (DOWN_BLOCK_TYPE,)
    up_block_types: tuple[str, ...] = (UP_BLOCK_TYPE,)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True


def conv3x3(in_channels: int, out_channels: int, stride: int = 1, padding: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, CONV_KERNEL, stride=stride, padding=padding)


class ResnetBlock(nn.Module):
    """GroupNorm, activation, 3x3 convolution, twice, plus the input (1x1-projected when the width changes)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, act_fn: str):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=NORM_EPS)
        self.conv1 = conv3x3(in_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=NORM_EPS)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.nonlinearity = make_activation(act_fn)
        projects = in_channels != out_channels
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1) if projects else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.nonlinearity(self.norm1(x)))
        h = self.conv2(self.nonlinearity(self.norm2(h)))
        residual = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return residual + h


class SpatialAttention(nn.Module):
    """Single-head self-attention over all pixels, with a residual connection. Parameter names are those of
    Diffusers' ``Attention`` (``to_out.0``: its ``to_out.1`` is a parameterless dropout)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=NORM_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        flat = x.view(batch, channels, height * width)  # (B, C, tokens)
        normed = self.group_norm(flat).transpose(1, 2)
        # one head spanning all channels: (B, 1, tokens, C)
        query = self.to_q(normed).unsqueeze(1)
        key = self.to_k(normed).unsqueeze(1)
        value = self.to_v(normed).unsqueeze(1)
        attended = F.scaled_dot_product_attention(query, key, value).squeeze(1)
        out = self.to_out[0](attended).transpose(1, 2).reshape(batch, channels, height, width)
        return out + x


def mid_block(channels: int, groups: int, act_fn: str, add_attention: bool) -> MidBlock:
    """The video VAE's mid block with the image VAE's 2D attention and resnets."""
    return MidBlock(channels, groups, act_fn, add_attention, attention=SpatialAttention, resnet=ResnetBlock)


class Downsample(nn.Module):
    """Strided 3x3 convolution after one zero row below and one zero column right of the input."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv3x3(channels, channels, stride=RESAMPLE_FACTOR, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, DOWNSAMPLE_PAD, mode="constant", value=0.0))


class Upsample(nn.Module):
    """Nearest-neighbour doubling, then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv3x3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=float(RESAMPLE_FACTOR), mode="nearest"))


class DownBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, act_fn: str, down: bool):
        super().__init__()
        self.resnets = resnet_stack(in_channels, out_channels, num_layers, groups, act_fn, resnet=ResnetBlock)
        self.downsamplers = nn.ModuleList([Downsample(out_channels)]) if down else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_stage(x, self.resnets, self.downsamplers)


class UpBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, act_fn: str, up: bool):
        super().__init__()
        self.resnets = resnet_stack(in_channels, out_channels, num_layers, groups, act_fn, resnet=ResnetBlock)
        self.upsamplers = nn.ModuleList([Upsample(out_channels)]) if up else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_stage(x, self.resnets, self.upsamplers)


class Encoder(nn.Module):
    """Image ``(B, in_channels, H, W)`` -> mean and log-variance ``(B, 2 * latent_channels, h, w)``."""

    def __init__(self, config: AutoencoderKL2DConfig):
        super().__init__()
        channels = config.block_out_channels
        groups, act_fn, last = config.norm_num_groups, config.act_fn, len(channels) - 1
        self.conv_in = conv3x3(config.in_channels, channels[0])
        self.down_blocks = nn.ModuleList(
            DownBlock(channels[max(i - 1, 0)], channels[i], config.layers_per_block, groups, act_fn, i < last)
            for i in range(len(channels))
        )
        self.mid_block = mid_block(channels[-1], groups, act_fn, config.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=NORM_EPS)
        # the reference's output activation is SiLU whatever act_fn says
        self.conv_act = nn.SiLU()
        self.conv_out = conv3x3(channels[-1], 2 * config.latent_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """Latent ``(B, latent_channels, h, w)`` -> image ``(B, out_channels, H, W)``."""

    def __init__(self, config: AutoencoderKL2DConfig):
        super().__init__()
        channels = config.block_out_channels[::-1]
        groups, act_fn, last = config.norm_num_groups, config.act_fn, len(channels) - 1
        self.conv_in = conv3x3(config.latent_channels, channels[0])
        # the decoder's blocks have one resnet more than the encoder's; up_blocks before mid_block is the
        # reference's registration order
        self.up_blocks = nn.ModuleList(
            UpBlock(channels[max(i - 1, 0)], channels[i], config.layers_per_block + 1, groups, act_fn, i < last)
            for i in range(len(channels))
        )
        self.mid_block = mid_block(channels[0], groups, act_fn, config.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=NORM_EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = conv3x3(channels[-1], config.out_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


class AutoencoderKL2D(ModelBase):
    """FLUX's image VAE: ``encode(image).latent_dist`` (``.mode()``, ``.sample(generator)``, ``.mean``,
    ``.logvar``) and ``decode(latents).sample``, as Diffusers' ``AutoencoderKL``.

    ``enable_tiling()`` encodes and decodes images larger than a tile in overlapping tiles blended as the reference
    blends them (tile ``sample_size`` pixels, a quarter of it overlapping); ``enable_slicing()`` runs batch elements
    one at a time.
    """

    config_class = AutoencoderKL2DConfig
    checkpoint_class_name = "AutoencoderKL"

    def __init__(self, config: AutoencoderKL2DConfig):
        super().__init__(config)
        unknown = [t for t in config.down_block_types if t != DOWN_BLOCK_TYPE]
        unknown += [t for t in config.up_block_types if t != UP_BLOCK_TYPE]
        if unknown:
            raise ValueError(f"unsupported block types {unknown}")
        num_blocks = len(config.block_out_channels)
        if len(config.down_block_types) != num_blocks or len(config.up_block_types) != num_blocks:
            raise ValueError("down_block_types and up_block_types need one entry per block_out_channels entry")
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        latent = config.latent_channels
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, kernel_size=1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent, latent, kernel_size=1) if config.use_post_quant_conv else None

        self.spatial_compression_ratio = RESAMPLE_FACTOR ** (num_blocks - 1)
        self.use_slicing = False
        self.use_tiling = False
        sample_size = config.sample_size
        sample_size = sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size
        # the reference's tile geometry (its attribute names): square tiles of tile_sample_min_size pixels,
        # tile_latent_min_size latent pixels, overlapping by tile_overlap_factor of a tile
        self.tile_sample_min_size = sample_size
        self.tile_latent_min_size = int(sample_size / self.spatial_compression_ratio)
        self.tile_overlap_factor = TILE_OVERLAP_FACTOR

    # ---- switches ----

    def enable_tiling(self, tile_sample_min_size: int | None = None, tile_overlap_factor: float | None = None) -> None:
        """Encode and decode images larger than a tile in overlapping tiles; sizes left out keep their value (the
        default tile is ``sample_size`` pixels, the reference's)."""
        self.use_tiling = True
        if tile_sample_min_size:
            self.tile_sample_min_size = tile_sample_min_size
            self.tile_latent_min_size = int(tile_sample_min_size / self.spatial_compression_ratio)
        if tile_overlap_factor is not None:
            self.tile_overlap_factor = tile_overlap_factor

    def disable_tiling(self) -> None:
        self.use_tiling = False

    def enable_slicing(self) -> None:
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    # ---- encoding ----

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> EncoderOutput | tuple[DiagonalGaussianDistribution]:
        """Image ``(B, C, H, W)`` in [-1, 1] -> posterior over latents ``(B, latent, H/8, W/8)``."""
        if self.use_slicing and x.shape[0] > 1:
            moments = torch.cat([self._encode(part) for part in x.split(1)])
        else:
            moments = self._encode(x)
        posterior = DiagonalGaussianDistribution(moments)
        return EncoderOutput(latent_dist=posterior) if return_dict else (posterior,)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_tiling and max(x.shape[-2:]) > self.tile_sample_min_size:
            return self._tiled_encode(x)
        return self._encode_tile(x)

    def _encode_tile(self, x: torch.Tensor) -> torch.Tensor:
        moments = self.encoder(x)
        return moments if self.quant_conv is None else self.quant_conv(moments)

    def _tiled_encode(self, x: torch.Tensor) -> torch.Tensor:
        stride = int(self.tile_sample_min_size * (1 - self.tile_overlap_factor))
        blend = int(self.tile_latent_min_size * self.tile_overlap_factor)
        return self._tiled(x, self._encode_tile, self.tile_sample_min_size, stride, blend, self.tile_latent_min_size)

    # ---- decoding ----

    def decode(
        self, z: torch.Tensor, return_dict: bool = True, generator: torch.Generator | None = None
    ) -> DecoderOutput | tuple[torch.Tensor]:
        """Latents ``(B, latent, h, w)`` (already unscaled and unshifted) -> image ``(B, C, 8h, 8w)``, roughly in
        [-1, 1]. ``generator`` is accepted for Diffusers' signature and unused, as there."""
        if self.use_slicing and z.shape[0] > 1:
            decoded = torch.cat([self._decode(part) for part in z.split(1)])
        else:
            decoded = self._decode(z)
        return DecoderOutput(sample=decoded) if return_dict else (decoded,)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.use_tiling and max(z.shape[-2:]) > self.tile_latent_min_size:
            return self._tiled_decode(z)
        return self._decode_tile(z)

    def _decode_tile(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def _tiled_decode(self, z: torch.Tensor) -> torch.Tensor:
        stride = int(self.tile_latent_min_size * (1 - self.tile_overlap_factor))
        blend = int(self.tile_sample_min_size * self.tile_overlap_factor)
        return self._tiled(z, self._decode_tile, self.tile_latent_min_size, stride, blend, self.tile_sample_min_size)

    @staticmethod
    def _tiled(x: torch.Tensor, run, tile: int, stride: int, blend: int, out_tile: int) -> torch.Tensor:
        """Run ``run`` on square ``tile``-sized tiles of ``x`` every ``stride`` and stitch the results as the
        reference does: each output tile cross-faded over ``blend`` rows and columns with the tiles above and to the
        left, its first ``out_tile - blend`` rows and columns kept. Like the reference, nothing is cropped after."""
        rows = [[run(piece) for piece in row] for row in spatial_tiles(x, (tile, tile), (stride, stride))]
        keep = out_tile - blend
        return stitch_tiles(rows, (blend, blend), (keep, keep), (sys.maxsize, sys.maxsize))

    def forward(
        self,
        sample: torch.Tensor,
        sample_posterior: bool = False,
        return_dict: bool = True,
        generator: torch.Generator | None = None,
    ) -> DecoderOutput | tuple[torch.Tensor]:
        """Encode then decode: the posterior's sample (``sample_posterior``) or its mode."""
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        return self.decode(z, return_dict=return_dict)
