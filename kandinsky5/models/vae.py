"""The HunyuanVideo causal 3D VAE (Diffusers' ``AutoencoderKLHunyuanVideo``), written for this package.

Parameter names equal Diffusers' so the official ``vae/`` checkpoints load as they are. Encoding and decoding follow
the reference step by step, tiling and blending included: a real video (121 frames) always goes through the
frame-wise (temporal tiled) path, and its seams must be blended exactly where and how the reference blends them.

Layout: every convolution is causal in time (it sees the current and earlier frames only), so a video of
``1 + 4 k`` frames maps to ``1 + k`` latent frames, the first frame being coded alone like an image.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from kandinsky5.models.base import ComponentConfig, ModelBase
from kandinsky5.sampling.noise import randn

logger = logging.getLogger(__name__)

DOWN_BLOCK_TYPE = "HunyuanVideoDownBlock3D"
UP_BLOCK_TYPE = "HunyuanVideoUpBlock3D"
NUM_BLOCKS = 4
CONV_KERNEL = 3
NORM_EPS = 1e-6
# Each resampling layer halves (encoder) or doubles (decoder) the axes it acts on.
RESAMPLE_FACTOR = 2
# The reference has a decoder layout for this temporal ratio only.
SUPPORTED_TEMPORAL_RATIO = 4
# Resnet-attention pairs after the mid block's first resnet.
MID_BLOCK_LAYERS = 1
# The reference clamps the log-variance to this range before exponentiating it.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "swish": nn.SiLU,
    "silu": nn.SiLU,
    "mish": nn.Mish,
    "gelu": nn.GELU,
    "relu": nn.ReLU,
}

# The reference's tiling defaults, in pixels and frames of the sample (decoded) space.
TILE_SAMPLE_MIN_HEIGHT = 256
TILE_SAMPLE_MIN_WIDTH = 256
TILE_SAMPLE_MIN_NUM_FRAMES = 16
TILE_SAMPLE_STRIDE_HEIGHT = 192
TILE_SAMPLE_STRIDE_WIDTH = 192
TILE_SAMPLE_STRIDE_NUM_FRAMES = 12


@dataclasses.dataclass
class HunyuanVideoVAEConfig(ComponentConfig):
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    down_block_types: tuple[str, ...] = (DOWN_BLOCK_TYPE,) * NUM_BLOCKS
    up_block_types: tuple[str, ...] = (UP_BLOCK_TYPE,) * NUM_BLOCKS
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    act_fn: str = "silu"
    norm_num_groups: int = 32
    scaling_factor: float = 0.476986
    spatial_compression_ratio: int = 8
    temporal_compression_ratio: int = 4
    mid_block_add_attention: bool = True


def make_activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"act_fn: unknown activation {name!r}, expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def resampling_factors(num_blocks: int, spatial_ratio: int, temporal_ratio: int) -> list[tuple[int, int, int]]:
    """``(time, height, width)`` factor of each block's resampling layer, ``(1, 1, 1)`` for none.

    The encoder's block ``i`` and the decoder's block ``i`` (counted from the latent side) use the same factors:
    the first ``log2(spatial_ratio)`` blocks resample space; time is resampled by the ``log2(temporal_ratio)``
    blocks before the last one, which never resamples.
    """
    spatial_layers = int(math.log2(spatial_ratio))
    temporal_layers = int(math.log2(temporal_ratio))
    factors = []
    for i in range(num_blocks):
        is_last = i == num_blocks - 1
        spatial = RESAMPLE_FACTOR if i < spatial_layers else 1
        temporal = RESAMPLE_FACTOR if i >= num_blocks - 1 - temporal_layers and not is_last else 1
        factors.append((temporal, spatial, spatial))
    return factors


def weight_memory_format(conv: nn.Conv3d) -> torch.memory_format:
    """The layout of a cubic convolution's weights: ``channels_last_3d`` after
    ``vae.to(memory_format=torch.channels_last_3d)``, else the default. Activations follow it."""
    channels_last = conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    return torch.channels_last_3d if channels_last and not conv.weight.is_contiguous() else torch.contiguous_format


def causal_pad(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Pad a ``(B, C, T, H, W)`` video for a cubic kernel so that the convolution sees no future frame.

    Time gets ``kernel_size - 1`` frames in front and none behind; height and width get ``kernel_size // 2`` on
    both sides ("same" size). Borders are replicated, so the first frame acts as its own past.
    """
    space = kernel_size // 2
    return F.pad(x, (space, space, space, space, kernel_size - 1, 0), mode="replicate")


