"""Transforms applied to the networks from outside (kandinsky5.runtime): QKV fusion, the VAE's automatic tiling;
and the import direction (runtime imports models, never the reverse at import time)."""

import math
import subprocess
import sys

import torch
from conftest import TINY_TRANSFORMER, TINY_VAE, randomize_

from kandinsky5.models.dit import FUSED_PROJECTION, QKV_PROJECTIONS, Attention, Kandinsky5Transformer3DModel
from kandinsky5.models.vae import AutoencoderKLHunyuanVideo
from kandinsky5.runtime import fusion, vae_tiling

LATENT_CHANNELS = TINY_VAE["latent_channels"]


def tiny_model():
    model = Kandinsky5Transformer3DModel.from_config(TINY_TRANSFORMER).eval()
    randomize_(model, seed=6)
    return model


def hook_counts(model) -> list[tuple[int, int]]:
    return [
        (len(m._state_dict_hooks), len(m._load_state_dict_pre_hooks))
        for m in model.modules()
        if isinstance(m, Attention)
    ]


def test_models_do_not_import_runtime():
    code = (
        "import sys, kandinsky5.models.dit, kandinsky5.models.vae, kandinsky5.models.nabla_params;"
        "print(sorted(m for m in sys.modules if m.startswith('kandinsky5.runtime')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_fusion_hooks_live_as_long_as_the_fused_layer():
    model = tiny_model()
    plain = model.state_dict()
    bare = hook_counts(model)
    for _ in range(2):  # fusing twice in a row refuses nothing and adds no hooks
        fusion.fuse_qkv_projections(model)
    fused_counts = hook_counts(model)
    assert all(fused == (state + 1, load + 1) for fused, (state, load) in zip(fused_counts, bare, strict=True))
    assert all(
        isinstance(getattr(m, FUSED_PROJECTION), fusion.FusedProjection)
        for m in model.modules()
        if isinstance(m, Attention)
    )
    state = model.state_dict()
    assert set(state) == set(plain) and all(torch.equal(state[k], plain[k]) for k in plain)
    fusion.unfuse_qkv_projections(model)
    assert hook_counts(model) == bare
    assert all(getattr(m, FUSED_PROJECTION) is None for m in model.modules() if isinstance(m, Attention))
    state = model.state_dict()
    assert set(state) == set(plain) and all(torch.equal(state[k], plain[k]) for k in plain)


def test_fused_layer_loads_the_reference_tensors():
    model, source = tiny_model(), tiny_model()
    randomize_(source, seed=7)
    attention = model.text_transformer_blocks[0].self_attention
    fusion.fuse_projections(attention, QKV_PROJECTIONS)
    model.load_state_dict(source.state_dict())
    expected = torch.cat([getattr(source.text_transformer_blocks[0].self_attention, n).weight for n in QKV_PROJECTIONS])
    assert torch.equal(attention.fused_projection.weight, expected)


def test_auto_tiling_policy_functions():
    vae = AutoencoderKLHunyuanVideo.from_config(TINY_VAE)
    latents = torch.empty(1, LATENT_CHANNELS, 3, 6, 8, device="meta")
    estimate = vae_tiling.untiled_decode_peak_bytes(vae, latents)
    assert estimate == vae.untiled_decode_peak_bytes(latents) > 0
    assert vae.free_memory is vae_tiling.device_free_bytes  # the default source
    vae_tiling.enable_auto_tiling(vae, lambda device: math.ceil(estimate * vae_tiling.AUTO_TILING_HEADROOM))
    assert not vae_tiling.auto_tiling_needed(vae, latents) and not vae.tiling_needed(latents)
    vae.enable_auto_tiling(lambda device: estimate)  # less than the estimate with its headroom
    assert vae_tiling.auto_tiling_needed(vae, latents) and vae.tiling_needed(latents)
    vae.disable_tiling()
    assert not vae.tiling_needed(latents)
    vae.enable_tiling()
    assert vae.tiling_needed(latents)
