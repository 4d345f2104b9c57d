"""Our HunyuanVideo VAE against diffusers' ``AutoencoderKLHunyuanVideo``: same parameter names, same numbers on
every encode and decode path (direct, frame-wise temporal tiles, spatial tiles, both, batch slicing).

The one arithmetic difference is the mid block's causal frame attention (per frame over the visible prefix, no
(tokens x tokens) mask): with the reference's masked attention swapped in, every path is bit-equal, in float32 and
bfloat16 (``test_decode_with_the_masked_attention_is_bit_equal_to_diffusers``)."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from diffusers import AutoencoderKLHunyuanVideo as RefVAE
from diffusers.models.autoencoders.autoencoder_kl_hunyuan_video import prepare_causal_attention_mask
from tolerances import (
    ATTENTION_KERNEL,
    BF16_ATTENTION,
    BF16_VAE_RELATIVE_L2,
    VAE,
    assert_close,
    max_abs_diff,
    relative_l2,
)

import kandinsky5.models.vae as vae_module
from kandinsky5.models.vae import (
    CONV_KERNEL,
    AutoencoderKLHunyuanVideo,
    HunyuanVideoVAEConfig,
    causal_frame_attention,
    causal_pad,
)

# Float32 outputs agree within tolerances.VAE: our causal attention sums in another order than the reference's masked
# one (test_causal_frame_attention_equals_masked_attention) and the decoder carries that through its convolutions; the
# exact-equality test below pins everything else. bfloat16 decodes agree within BF16_VAE_RELATIVE_L2: measured 2.5 %
# (3 latent frames) and 2.8 % (7, frame-wise), the size of bf16 rounding itself on this tiny random VAE; it comes from
# 1-ulp differences of the attention output alone, since with the masked attention swapped in they are bit-equal.
LATENT_CHANNELS = 16
# Tiny, but with all four blocks: 8x spatial and 4x temporal compression, a 16-channel latent.
TINY_VAE = dict(
    block_out_channels=(8, 16, 16, 16),
    layers_per_block=1,
    norm_num_groups=4,
    latent_channels=LATENT_CHANNELS,
)
# Small spatial tiles (pixels): 4x4 latent tiles with latent strides 3 (height) and 2 (width), so the sample
# tiles overlap by 8 and 16 pixels and the latent tiles by 1 and 2 latent pixels.
SMALL_TILES = dict(
    tile_sample_min_height=32,
    tile_sample_min_width=32,
    tile_sample_stride_height=24,
    tile_sample_stride_width=16,
)
NORM_SCALE_JITTER = 0.1


def masked_causal_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, num_frames: int
) -> torch.Tensor:
    """The reference's formulation (the oracle): one attention over all tokens under diffusers' additive
    (tokens x tokens) causal frame mask."""
    tokens_per_frame = query.shape[-2] // num_frames
    mask = prepare_causal_attention_mask(num_frames, tokens_per_frame, query.dtype, query.device)
    return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask)


def is_channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()


def build_pair(seed: int = 0, **overrides) -> tuple[RefVAE, AutoencoderKLHunyuanVideo]:
    """A randomly initialised diffusers VAE and ours holding the same weights (loaded strictly)."""
    torch.manual_seed(seed)
    ref = RefVAE(**dict(TINY_VAE, **overrides)).eval()
    # the default init leaves the norms at identity: randomise them too, so a swapped norm cannot hide
    with torch.no_grad():
        for module in ref.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.add_(NORM_SCALE_JITTER * torch.randn_like(module.weight))
                module.bias.normal_(std=NORM_SCALE_JITTER)
    ours = AutoencoderKLHunyuanVideo.from_config(dict(ref.config)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.fixture(scope="module")
def pair():
    return build_pair()


@pytest.fixture()
def tiled_pair():
    ref, ours = build_pair()
    ref.enable_tiling(**SMALL_TILES)
    ours.enable_tiling(**SMALL_TILES)
    return ref, ours


@pytest.mark.parametrize("attention", [True, False])
def test_state_dict_keys_and_shapes_equal_diffusers(attention):
    ref, ours = build_pair(mid_block_add_attention=attention)
    ref_shapes = [(k, tuple(v.shape)) for k, v in ref.state_dict().items()]
    our_shapes = [(k, tuple(v.shape)) for k, v in ours.state_dict().items()]
    assert our_shapes == ref_shapes
    assert list(ours.buffers()) == []


def test_config_defaults_equal_diffusers():
    signature = inspect.signature(RefVAE.__init__).parameters
    for field in dataclasses.fields(HunyuanVideoVAEConfig):
        default = signature[field.name].default
        ours = getattr(HunyuanVideoVAEConfig(), field.name)
        assert ours == (tuple(default) if isinstance(default, list) else default), field.name
    assert set(signature) - {"self"} == {f.name for f in dataclasses.fields(HunyuanVideoVAEConfig)}


def test_tiling_switches_and_defaults_equal_diffusers():
    ref, ours = build_pair()
    names = [
        "use_slicing",
        "use_tiling",
        "use_framewise_encoding",
        "use_framewise_decoding",
        "tile_sample_min_height",
        "tile_sample_min_width",
        "tile_sample_min_num_frames",
        "tile_sample_stride_height",
        "tile_sample_stride_width",
        "tile_sample_stride_num_frames",
        "spatial_compression_ratio",
        "temporal_compression_ratio",
    ]
    assert {n: getattr(ours, n) for n in names} == {n: getattr(ref, n) for n in names}
    ref.enable_tiling(**SMALL_TILES)
    ours.enable_tiling(**SMALL_TILES)
    assert {n: getattr(ours, n) for n in names} == {n: getattr(ref, n) for n in names}
    ours.disable_tiling()
    assert ours.use_tiling is False


@pytest.mark.parametrize(
    "num_frames, tokens_per_frame, channels",
    [(1, 12, 16), (2, 12, 16), (5, 12, 16), (3, 200, 32), (5, 24, 512)],
    ids=["1x12", "2x12", "5x12", "3x200", "5x24-wide"],  # 3x200: keys span several of the CPU kernel's blocks
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_frame_attention_equals_masked_attention(num_frames, tokens_per_frame, channels, dtype):
    """Per-frame attention over the visible prefix equals attention under diffusers' additive causal mask."""
    gen = torch.Generator().manual_seed(3)
    shape = (2, 1, num_frames * tokens_per_frame, channels)
    query, key, value = (torch.randn(shape, generator=gen).to(dtype) for _ in range(3))
    expected = masked_causal_attention(query, key, value, num_frames)
    got = causal_frame_attention(query, key, value, num_frames)
    # float32: summation order only; bfloat16: the same, then one rounding of the output
    assert_close(got, expected, ATTENTION_KERNEL if dtype == torch.float32 else BF16_ATTENTION)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "shape, tiles",
    [
        ((1, LATENT_CHANNELS, 3, 4, 6), None),
        ((1, LATENT_CHANNELS, 7, 4, 6), None),
        ((2, LATENT_CHANNELS, 2, 7, 9), SMALL_TILES),
        ((1, LATENT_CHANNELS, 7, 5, 6), SMALL_TILES),
    ],
    ids=["direct", "framewise", "spatial", "spatial+framewise"],
)
@torch.no_grad()
def test_decode_with_the_masked_attention_is_bit_equal_to_diffusers(monkeypatch, dtype, shape, tiles):
    """Everything but the attention's summation order is the reference's arithmetic: with its masked attention in
    place of ours, decodes (and encodes) are bit-equal, bfloat16 included."""
    ref, ours = build_pair()
    if tiles:
        ref.enable_tiling(**tiles)
        ours.enable_tiling(**tiles)
    ref.to(dtype)
    ours.to_dtype(dtype)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    video = torch.rand(1, 3, 9, 32, 32, generator=torch.Generator().manual_seed(1)).to(dtype) * 2 - 1
    monkeypatch.setattr(vae_module, "causal_frame_attention", masked_causal_attention)
    assert torch.equal(ours.decode(latents).sample, ref.decode(latents).sample)
    assert torch.equal(ours.encode(video).latent_dist.mean, ref.encode(video).latent_dist.mean)


