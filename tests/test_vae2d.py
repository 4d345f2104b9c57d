"""Our 2D image VAE (``AutoencoderKL2D``) against diffusers' ``AutoencoderKL``: a tiny random checkpoint written by
diffusers' ``save_pretrained`` and loaded by our ``load_component`` (meta construction, tensors assigned as stored),
in FLUX's layout (no quant convolutions) and the older one (with them).

Both sides run the same operations on the same shapes (3x3 convolutions, GroupNorms, one SDPA call per mid block,
the same slice-by-slice tile blending); a kernel may still sum in another order, so outputs are compared within
``tolerances.VAE`` (derived for "the same convolutions and attention, another summation order": per convolution
layer ~log2(9 x channels) <= 8 EPS of its output, whose GroupNorms keep every stage at magnitude ~1, over fewer than
16 layers). Measured: bit-equal (max |difference| 0) on this machine."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_
from diffusers import AutoencoderKL as RefVAE
from tolerances import VAE, assert_close, max_abs_diff

from kandinsky5.loading.diffusers_format import load_component
from kandinsky5.models.vae2d import AutoencoderKL2D

LATENT_CHANNELS = 16
# FLUX's VAE layout, narrow: two blocks (2x compression), two resnets per encoder block, mid-block attention.
TINY_VAE2D = dict(
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=2,
    norm_num_groups=8,
    latent_channels=LATENT_CHANNELS,
    sample_size=32,
    scaling_factor=0.3611,
    shift_factor=0.1159,
)
# Small tiles: 16 pixels (8 latent pixels), a quarter overlapping.
TILE_PIXELS = 16


def build_pair(tmp_path, quant: bool, seed: int = 0, **overrides) -> tuple[RefVAE, AutoencoderKL2D]:
    ref = RefVAE(**TINY_VAE2D, use_quant_conv=quant, use_post_quant_conv=quant, **overrides).eval()
    randomize_(ref, seed, std=0.1)
    folder = tmp_path / f"vae-{quant}-{seed}"
    ref.save_pretrained(folder)
    return ref, load_component(AutoencoderKL2D, folder)


@pytest.fixture(scope="module", params=[False, True], ids=["flux", "quant_conv"])
def pair(request, tmp_path_factory):
    return build_pair(tmp_path_factory.mktemp("vae2d"), request.param)


def set_small_tiles(ref: RefVAE, ours: AutoencoderKL2D) -> None:
    ref.enable_tiling()
    ref.tile_sample_min_size = TILE_PIXELS
    ref.tile_latent_min_size = TILE_PIXELS // 2
    ours.enable_tiling(TILE_PIXELS)


def test_state_dict_keys_and_config_equal_diffusers(pair):
    ref, ours = pair
    assert list(ours.state_dict()) == list(ref.state_dict())
    for name, tensor in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[name], tensor), name
    assert ours.dtype == torch.float32 and not any(p.is_meta for p in ours.parameters())
    assert (ours.quant_conv is None) == (not ref.config.use_quant_conv)
    assert ours.config.scaling_factor == ref.config.scaling_factor
    assert ours.config.shift_factor == ref.config.shift_factor
    assert ours.tile_sample_min_size == ref.tile_sample_min_size
    assert ours.tile_latent_min_size == ref.tile_latent_min_size


@torch.no_grad()
def test_encode_matches_diffusers(pair):
    ref, ours = pair
    image = torch.rand(2, 3, 24, 20, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ref_dist, our_dist = ref.encode(image).latent_dist, ours.encode(image).latent_dist
    assert our_dist.mean.shape == (2, LATENT_CHANNELS, 12, 10)
    assert_close(our_dist.mean, ref_dist.mean, VAE)
    assert_close(our_dist.logvar, ref_dist.logvar, VAE)
    assert_close(our_dist.mode(), ref_dist.mode(), VAE)
    ref_sample = ref_dist.sample(generator=torch.Generator().manual_seed(7))
    our_sample = our_dist.sample(generator=torch.Generator().manual_seed(7))
    assert_close(our_sample, ref_sample, VAE)
    (as_tuple,) = ours.encode(image, return_dict=False)
    assert torch.equal(as_tuple.mean, our_dist.mean)


@torch.no_grad()
def test_decode_matches_diffusers(pair):
    ref, ours = pair
    latents = torch.randn(2, LATENT_CHANNELS, 6, 9, generator=torch.Generator().manual_seed(2))
    expected = ref.decode(latents).sample
    decoded = ours.decode(latents).sample
    assert decoded.shape == (2, 3, 12, 18)
    assert_close(decoded, expected, VAE)
    (as_tuple,) = ours.decode(latents, return_dict=False)
    assert torch.equal(as_tuple, decoded)


@torch.no_grad()
def test_tiled_decode_matches_diffusers(pair):
    ref, ours = pair
    latents = torch.randn(1, LATENT_CHANNELS, 13, 18, generator=torch.Generator().manual_seed(3))
    untiled = ours.decode(latents).sample
    set_small_tiles(ref, ours)
    try:
        expected, tiled = ref.decode(latents).sample, ours.decode(latents).sample
    finally:
        ref.disable_tiling()
        ours.disable_tiling()
    assert tiled.shape == expected.shape
    assert_close(tiled, expected, VAE)
    assert tiled.shape == untiled.shape and max_abs_diff(tiled, untiled) > 1e-2  # the tiles were really blended


@torch.no_grad()
def test_tiled_encode_matches_diffusers(pair):
    ref, ours = pair
    image = torch.rand(1, 3, 28, 40, generator=torch.Generator().manual_seed(4)) * 2 - 1
    untiled = ours.encode(image).latent_dist.mean
    set_small_tiles(ref, ours)
    try:
        ref_dist, our_dist = ref.encode(image).latent_dist, ours.encode(image).latent_dist
    finally:
        ref.disable_tiling()
        ours.disable_tiling()
    assert_close(our_dist.mean, ref_dist.mean, VAE)
    assert_close(our_dist.logvar, ref_dist.logvar, VAE)
    assert our_dist.mean.shape == untiled.shape and max_abs_diff(our_dist.mean, untiled) > 1e-2


@torch.no_grad()
def test_sliced_batch_and_round_trip_match_diffusers(pair):
    ref, ours = pair
    image = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    ref.enable_slicing()
    ours.enable_slicing()
    try:
        assert_close(ours.encode(image).latent_dist.mean, ref.encode(image).latent_dist.mean, VAE)
        expected = ref(image, sample_posterior=True, generator=torch.Generator().manual_seed(6)).sample
        result = ours(image, sample_posterior=True, generator=torch.Generator().manual_seed(6)).sample
    finally:
        ref.disable_slicing()
        ours.disable_slicing()
    assert_close(result, expected, VAE)


@torch.no_grad()
def test_no_attention_variant_matches_diffusers(tmp_path):
    ref, ours = build_pair(tmp_path, quant=False, seed=1, mid_block_add_attention=False)
    assert list(ours.state_dict()) == list(ref.state_dict())
    latents = torch.randn(1, LATENT_CHANNELS, 4, 6, generator=torch.Generator().manual_seed(8))
    assert_close(ours.decode(latents).sample, ref.decode(latents).sample, VAE)


def test_rejects_unknown_block_types():
    from kandinsky5.models.vae2d import AutoencoderKL2DConfig

    config = AutoencoderKL2DConfig(down_block_types=("AttnDownEncoderBlock2D",))
    with pytest.raises(ValueError, match="unsupported block types"):
        AutoencoderKL2D(config)
