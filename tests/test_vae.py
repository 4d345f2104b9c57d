"""Our HunyuanVideo VAE against diffusers' ``AutoencoderKLHunyuanVideo``: same parameter names, same numbers on
every encode and decode path (direct, frame-wise temporal tiles, spatial tiles, both, batch slicing)."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from diffusers import AutoencoderKLHunyuanVideo as RefVAE
from diffusers.models.autoencoders.autoencoder_kl_hunyuan_video import prepare_causal_attention_mask

from kandinsky5.models.vae import AutoencoderKLHunyuanVideo, HunyuanVideoVAEConfig, causal_frame_attention

# Outputs are compared at this max |difference| (float32, CPU).
TOLERANCE = 1e-4
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


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


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


@pytest.mark.parametrize("num_frames", [1, 2, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_frame_attention_equals_masked_attention(num_frames, dtype):
    """Per-frame attention over the visible prefix equals attention under diffusers' additive causal mask."""
    gen = torch.Generator().manual_seed(3)
    query, key, value = (torch.randn(2, 1, num_frames * 12, 16, generator=gen).to(dtype) for _ in range(3))
    mask = prepare_causal_attention_mask(num_frames, 12, dtype, torch.device("cpu"))
    expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask)
    got = causal_frame_attention(query, key, value, num_frames)
    # float32: summation order only; bfloat16: the same, then one rounding of the output
    limit = 1e-6 if dtype == torch.float32 else 1e-2
    assert max_diff(got.float(), expected.float()) <= limit


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
    assert max_diff(our_dist.mean, ref_dist.mean) <= TOLERANCE
    assert max_diff(our_dist.std, ref_dist.std) <= TOLERANCE
    assert max_diff(our_dist.mode(), ref_dist.mode()) <= TOLERANCE
    ref_sample = ref_dist.sample(generator=torch.Generator().manual_seed(7))
    our_sample = our_dist.sample(generator=torch.Generator().manual_seed(7))
    assert max_diff(our_sample, ref_sample) <= TOLERANCE
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
    assert max_diff(decoded, expected) <= TOLERANCE
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
    assert max_diff(one_shot, ref_one_shot) <= TOLERANCE
    assert max_diff(framewise, one_shot) > TOLERANCE


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
    assert max_diff(tiled, ref.decode(latents).sample) <= TOLERANCE
    ours.disable_tiling()
    assert max_diff(tiled, ours.decode(latents).sample) > TOLERANCE  # the tiles were really blended


@pytest.mark.parametrize("shape", [(1, 3, 5, 48, 64), (1, 3, 21, 40, 40)], ids=["spatial", "spatial+framewise"])
@torch.no_grad()
def test_tiled_encode_matches_diffusers(tiled_pair, shape):
    ref, ours = tiled_pair
    video = torch.rand(shape, generator=torch.Generator().manual_seed(5)) * 2 - 1
    ref_dist, our_dist = ref.encode(video).latent_dist, ours.encode(video).latent_dist
    assert max_diff(our_dist.mean, ref_dist.mean) <= TOLERANCE
    assert max_diff(our_dist.std, ref_dist.std) <= TOLERANCE
    ours.disable_tiling()
    assert max_diff(our_dist.mean, ours.encode(video).latent_dist.mean) > TOLERANCE


@torch.no_grad()
def test_sliced_batch_matches_diffusers():
    ref, ours = build_pair()
    ref.enable_slicing()
    ours.enable_slicing()
    latents = torch.randn(2, LATENT_CHANNELS, 2, 4, 4, generator=torch.Generator().manual_seed(6))
    assert max_diff(ours.decode(latents).sample, ref.decode(latents).sample) <= TOLERANCE
    video = torch.rand(2, 3, 5, 16, 16, generator=torch.Generator().manual_seed(6))
    assert max_diff(ours.encode(video).latent_dist.mean, ref.encode(video).latent_dist.mean) <= TOLERANCE


@torch.no_grad()
def test_no_attention_variant_matches_diffusers():
    ref, ours = build_pair(mid_block_add_attention=False)
    latents = torch.randn(1, LATENT_CHANNELS, 2, 4, 4, generator=torch.Generator().manual_seed(8))
    assert max_diff(ours.decode(latents).sample, ref.decode(latents).sample) <= TOLERANCE


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
    assert max_diff(lazy.decode(latents).sample, ref.decode(latents).sample) <= TOLERANCE
    assert torch.equal(lazy.decode(latents).sample, ours.decode(latents).sample)


@torch.no_grad()
def test_forward_round_trip_matches_diffusers(pair):
    ref, ours = pair
    video = torch.rand(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(10)) * 2 - 1
    expected = ref(video, sample_posterior=True, generator=torch.Generator().manual_seed(11)).sample
    result = ours(video, sample_posterior=True, generator=torch.Generator().manual_seed(11)).sample
    assert max_diff(result, expected) <= TOLERANCE


@pytest.mark.parametrize("path", ["direct", "framewise", "tiled"])
@torch.no_grad()
def test_channels_last_equals_default_layout(path):
    """``vae.to(memory_format=torch.channels_last_3d)`` changes only the layout: same decode and encode."""
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
    assert max_diff(ours.decode(latents).sample, decoded) <= TOLERANCE
    assert max_diff(ours.encode(video).latent_dist.mean, encoded) <= TOLERANCE


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
    ref_error = relative_l2(ref.decode(latents.bfloat16()).sample, truth)
    our_error = relative_l2(ours.decode(latents.bfloat16()).sample, truth)
    assert our_error <= 1.1 * ref_error


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("frames", [3, 7], ids=["direct", "framewise"])
@torch.no_grad()
def test_auto_tiling_tiles_only_when_memory_is_short(frames):
    _, ours = build_pair()
    assert ours.use_auto_tiling and not ours.use_tiling  # the default
    latents = torch.randn(1, LATENT_CHANNELS, frames, 6, 8, generator=torch.Generator().manual_seed(2))
    untiled = ours.decode(latents).sample
    ours.enable_tiling(**SMALL_TILES)
    tiled = ours.decode(latents).sample
    assert max_diff(tiled, untiled) > 1e-3  # the two paths really differ (blended seams)

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


def test_decode_peak_estimate_reproduces_the_reference_figure():
    from kandinsky5.models.vae import REFERENCE_DECODE_PEAK_BYTES, estimate_decode_peak_bytes

    assert estimate_decode_peak_bytes(17, 512, 768, 128, 2) == REFERENCE_DECODE_PEAK_BYTES
    # float32 doubles it; 1024x1024 needs 8/3 of it
    assert estimate_decode_peak_bytes(17, 512, 768, 128, 4) == 2 * REFERENCE_DECODE_PEAK_BYTES
    assert estimate_decode_peak_bytes(17, 1024, 1024, 128, 2) == int(REFERENCE_DECODE_PEAK_BYTES * 8 / 3)