@pytest.mark.parametrize(
    "shape",
    [
        (1, 3, 9, 32, 32),  # a short video
        (1, 3, 1, 32, 32),  # an image
        (2, 3, 5, 16, 24),  # a batch, non-square
        (1, 3, 25, 16, 16),  # more than 16 frames: the frame-wise (temporal tiled) path
    ],
    ids=["video", "image", "batch", "framewise"],
)
@torch.no_grad()
def test_encode_matches_diffusers(pair, shape):
    ref, ours = pair
    video = torch.rand(shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ref_dist, our_dist = ref.encode(video).latent_dist, ours.encode(video).latent_dist
    assert our_dist.mean.shape == (shape[0], LATENT_CHANNELS, (shape[2] - 1) // 4 + 1, shape[3] // 8, shape[4] // 8)
    assert_close(our_dist.mean, ref_dist.mean, VAE)
    assert_close(our_dist.std, ref_dist.std, VAE)
    assert_close(our_dist.mode(), ref_dist.mode(), VAE)
    ref_sample = ref_dist.sample(generator=torch.Generator().manual_seed(7))
    our_sample = our_dist.sample(generator=torch.Generator().manual_seed(7))
    assert_close(our_sample, ref_sample, VAE)
    (tuple_dist,) = ours.encode(video, return_dict=False)
    assert torch.equal(tuple_dist.mean, our_dist.mean)


@pytest.mark.parametrize(
    "shape",
    [
        (1, LATENT_CHANNELS, 3, 4, 6),  # direct path, non-square
        (1, LATENT_CHANNELS, 1, 4, 4),  # an image latent
        (1, LATENT_CHANNELS, 7, 4, 6),  # more than 4 latent frames: the frame-wise (temporal tiled) path
    ],
    ids=["video", "image", "framewise"],
)
@torch.no_grad()
def test_decode_matches_diffusers(pair, shape):
    ref, ours = pair
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    expected = ref.decode(latents).sample
    decoded = ours.decode(latents).sample
    assert decoded.shape == (1, 3, (shape[2] - 1) * 4 + 1, shape[3] * 8, shape[4] * 8)
    assert_close(decoded, expected, VAE)
    (as_tuple,) = ours.decode(latents, return_dict=False)
    assert torch.equal(as_tuple, decoded)


@torch.no_grad()
def test_framewise_decode_blends_tiles(pair):
    """The frame-wise path is really taken (and differs from one-shot decoding, as in the reference)."""
    ref, ours = pair
    latents = torch.randn(1, LATENT_CHANNELS, 7, 4, 6, generator=torch.Generator().manual_seed(3))
    framewise = ours.decode(latents).sample
    ours.use_framewise_decoding = ref.use_framewise_decoding = False
    try:
        one_shot, ref_one_shot = ours.decode(latents).sample, ref.decode(latents).sample
    finally:
        ours.use_framewise_decoding = ref.use_framewise_decoding = True
    assert_close(one_shot, ref_one_shot, VAE)
    assert max_abs_diff(framewise, one_shot) > 1e-2  # far beyond rounding


@pytest.mark.parametrize(
    "shape",
    [(1, LATENT_CHANNELS, 2, 7, 9), (1, LATENT_CHANNELS, 7, 5, 6)],
    ids=["spatial", "spatial+framewise"],
)
@torch.no_grad()
def test_tiled_decode_matches_diffusers(tiled_pair, shape):
    ref, ours = tiled_pair
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    tiled = ours.decode(latents).sample
    assert_close(tiled, ref.decode(latents).sample, VAE)
    ours.disable_tiling()
    assert max_abs_diff(tiled, ours.decode(latents).sample) > 1e-2  # the tiles were really blended


@pytest.mark.parametrize("shape", [(1, 3, 5, 48, 64), (1, 3, 21, 40, 40)], ids=["spatial", "spatial+framewise"])
@torch.no_grad()
def test_tiled_encode_matches_diffusers(tiled_pair, shape):
    ref, ours = tiled_pair
    video = torch.rand(shape, generator=torch.Generator().manual_seed(5)) * 2 - 1
    ref_dist, our_dist = ref.encode(video).latent_dist, ours.encode(video).latent_dist
    assert_close(our_dist.mean, ref_dist.mean, VAE)
    assert_close(our_dist.std, ref_dist.std, VAE)
    ours.disable_tiling()
    assert max_abs_diff(our_dist.mean, ours.encode(video).latent_dist.mean) > 1e-2


@torch.no_grad()
def test_sliced_batch_matches_diffusers():
    ref, ours = build_pair()
    ref.enable_slicing()
    ours.enable_slicing()
    latents = torch.randn(2, LATENT_CHANNELS, 2, 4, 4, generator=torch.Generator().manual_seed(6))
    assert_close(ours.decode(latents).sample, ref.decode(latents).sample, VAE)
    video = torch.rand(2, 3, 5, 16, 16, generator=torch.Generator().manual_seed(6))
    assert_close(ours.encode(video).latent_dist.mean, ref.encode(video).latent_dist.mean, VAE)


@torch.no_grad()
def test_no_attention_variant_matches_diffusers():
    ref, ours = build_pair(mid_block_add_attention=False)
    latents = torch.randn(1, LATENT_CHANNELS, 2, 4, 4, generator=torch.Generator().manual_seed(8))
    assert_close(ours.decode(latents).sample, ref.decode(latents).sample, VAE)


@torch.no_grad()
def test_meta_construction_and_assign_loading(pair):
    ref, ours = pair
    with torch.device("meta"):
        lazy = AutoencoderKLHunyuanVideo(HunyuanVideoVAEConfig(**TINY_VAE))
    assert all(p.is_meta for p in lazy.parameters())
    lazy.load_state_dict(ref.state_dict(), strict=True, assign=True)
    lazy.eval()
    assert not any(p.is_meta for p in lazy.parameters())
    assert lazy.device == torch.device("cpu") and lazy.dtype == torch.float32
    latents = torch.randn(1, LATENT_CHANNELS, 2, 4, 6, generator=torch.Generator().manual_seed(9))
    assert_close(lazy.decode(latents).sample, ref.decode(latents).sample, VAE)
    assert torch.equal(lazy.decode(latents).sample, ours.decode(latents).sample)


@torch.no_grad()
def test_forward_round_trip_matches_diffusers(pair):
    ref, ours = pair
    video = torch.rand(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(10)) * 2 - 1
    expected = ref(video, sample_posterior=True, generator=torch.Generator().manual_seed(11)).sample
    result = ours(video, sample_posterior=True, generator=torch.Generator().manual_seed(11)).sample
    assert_close(result, expected, VAE)


@pytest.mark.parametrize("path", ["direct", "framewise", "tiled"])
@torch.no_grad()
def test_channels_last_equals_default_layout(path):
    """``vae.to(memory_format=torch.channels_last_3d)`` changes only the layout: same decode and encode up to the
    convolution kernels' summation order."""
    _, ours = build_pair()
    if path == "tiled":
        ours.enable_tiling(**SMALL_TILES)
    frames = 7 if path == "framewise" else 3
    latents = torch.randn(1, LATENT_CHANNELS, frames, 6, 8, generator=torch.Generator().manual_seed(2))
    video = torch.rand(1, 3, 9, 48, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    decoded, encoded = ours.decode(latents).sample, ours.encode(video).latent_dist.mean
    ours.to(memory_format=torch.channels_last_3d)
    weight = ours.decoder.conv_in.conv.weight
    assert weight.is_contiguous(memory_format=torch.channels_last_3d) and not weight.is_contiguous()
    assert_close(ours.decode(latents).sample, decoded, VAE)
    assert_close(ours.encode(video).latent_dist.mean, encoded, VAE)


@torch.no_grad()
def test_channels_last_survives_pad_norm_upsample_and_attention():
    """Between two convolutions nothing turns a channels-last activation back into the default layout: the causal
    pad, the GroupNorms, the upsampler's interpolation and concatenation, the attention's token reshape. (On the CPU
    the 3D convolution itself returns the default layout, a choice of its kernel; benchmarks/vae.py reports each
    operator's layout on the GPU it runs on.)"""
    _, ours = build_pair()
    ours.to(memory_format=torch.channels_last_3d)
    x = torch.randn(1, LATENT_CHANNELS, 3, 4, 6).contiguous(memory_format=torch.channels_last_3d)
    assert is_channels_last(causal_pad(x, CONV_KERNEL))
    mid = ours.decoder.mid_block
    assert is_channels_last(mid.resnets[0].norm1(x))
    assert is_channels_last(mid.attentions[0](x))

    conv_inputs = []

    def record(module, args):
        conv_inputs.append(is_channels_last(args[0]))

    # the first resnet convolution (after norm, activation and pad) and each upsampler's (after interpolation,
    # concatenation and pad): time and space, and space alone
    modules = [mid.resnets[0].conv1.conv] + [block.upsamplers[0].conv.conv for block in ours.decoder.up_blocks[:2]]
    handles = [module.register_forward_pre_hook(record) for module in modules]
    try:
        mid.resnets[0](x)
        for block in ours.decoder.up_blocks[:2]:
            block.upsamplers[0](x)
    finally:
        for handle in handles:
            handle.remove()
    assert conv_inputs == [True, True, True]


@pytest.mark.parametrize("frames", [3, 7], ids=["direct", "framewise"])
@torch.no_grad()
def test_bfloat16_decode_as_accurate_as_the_reference(frames):
    """In bfloat16 our per-frame causal attention rounds differently from the reference's masked one (1 ulp), so
    the decodes differ; both must stay as close to the float32 decode as each other. (This tiny random VAE
    amplifies bf16 rounding to about 3 % relative L2 either way.)"""
    ref, ours = build_pair()
    latents = torch.randn(1, LATENT_CHANNELS, frames, 4, 6, generator=torch.Generator().manual_seed(2))
    truth = ref.decode(latents).sample
    ref.to(torch.bfloat16)
    ours.to_dtype(torch.bfloat16)
    ref_decoded, our_decoded = ref.decode(latents.bfloat16()).sample, ours.decode(latents.bfloat16()).sample
    assert our_decoded.dtype == torch.bfloat16
    assert relative_l2(our_decoded, truth) <= 1.1 * relative_l2(ref_decoded, truth)
    assert relative_l2(our_decoded, ref_decoded) <= BF16_VAE_RELATIVE_L2


@pytest.mark.parametrize("frames", [3, 7], ids=["direct", "framewise"])
@torch.no_grad()
def test_auto_tiling_tiles_only_when_memory_is_short(frames):
    _, ours = build_pair()
    assert ours.use_auto_tiling and not ours.use_tiling  # the default
    latents = torch.randn(1, LATENT_CHANNELS, frames, 6, 8, generator=torch.Generator().manual_seed(2))
    untiled = ours.decode(latents).sample
    ours.enable_tiling(**SMALL_TILES)
    tiled = ours.decode(latents).sample
    assert max_abs_diff(tiled, untiled) > 1e-3  # the two paths really differ (blended seams)

    asked = []

    def free_memory(bytes_free):
        def report(device):
            asked.append(device)
            return bytes_free

        return report

    ours.enable_auto_tiling(free_memory(2**40))
    assert not ours.use_tiling and torch.equal(ours.decode(latents).sample, untiled)
    ours.enable_auto_tiling(free_memory(1024))
    assert torch.equal(ours.decode(latents).sample, tiled)  # the tile sizes set before are kept
    assert asked == [latents.device, latents.device]
    ours.enable_auto_tiling()  # the CPU reports no free memory: never tiles
    assert torch.equal(ours.decode(latents).sample, untiled)
    ours.disable_tiling()
    assert not ours.use_auto_tiling


def test_untiled_decode_peak_counts_one_temporal_chunk_and_one_sliced_batch_element():
    _, ours = build_pair()
    chunk = ours._tile_latent_min_num_frames + 1  # the frame-wise path decodes this many latent frames at a time
    one_chunk = ours.untiled_decode_peak_bytes(torch.empty(1, LATENT_CHANNELS, chunk, 64, 96, device="meta"))
    video = torch.empty(2, LATENT_CHANNELS, 31, 64, 96, device="meta")  # two 121-frame 512x768 latents
    assert ours.untiled_decode_peak_bytes(video) == 2 * one_chunk
    ours.enable_slicing()
    assert ours.untiled_decode_peak_bytes(video) == one_chunk
    ours.use_framewise_decoding = False  # then the whole video is one piece
    assert ours.untiled_decode_peak_bytes(video) > 7 * one_chunk


def test_decode_peak_estimate_reproduces_the_reference_figure():
    from kandinsky5.runtime.vae_tiling import REFERENCE_DECODE_PEAK_BYTES, estimate_decode_peak_bytes

    assert estimate_decode_peak_bytes(17, 512, 768, 128, 2) == REFERENCE_DECODE_PEAK_BYTES
    # float32 doubles it; 1024x1024 needs 8/3 of it
    assert estimate_decode_peak_bytes(17, 512, 768, 128, 4) == 2 * REFERENCE_DECODE_PEAK_BYTES
    assert estimate_decode_peak_bytes(17, 1024, 1024, 128, 2) == int(REFERENCE_DECODE_PEAK_BYTES * 8 / 3)


def test_auto_tiling_names_a_bad_free_memory_source():
    _, ours = build_pair()
    with pytest.raises(TypeError, match="free_memory"):
        ours.enable_auto_tiling(2**30)
