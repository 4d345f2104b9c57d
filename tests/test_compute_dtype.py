"""The networks' explicit compute dtype (``model.dtype``): set by construction, loading and casts, never read off a
weight, so weights stored in other dtypes (FP8) leave it alone; float32 islands stay float32."""

import pytest
import torch
from conftest import TINY_TRANSFORMER, TINY_VAE, randomize_

from kandinsky5.loading.diffusers_format import load_component
from kandinsky5.models.dit import Kandinsky5Transformer3DModel
from kandinsky5.models.vae import AutoencoderKLHunyuanVideo

FP8 = torch.float8_e4m3fn


def tiny_model():
    model = Kandinsky5Transformer3DModel.from_config(TINY_TRANSFORMER).eval()
    randomize_(model, seed=2)
    return model


def store_linear_weights_in_fp8(model) -> list[str]:
    """What a weight-only quantization transform does to storage: the linear weights outside the float32 islands
    in FP8."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not model.keeps_fp32(name):
            module.weight.data = module.weight.data.to(FP8)
            names.append(f"{name}.weight")
    return names


def check_storage(model, dtype, fp8_names=()):
    for name, param in model.named_parameters():
        expected = FP8 if name in fp8_names else torch.float32 if model.keeps_fp32(name) else dtype
        assert param.dtype == expected, name


def test_fp8_weights_keep_the_compute_dtype():
    model = tiny_model().to_dtype(torch.bfloat16)
    fp8 = store_linear_weights_in_fp8(model)
    assert fp8 and model.dtype == model.compute_dtype == torch.bfloat16
    model.to(torch.float16)
    assert model.dtype == torch.float16
    check_storage(model, torch.float16, fp8)  # FP8 storage is the transform's: a cast keeps it


def test_to_dtype_sets_the_compute_dtype_and_keeps_the_islands():
    model = tiny_model()
    assert model.dtype == torch.float32
    assert model.to(torch.bfloat16) is model
    assert model.dtype == torch.bfloat16
    check_storage(model, torch.bfloat16)
    model.to("cpu")
    model.to(device="cpu")
    assert model.dtype == torch.bfloat16  # a move alone keeps it
    model.to("cpu", torch.float16)
    assert model.dtype == torch.float16
    check_storage(model, torch.float16)
    for cast, dtype in [("float", torch.float32), ("bfloat16", torch.bfloat16), ("half", torch.float16)]:
        getattr(model, cast)()
        assert model.dtype == dtype, cast
        check_storage(model, dtype)
    model.to(torch.empty(0, dtype=torch.bfloat16))
    assert model.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="compute dtype"):
        model.to(FP8)


def test_to_equals_to_dtype_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    cast, converted = tiny_model().to(torch.bfloat16), tiny_model().to_dtype(torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(cast.parameters(), converted.parameters(), strict=True))
    x = torch.randn(1, 2, 4, 4, cast.config.visual_input_dim, generator=gen).bfloat16()
    text = torch.randn(1, 5, cast.config.in_text_dim, generator=gen).bfloat16()
    pooled = torch.randn(1, cast.config.in_text_dim2, generator=gen).bfloat16()
    t = torch.tensor([500.0]).bfloat16()
    with torch.no_grad():
        assert torch.equal(cast(x, text, t, pooled).sample, converted(x, text, t, pooled).sample)


def test_loading_sets_the_compute_dtype(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "float32")
    assert load_component(Kandinsky5Transformer3DModel, tmp_path / "float32").dtype == torch.float32
    loaded = load_component(Kandinsky5Transformer3DModel, tmp_path / "float32", torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    check_storage(loaded, torch.bfloat16)
    # a checkpoint stored in bfloat16 (float32 islands included) computes in bfloat16
    model.to_dtype(torch.bfloat16).save_pretrained(tmp_path / "bfloat16")
    assert load_component(Kandinsky5Transformer3DModel, tmp_path / "bfloat16").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="compute dtype"):
        load_component(Kandinsky5Transformer3DModel, tmp_path / "float32", FP8)


def test_assigned_tensors_set_the_compute_dtype():
    state = tiny_model().to_dtype(torch.bfloat16).state_dict()
    with torch.device("meta"):
        model = Kandinsky5Transformer3DModel.from_config(TINY_TRANSFORMER)
    assert model.dtype == torch.float32
    model.load_state_dict(state, assign=True)
    assert model.dtype == torch.bfloat16
    copied = tiny_model()
    copied.load_state_dict(state)  # copied into float32 parameters: still float32
    assert copied.dtype == torch.float32


def test_vae_compute_dtype_follows_casts_not_layouts():
    vae = AutoencoderKLHunyuanVideo.from_config(TINY_VAE)
    assert vae.dtype == torch.float32
    vae.to(torch.bfloat16)
    assert vae.dtype == torch.bfloat16 and vae.decoder.conv_out.conv.weight.dtype == torch.bfloat16
    vae.to(memory_format=torch.channels_last_3d)
    assert vae.dtype == torch.bfloat16
    assert vae.decoder.conv_out.conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    vae.to(torch.float32, memory_format=torch.contiguous_format)
    assert vae.dtype == torch.float32 and vae.decoder.conv_out.conv.weight.is_contiguous()
