"""NABLA's parameters as a dataclass (``NablaParams``) against the reference's 10-key dict, and the builder for a
latent shape (``nabla_params_for_latents``) against diffusers' ``get_sparse_params``."""

from types import SimpleNamespace

import pytest
import torch
from conftest import NABLA_ATTENTION, TINY_TRANSFORMER, randomize_
from diffusers import Kandinsky5T2VPipeline as RefPipeline

from kandinsky5.attention.nabla import NablaParams, as_nabla_params
from kandinsky5.models.dit import Kandinsky5Transformer3DModel, TransformerConfig
from kandinsky5.models.nabla_params import nabla_params_for_latents

SPATIAL_COMPRESSION = 8
# a sparse setting for the tiny grids (the checkpoint windows would cover them entirely)
SPARSE_NABLA = dict(NABLA_ATTENTION, attention_wT=1, attention_P=0.3)
LATENTS = (2, 3, 32, 48, 33)  # (batch, T, H, W, C): 3 frames of 2 x 3 tiles after the 2x2 patch


def nabla_config(**overrides) -> TransformerConfig:
    return TransformerConfig.from_dict(dict(TINY_TRANSFORMER, **SPARSE_NABLA, **overrides))


def reference_sparse_params(config: TransformerConfig, latents: torch.Tensor) -> dict:
    """diffusers' ``get_sparse_params``, on a stand-in pipeline holding only what it reads."""
    pipe = SimpleNamespace(transformer=SimpleNamespace(config=config), fast_sta_nabla=RefPipeline.fast_sta_nabla)
    return RefPipeline.get_sparse_params(pipe, latents, "cpu")


def assert_same_dict(got: dict, expected: dict):
    assert list(got) == list(expected)
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(got[key], value) and got[key].dtype == value.dtype, key
        else:
            assert got[key] == value, key


def test_builder_equals_the_reference_dict():
    config = nabla_config()
    params = nabla_params_for_latents(config, LATENTS, "cpu", SPATIAL_COMPRESSION)
    assert isinstance(params, NablaParams)
    assert params.visual_shape == (3, 16, 24) and params.threshold == 0.3 and params.fractal
    expected = reference_sparse_params(config, torch.empty(LATENTS))
    assert_same_dict(params.to_reference(), expected)
    assert_same_dict(NablaParams.from_reference(expected).to_reference(), expected)


def test_builder_returns_none_for_dense_attention():
    config = TransformerConfig.from_dict(TINY_TRANSFORMER)
    assert nabla_params_for_latents(config, LATENTS, "cpu", SPATIAL_COMPRESSION) is None


def test_builder_refuses_grids_nabla_cannot_tile():
    with pytest.raises(ValueError, match="temporal patch size of 1"):
        nabla_params_for_latents(nabla_config(patch_size=(2, 2, 2)), LATENTS, "cpu", SPATIAL_COMPRESSION)
    with pytest.raises(ValueError, match="multiples of 128 pixels"):
        nabla_params_for_latents(nabla_config(), (1, 3, 32, 40, 33), "cpu", SPATIAL_COMPRESSION)


def test_reference_dict_needs_the_window_and_threshold():
    params = as_nabla_params({"sta_mask": torch.ones(1, 1, 2, 2, dtype=torch.bool), "P": 0.9})
    assert params.threshold == 0.9 and not params.fractal and params.visual_shape is None and params.window is None
    assert as_nabla_params(params) is params and as_nabla_params(None) is None
    with pytest.raises(ValueError, match="'P'"):
        NablaParams.from_reference({"sta_mask": torch.ones(1, 1, 2, 2, dtype=torch.bool)})


def test_forward_takes_the_dataclass_or_the_reference_dict():
    model = Kandinsky5Transformer3DModel.from_config(dict(TINY_TRANSFORMER, **SPARSE_NABLA)).eval()
    randomize_(model, seed=4)
    params = nabla_params_for_latents(model.config, LATENTS, "cpu", SPATIAL_COMPRESSION)
    gen = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(LATENTS, generator=gen),
        encoder_hidden_states=torch.randn(2, 5, model.config.in_text_dim, generator=gen),
        timestep=torch.tensor([900.0, 500.0]),
        pooled_projections=torch.randn(2, model.config.in_text_dim2, generator=gen),
        scale_factor=(1, 2, 2),
    )
    with torch.no_grad():
        from_dataclass = model(**inputs, sparse_params=params).sample
        from_dict = model(**inputs, sparse_params=params.to_reference()).sample
        dense = model(**inputs).sample
    assert torch.equal(from_dataclass, from_dict)
    assert (from_dataclass - dense).abs().max().item() > 1e-2  # the window really is sparse