class CausalConv3d(nn.Module):
    """A cubic 3D convolution, causal in time (see ``causal_pad``)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = CONV_KERNEL,
        stride: int | tuple[int, int, int] = 1,
    ):
        super().__init__()
        self.kernel_size = kernel_size
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(causal_pad(x, self.kernel_size))


class CausalResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int, act_fn: str):
        super().__init__()
        self.nonlinearity = make_activation(act_fn)
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=NORM_EPS)
        self.conv1 = CausalConv3d(in_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=NORM_EPS)
        self.conv2 = CausalConv3d(out_channels, out_channels)
        # a 1x1x1 projection when the residual changes width
        projects = in_channels != out_channels
        self.conv_shortcut = CausalConv3d(in_channels, out_channels, kernel_size=1) if projects else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the attention hands back a permuted view; the reference makes it contiguous before the convolutions (in
        # the weights' layout: with channels-last weights that view is already in place)
        x = x.contiguous(memory_format=weight_memory_format(self.conv1.conv))
        h = self.conv1(self.nonlinearity(self.norm1(x)))
        h = self.conv2(self.nonlinearity(self.norm2(h)))
        residual = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return h + residual


def causal_frame_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, num_frames: int
) -> torch.Tensor:
    """Attention over ``(B, heads, tokens, C)`` tokens ordered frame-major, where a query sees every token of its own
    and earlier frames: the reference's additive causal mask, without the mask.

    One unmasked attention per frame over the visible prefix gives the same softmax over the same keys, builds no
    ``(tokens, tokens)`` mask (1.9 GB in bf16 for a 5-frame chunk at 512x768), lets kernels that take no mask serve
    it, and skips the masked half of the work.
    """
    tokens_per_frame = query.shape[-2] // num_frames
    out = torch.empty_like(query)
    for frame in range(num_frames):
        start, visible = frame * tokens_per_frame, (frame + 1) * tokens_per_frame
        out[..., start:visible, :] = F.scaled_dot_product_attention(
            query[..., start:visible, :], key[..., :visible, :], value[..., :visible, :]
        )
    return out


class CausalFrameAttention(nn.Module):
    """Single-head self-attention over all voxels of the video, causal by frame, with a residual connection.

    Parameter names are those of Diffusers' ``Attention`` (``to_out.0``: its ``to_out.1`` is a parameterless
    dropout).
    """

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=NORM_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, num_frames, height, width = x.shape
        tokens = x.permute(0, 2, 3, 4, 1).flatten(1, 3)  # (B, T*H*W, C)
        normed = self.group_norm(tokens.transpose(1, 2)).transpose(1, 2)
        # one head spanning all channels: (B, 1, tokens, C)
        query = self.to_q(normed).unsqueeze(1)
        key = self.to_k(normed).unsqueeze(1)
        value = self.to_v(normed).unsqueeze(1)
        attended = causal_frame_attention(query, key, value, num_frames).squeeze(1)
        tokens = self.to_out[0](attended) + tokens
        return tokens.unflatten(1, (num_frames, height, width)).permute(0, 4, 1, 2, 3)


class MidBlock(nn.Module):
    """resnet, then (attention, resnet) pairs, at the lowest resolution. ``attention`` and ``resnet`` are the
    block classes (the video VAE's causal ones by default; the image VAE passes its 2D ones)."""

    def __init__(
        self,
        channels: int,
        groups: int,
        act_fn: str,
        add_attention: bool,
        attention: type[nn.Module] | None = None,
        resnet: type[nn.Module] | None = None,
    ):
        super().__init__()
        attention = attention or CausalFrameAttention
        resnet = resnet or CausalResnetBlock
        # registered in the reference's order, so state_dict() lists keys as Diffusers does
        attentions = [attention(channels, groups) for _ in range(MID_BLOCK_LAYERS)] if add_attention else []
        self.attentions = nn.ModuleList(attentions)
        self.resnets = nn.ModuleList(resnet(channels, channels, groups, act_fn) for _ in range(1 + MID_BLOCK_LAYERS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for i, resnet in enumerate(self.resnets[1:]):
            if self.attentions:
                x = self.attentions[i](x)
            x = resnet(x)
        return x


class CausalDownsample(nn.Module):
    def __init__(self, channels: int, factor: tuple[int, int, int]):
        super().__init__()
        self.conv = CausalConv3d(channels, channels, stride=factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class CausalUpsample(nn.Module):
    """Nearest-neighbour upsampling that keeps the first frame single: ``1 + n`` frames become
    ``1 + factor * n``, the inverse of the strided causal downsampling."""

    def __init__(self, channels: int, factor: tuple[int, int, int]):
        super().__init__()
        self.factor = factor
        self.conv = CausalConv3d(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = F.interpolate(x[:, :, 0], scale_factor=self.factor[1:], mode="nearest").unsqueeze(2)
        if x.shape[2] > 1:
            # F.interpolate used to give wrong results on non-contiguous input (pytorch#81665); made contiguous in
            # the weights' layout, so a channels-last VAE stays channels-last here
            rest = x[:, :, 1:].contiguous(memory_format=weight_memory_format(self.conv.conv))
            rest = F.interpolate(rest, scale_factor=self.factor, mode="nearest")
            x = torch.cat((first, rest), dim=2)
        else:
            x = first
        return self.conv(x)


def resnet_stack(
    in_channels: int,
    out_channels: int,
    num_layers: int,
    groups: int,
    act_fn: str,
    resnet: type[nn.Module] | None = None,
) -> nn.ModuleList:
    """The resnet blocks (``resnet``, default the causal one) of one encoder or decoder stage; the first one
    changes the channel count."""
    resnet = resnet or CausalResnetBlock
    return nn.ModuleList(
        resnet(in_channels if i == 0 else out_channels, out_channels, groups, act_fn) for i in range(num_layers)
    )


def run_stage(x: torch.Tensor, resnets: nn.ModuleList, resamplers: nn.ModuleList | None) -> torch.Tensor:
    for resnet in resnets:
        x = resnet(x)
    for resampler in resamplers or ():
        x = resampler(x)
    return x


class DownBlock(nn.Module):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_layers: int,
        groups: int,
        act_fn: str,
        factor: tuple[int, int, int],
    ):
        super().__init__()
        self.resnets = resnet_stack(in_channels, out_channels, num_layers, groups, act_fn)
        resamples = factor != (1, 1, 1)
        self.downsamplers = nn.ModuleList([CausalDownsample(out_channels, factor)]) if resamples else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_stage(x, self.resnets, self.downsamplers)


class UpBlock(nn.Module):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_layers: int,
        groups: int,
        act_fn: str,
        factor: tuple[int, int, int],
    ):
        super().__init__()
        self.resnets = resnet_stack(in_channels, out_channels, num_layers, groups, act_fn)
        resamples = factor != (1, 1, 1)
        self.upsamplers = nn.ModuleList([CausalUpsample(out_channels, factor)]) if resamples else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_stage(x, self.resnets, self.upsamplers)


class Encoder(nn.Module):
    """Video ``(B, in_channels, T, H, W)`` -> mean and log-variance ``(B, 2 * latent_channels, t, h, w)``."""

    def __init__(self, config: HunyuanVideoVAEConfig):
        super().__init__()
        channels = config.block_out_channels
        groups, act_fn = config.norm_num_groups, config.act_fn
        factors = resampling_factors(len(channels), config.spatial_compression_ratio, config.temporal_compression_ratio)
        self.conv_in = CausalConv3d(config.in_channels, channels[0])
        self.down_blocks = nn.ModuleList(
            DownBlock(channels[max(i - 1, 0)], channels[i], config.layers_per_block, groups, act_fn, factor)
            for i, factor in enumerate(factors)
        )
        self.mid_block = MidBlock(channels[-1], groups, act_fn, config.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=NORM_EPS)
        # the reference's output activation is SiLU whatever act_fn says
        self.conv_act = nn.SiLU()
        self.conv_out = CausalConv3d(channels[-1], 2 * config.latent_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """Latent ``(B, latent_channels, t, h, w)`` -> video ``(B, out_channels, T, H, W)``."""

    def __init__(self, config: HunyuanVideoVAEConfig):
        super().__init__()
        channels = config.block_out_channels[::-1]
        groups, act_fn = config.norm_num_groups, config.act_fn
        factors = resampling_factors(len(channels), config.spatial_compression_ratio, config.temporal_compression_ratio)
        self.conv_in = CausalConv3d(config.latent_channels, channels[0])
        # the decoder's blocks have one resnet more than the encoder's; up_blocks before mid_block is the
        # reference's registration order
        self.up_blocks = nn.ModuleList(
            UpBlock(channels[max(i - 1, 0)], channels[i], config.layers_per_block + 1, groups, act_fn, factor)
            for i, factor in enumerate(factors)
        )
        self.mid_block = MidBlock(channels[0], groups, act_fn, config.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=NORM_EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = CausalConv3d(channels[-1], config.out_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


class DiagonalGaussianDistribution:
    """The encoder's posterior: a Gaussian per latent element, from channels ``[mean | log-variance]``."""

    def __init__(self, parameters: torch.Tensor):
        self.parameters = parameters
        self.mean, logvar = parameters.chunk(2, dim=1)
        self.logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
        self.std = torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> torch.Tensor:
        return torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        # noise drawn as the reference draws it (same shape, dtype and device rules), so a seed gives its sample
        noise = randn(tuple(self.mean.shape), generator, self.parameters.device, self.parameters.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean


@dataclasses.dataclass
class EncoderOutput:
    latent_dist: DiagonalGaussianDistribution


@dataclasses.dataclass
class DecoderOutput:
    sample: torch.Tensor


def blend_(previous: torch.Tensor, current: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """Cross-fade, in place, the first ``extent`` slices of ``current`` along ``dim`` from the last ones of
    ``previous``; returns ``current``.

    Slice by slice with Python-float weights, as the reference does, so the rounding (half precision included)
    is the reference's. Being in place matters too: a tile blended into is later blended from.
    """
    extent = min(previous.shape[dim], current.shape[dim], extent)
    for k in range(extent):
        weight = k / extent
        past = previous.select(dim, previous.shape[dim] - extent + k)
        current.select(dim, k).copy_(past * (1 - weight) + current.select(dim, k) * weight)
    return current


def join_time_tiles(tiles: list[torch.Tensor], blend_frames: int, stride_frames: int) -> torch.Tensor:
    """Concatenate temporal tiles along time, each blended from its predecessor; the first tile also keeps the
    causal first frame, hence ``stride + 1`` frames."""
    kept = []
    for i, tile in enumerate(tiles):
        if i == 0:
            kept.append(tile[:, :, : stride_frames + 1])
        else:
            blend_(tiles[i - 1], tile, blend_frames, dim=2)
            kept.append(tile[:, :, :stride_frames])
    return torch.cat(kept, dim=2)


def spatial_tiles(x: torch.Tensor, tile_size: tuple[int, int], stride: tuple[int, int]) -> list[list[torch.Tensor]]:
    """The overlapping ``(height, width)`` tiles of ``x`` (views), row by row: ``tile_size`` every ``stride``."""
    height, width = x.shape[-2:]
    return [
        [x[..., i : i + tile_size[0], j : j + tile_size[1]] for j in range(0, width, stride[1])]
        for i in range(0, height, stride[0])
    ]


def stitch_tiles(
    rows: list[list[torch.Tensor]], blend: tuple[int, int], keep: tuple[int, int], out_size: tuple[int, int]
) -> torch.Tensor:
    """Stitch processed tiles (``rows``, as :func:`spatial_tiles` lays them out): each is blended, in place, with the
    tile above (``blend[0]``) and the tile to the left (``blend[1]``), its first ``keep`` rows and columns kept, and
    the whole cropped to ``out_size``."""
    stitched_rows = []
    for i, row in enumerate(rows):
        kept = []
        for j, tile in enumerate(row):
            if i > 0:
                blend_(rows[i - 1][j], tile, blend[0], dim=-2)
            if j > 0:
                blend_(row[j - 1], tile, blend[1], dim=-1)
            kept.append(tile[..., : keep[0], : keep[1]])
        stitched_rows.append(torch.cat(kept, dim=-1))
    return torch.cat(stitched_rows, dim=-2)[..., : out_size[0], : out_size[1]]


def tile_spatially(
    x: torch.Tensor,
    run: Callable[[torch.Tensor], torch.Tensor],
    tile_size: tuple[int, int],
    stride: tuple[int, int],
    blend: tuple[int, int],
    keep: tuple[int, int],
    out_size: tuple[int, int],
) -> torch.Tensor:
    """Run ``run`` on overlapping ``(height, width)`` tiles of ``x`` and stitch the results.

    ``tile_size`` and ``stride`` are in the input's space; ``blend`` (overlap cross-faded with the tile above and the
    tile to the left), ``keep`` (part of each tile kept) and ``out_size`` (final crop) in the output's space.
    """
    rows = [[run(tile) for tile in row] for row in spatial_tiles(x, tile_size, stride)]
    return stitch_tiles(rows, blend, keep, out_size)


@dataclasses.dataclass(frozen=True)
class TiledDecode:
    """One decode as the tile decodes it is made of: ``inputs``, the latent pieces (views) in the order they are
    decoded, each by ``vae._decode_tile``; ``join(outputs)`` blends and joins their decoded pieces, taken from the
    iterator ``outputs`` in that order, into the video.

    ``join`` pulls the pieces as it needs them, so a lazy ``map`` over ``inputs`` decodes them in the order and with
    the memory of a decode done in one place; ``kandinsky5.runtime.parallel.vae`` decodes them on several ranks and
    joins the gathered pieces with the same code, hence the same bits.
    """

    inputs: list[torch.Tensor]
    join: Callable[[Iterator[torch.Tensor]], torch.Tensor]

    @classmethod
    def single(cls, z: torch.Tensor) -> TiledDecode:
        """A decode in one piece."""
        return cls([z], next)

    def run(self, decode_tile: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Decode every piece with ``decode_tile`` (lazily, in order) and join them."""
        return self.join(map(decode_tile, self.inputs))


class AutoencoderKLHunyuanVideo(ModelBase):
    """HunyuanVideo's causal video VAE: ``encode(video).latent_dist`` and ``decode(latents).sample``.

    Long videos are encoded and decoded in overlapping temporal tiles by default (``use_framewise_encoding``,
    ``use_framewise_decoding``), as in the reference; ``enable_tiling()`` adds overlapping spatial tiles. By default
    a decode is spatially tiled only when the GPU's free memory would not hold an untiled one
    (``enable_auto_tiling``); ``disable_tiling()`` turns that off too, as the reference behaves.

    The automatic policy is :mod:`kandinsky5.runtime.vae_tiling`'s; the methods here delegate to it.

    ``vae.to(memory_format=torch.channels_last_3d)`` runs the convolutions on channels-last activations (the layout
    cuDNN's bf16 3D convolutions prefer); the numbers stay those of the default layout up to summation order. Off by
    default until a GPU run shows it faster: our pad, upsampling and attention keep the layout, but a backend operator
    that returns the default layout (CUDA's GroupNorm, in PyTorch versions without NHWC GroupNorm kernels) costs the
    next convolution a conversion copy; ``benchmarks/vae.py`` reports each operator's layout on the GPU it runs on.
    """

    config_class = HunyuanVideoVAEConfig

    def __init__(self, config: HunyuanVideoVAEConfig):
        super().__init__(config)
        unknown = [t for t in config.down_block_types if t != DOWN_BLOCK_TYPE]
        unknown += [t for t in config.up_block_types if t != UP_BLOCK_TYPE]
        if unknown:
            raise ValueError(f"unsupported block types {unknown}")
        if config.temporal_compression_ratio != SUPPORTED_TEMPORAL_RATIO:
            raise ValueError(
                f"temporal_compression_ratio: only {SUPPORTED_TEMPORAL_RATIO} is supported, "
                f"got {config.temporal_compression_ratio}"
            )
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv3d(2 * config.latent_channels, 2 * config.latent_channels, kernel_size=1)
        self.post_quant_conv = nn.Conv3d(config.latent_channels, config.latent_channels, kernel_size=1)

        self.spatial_compression_ratio = config.spatial_compression_ratio
        self.temporal_compression_ratio = config.temporal_compression_ratio
        # batch elements one at a time
        self.use_slicing = False
        # overlapping spatial tiles, for large frames
        self.use_tiling = False
        # spatial tiles only for decodes whose estimated peak exceeds the memory free_memory(device) reports (on by
        # default, set by enable_auto_tiling below: where memory suffices, the output is the reference's default
        # untiled decode)
        self.use_auto_tiling: bool
        self.free_memory: Callable[[torch.device], int | None]
        # overlapping temporal tiles once a video is longer than tile_sample_min_num_frames (on by default)
        self.use_framewise_encoding = True
        self.use_framewise_decoding = True
        self.tile_sample_min_height = TILE_SAMPLE_MIN_HEIGHT
        self.tile_sample_min_width = TILE_SAMPLE_MIN_WIDTH
        self.tile_sample_min_num_frames = TILE_SAMPLE_MIN_NUM_FRAMES
        self.tile_sample_stride_height = TILE_SAMPLE_STRIDE_HEIGHT
        self.tile_sample_stride_width = TILE_SAMPLE_STRIDE_WIDTH
        self.tile_sample_stride_num_frames = TILE_SAMPLE_STRIDE_NUM_FRAMES
        self.enable_auto_tiling()

    # ---- switches ----

    def enable_tiling(
        self,
        tile_sample_min_height: int | None = None,
        tile_sample_min_width: int | None = None,
        tile_sample_min_num_frames: int | None = None,
        tile_sample_stride_height: int | None = None,
        tile_sample_stride_width: int | None = None,
        tile_sample_stride_num_frames: int | None = None,
    ) -> None:
        """Turn spatial tiling on; sizes left out (or 0) keep their current value."""
        self.use_tiling = True
        self.tile_sample_min_height = tile_sample_min_height or self.tile_sample_min_height
        self.tile_sample_min_width = tile_sample_min_width or self.tile_sample_min_width
        self.tile_sample_min_num_frames = tile_sample_min_num_frames or self.tile_sample_min_num_frames
        self.tile_sample_stride_height = tile_sample_stride_height or self.tile_sample_stride_height
        self.tile_sample_stride_width = tile_sample_stride_width or self.tile_sample_stride_width
        self.tile_sample_stride_num_frames = tile_sample_stride_num_frames or self.tile_sample_stride_num_frames

    def disable_tiling(self) -> None:
        """Turn spatial tiling off, automatic tiling included."""
        self.use_tiling = False
        self.use_auto_tiling = False

    def enable_auto_tiling(self, free_memory: Callable[[torch.device], int | None] | None = None) -> None:
        """Decode in spatial tiles only when memory needs it: per ``decode`` call, when the estimated peak of an
        untiled decode exceeds the memory ``free_memory(device)`` reports (bytes, or None for "unknown: don't
        tile"; default: the device's free memory). See :func:`kandinsky5.runtime.vae_tiling.enable_auto_tiling`.
        """
        from kandinsky5.runtime.vae_tiling import enable_auto_tiling

        enable_auto_tiling(self, free_memory)

    def tiling_needed(self, z: torch.Tensor) -> bool:
        """Whether decoding latents ``z`` goes through spatial tiles: always after ``enable_tiling()``, never after
        ``disable_tiling()``, else as the automatic policy decides (see ``enable_auto_tiling``)."""
        if self.use_tiling:
            return True
        if not self.use_auto_tiling:
            return False
        from kandinsky5.runtime.vae_tiling import auto_tiling_needed

        return auto_tiling_needed(self, z)

    def untiled_decode_peak_bytes(self, z: torch.Tensor) -> int:
        """Estimated peak activation bytes of decoding latents ``z`` without spatial tiles (see
        :func:`kandinsky5.runtime.vae_tiling.untiled_decode_peak_bytes`)."""
        from kandinsky5.runtime.vae_tiling import untiled_decode_peak_bytes

        return untiled_decode_peak_bytes(self, z)

    def enable_slicing(self) -> None:
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    # ---- tile geometry: sample space (pixels, frames) and latent space ----

    @property
    def _tile_latent_min_size(self) -> tuple[int, int]:
        ratio = self.spatial_compression_ratio
        return self.tile_sample_min_height // ratio, self.tile_sample_min_width // ratio

    @property
    def _tile_latent_stride(self) -> tuple[int, int]:
        ratio = self.spatial_compression_ratio
        return self.tile_sample_stride_height // ratio, self.tile_sample_stride_width // ratio

    @property
    def _tile_latent_min_num_frames(self) -> int:
        return self.tile_sample_min_num_frames // self.temporal_compression_ratio

    @property
    def _tile_latent_stride_num_frames(self) -> int:
        return self.tile_sample_stride_num_frames // self.temporal_compression_ratio

    def _exceeds_sample_tile(self, height: int, width: int) -> bool:
        return height > self.tile_sample_min_height or width > self.tile_sample_min_width

    def _exceeds_latent_tile(self, height: int, width: int) -> bool:
        min_height, min_width = self._tile_latent_min_size
        return height > min_height or width > min_width

    # ---- encoding ----

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> EncoderOutput | tuple[DiagonalGaussianDistribution]:
        """Video ``(B, C, T, H, W)`` in [-1, 1] -> posterior over latents ``(B, latent, 1 + (T-1)//4, H/8, W/8)``."""
        if self.use_slicing and x.shape[0] > 1:
            moments = torch.cat([self._encode(part) for part in x.split(1)])
        else:
            moments = self._encode(x)
        posterior = DiagonalGaussianDistribution(moments)
        return EncoderOutput(latent_dist=posterior) if return_dict else (posterior,)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        num_frames, height, width = x.shape[2:]
        if self.use_framewise_encoding and num_frames > self.tile_sample_min_num_frames:
            return self._temporal_tiled_encode(x)
        if self.use_tiling and self._exceeds_sample_tile(height, width):
            return self._tiled_encode(x)
        return self._encode_tile(x)

    def _encode_tile(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=weight_memory_format(self.encoder.conv_in.conv))
        return self.quant_conv(self.encoder(x))

    def _tiled_encode(self, x: torch.Tensor) -> torch.Tensor:
        ratio = self.spatial_compression_ratio
        latent_min, latent_stride = self._tile_latent_min_size, self._tile_latent_stride
        return tile_spatially(
            x,
            self._encode_tile,
            tile_size=(self.tile_sample_min_height, self.tile_sample_min_width),
            stride=(self.tile_sample_stride_height, self.tile_sample_stride_width),
            blend=(latent_min[0] - latent_stride[0], latent_min[1] - latent_stride[1]),
            keep=latent_stride,
            out_size=(x.shape[-2] // ratio, x.shape[-1] // ratio),
        )

    def _temporal_tiled_encode(self, x: torch.Tensor) -> torch.Tensor:
        num_frames, height, width = x.shape[2:]
        latent_num_frames = (num_frames - 1) // self.temporal_compression_ratio + 1
        spatial_tiles = self.use_tiling and self._exceeds_sample_tile(height, width)
        tiles = []
        for start in range(0, num_frames, self.tile_sample_stride_num_frames):
            # one frame more than the tile size: a causal chunk of 1 + 4k frames
            chunk = x[:, :, start : start + self.tile_sample_min_num_frames + 1]
            tile = self._tiled_encode(chunk) if spatial_tiles else self._encode_tile(chunk)
            if start > 0:
                # a later chunk's first frame is coded as a lone image; the previous tile already covers it
                tile = tile[:, :, 1:]
            tiles.append(tile)
        blend_frames = self._tile_latent_min_num_frames - self._tile_latent_stride_num_frames
        joined = join_time_tiles(tiles, blend_frames, self._tile_latent_stride_num_frames)
        return joined[:, :, :latent_num_frames]

    # ---- decoding ----

    def decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple[torch.Tensor]:
        """Latents ``(B, latent, t, h, w)`` (already divided by ``scaling_factor``) -> video
        ``(B, C, 1 + 4(t-1), 8h, 8w)``, roughly in [-1, 1]."""
        tiled = self.tiling_needed(z)
        if tiled and not self.use_tiling:
            logger.info("VAE: decoding %s in spatial tiles, as memory is short", tuple(z.shape))
        if self.use_slicing and z.shape[0] > 1:
            decoded = torch.cat([self._decode(part, tiled) for part in z.split(1)])
        else:
            decoded = self._decode(z, tiled)
        return DecoderOutput(sample=decoded) if return_dict else (decoded,)

    def _decode(self, z: torch.Tensor, tiled: bool) -> torch.Tensor:
        return self.decode_plan(z, tiled).run(self._decode_tile)

    def decode_plan(self, z: torch.Tensor, tiled: bool) -> TiledDecode:
        """The tile decodes of decoding latents ``z`` (one batch slice) and how they join: the frame-wise path's
        temporal chunks when ``z`` has more latent frames than a temporal tile, each chunk (or the whole) in spatial
        tiles when ``tiled`` and it exceeds a spatial tile (``tiled``: :meth:`tiling_needed`)."""
        num_frames, height, width = z.shape[2:]
        if self.use_framewise_decoding and num_frames > self._tile_latent_min_num_frames:
            return self._temporal_tiled_decode_plan(z, tiled)
        if tiled and self._exceeds_latent_tile(height, width):
            return self._tiled_decode_plan(z)
        return TiledDecode.single(z)

    def _decode_tile(self, z: torch.Tensor) -> torch.Tensor:
        z = z.contiguous(memory_format=weight_memory_format(self.decoder.conv_in.conv))
        return self.decoder(self.post_quant_conv(z))

    def _tiled_decode_plan(self, z: torch.Tensor) -> TiledDecode:
        ratio = self.spatial_compression_ratio
        rows = spatial_tiles(z, self._tile_latent_min_size, self._tile_latent_stride)
        row_lengths = [len(row) for row in rows]
        blend = (
            self.tile_sample_min_height - self.tile_sample_stride_height,
            self.tile_sample_min_width - self.tile_sample_stride_width,
        )
        keep = (self.tile_sample_stride_height, self.tile_sample_stride_width)
        out_size = (z.shape[-2] * ratio, z.shape[-1] * ratio)

        def join(outputs: Iterator[torch.Tensor]) -> torch.Tensor:
            decoded = [[next(outputs) for _ in range(length)] for length in row_lengths]
            return stitch_tiles(decoded, blend, keep, out_size)

        return TiledDecode([tile for row in rows for tile in row], join)

    def _temporal_tiled_decode_plan(self, z: torch.Tensor, tiled: bool) -> TiledDecode:
        num_frames = z.shape[2]
        num_sample_frames = (num_frames - 1) * self.temporal_compression_ratio + 1
        chunks = []
        for start in range(0, num_frames, self._tile_latent_stride_num_frames):
            # one latent frame more than the tile size, the causal first frame
            chunk = z[:, :, start : start + self._tile_latent_min_num_frames + 1]
            spatial = tiled and self._exceeds_latent_tile(*chunk.shape[-2:])
            chunks.append(self._tiled_decode_plan(chunk) if spatial else TiledDecode.single(chunk))
        blend_frames = self.tile_sample_min_num_frames - self.tile_sample_stride_num_frames

        def join(outputs: Iterator[torch.Tensor]) -> torch.Tensor:
            tiles = []
            for index, chunk in enumerate(chunks):
                tile = chunk.join(outputs)
                if index > 0:
                    # the chunk's first latent frame decodes to a single frame the previous tile already covers
                    tile = tile[:, :, 1:]
                tiles.append(tile)
            joined = join_time_tiles(tiles, blend_frames, self.tile_sample_stride_num_frames)
            return joined[:, :, :num_sample_frames]

        return TiledDecode([piece for chunk in chunks for piece in chunk.inputs], join)

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
