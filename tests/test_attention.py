"""The attention choke point: backend registry, names, precedence, errors and fallbacks (CPU)."""

import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_TRANSFORMER
from tolerances import ATTENTION_KERNEL, assert_close

import kandinsky5.attention.backends as backends
from kandinsky5.attention import (
    ENV_VAR,
    attention,
    attention_backend,
    available_backends,
    get_attention_backend,
    set_attention_backend,
)
from kandinsky5.models.dit import Kandinsky5Transformer3DModel

CUDA_ONLY = ["_native_flash", "flash", "_native_cudnn", "cudnn", "_native_efficient", "efficient"]
REFERENCE_NAMES = ["native", "flex", "_native_cudnn", "_native_flash", "_native_efficient", "_native_math"]


@pytest.fixture(autouse=True)
def clean_backend_state(monkeypatch):
    """No process default, context or earlier warning leaks between tests; no environment choice."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr(backends, "_process_default", None)
    monkeypatch.setattr(backends, "_context_backend", None)
    monkeypatch.setattr(backends, "_warned", set())


def qkv(batch=2, q_len=70, kv_len=70, heads=3, head_dim=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_len, heads, head_dim, generator=gen)
    k = torch.randn(batch, kv_len, heads, head_dim, generator=gen)
    v = torch.randn(batch, kv_len, heads, head_dim, generator=gen)
    return q, k, v


def math_attention(q, k, v, mask=None):
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def test_names_and_aliases():
    usable = available_backends("cpu")
    for name in ["auto", "native", "sdpa", "flex", "_native_math", "math"]:
        assert name in usable
    for name in CUDA_ONLY:
        assert name not in usable
    for alias, name in [("sdpa", "native"), ("math", "_native_math"), ("flash", "_native_flash")]:
        assert backends.canonical_backend_name(alias) == name
    assert backends.canonical_backend_name(" CUDNN ") == "_native_cudnn"
    for name in REFERENCE_NAMES:
        assert backends.canonical_backend_name(name) == name


@pytest.mark.parametrize("name", [n for n in available_backends("cpu") if n not in ("_native_math", "math")])
def test_cpu_backends_equal_math(name):
    q, k, v = qkv(q_len=70, kv_len=9)  # unequal lengths, as in cross-attention; one shape, one flex compile
    with attention_backend(name):
        got = attention(q, k, v)
    assert_close(got, math_attention(q, k, v), ATTENTION_KERNEL)  # the kernels sum in different orders


@pytest.mark.parametrize("name", ["auto", "native", "math"])
def test_masked_cpu_backends_equal_math(name):
    q, k, v = qkv(kv_len=9)
    mask = torch.tensor([[True] * 9, [True] * 5 + [False] * 4])[:, None, None, :]
    with attention_backend(name):
        got = attention(q, k, v, mask=mask)
    assert_close(got, math_attention(q, k, v, mask), ATTENTION_KERNEL)
    assert (got - attention(q, k, v)).abs().max().item() > 1e-2  # the mask matters


def test_unknown_backend_lists_usable_ones(monkeypatch):
    with pytest.raises(ValueError, match="Unknown attention backend 'nope'; usable backends: auto, native, "):
        set_attention_backend("nope")
    with pytest.raises(ValueError, match="usable backends: .*flex"):
        Kandinsky5Transformer3DModel.from_config(TINY_TRANSFORMER).set_attention_backend("nope")
    with pytest.raises(ValueError, match="usable backends"):
        with attention_backend("nope"):
            pass
    monkeypatch.setenv(ENV_VAR, "nope")
    with pytest.raises(ValueError, match=f"usable backends: {', '.join(available_backends())}"):
        attention(*qkv())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
@pytest.mark.parametrize("name", ["flash", "_native_cudnn", "efficient"])
def test_cuda_backend_unavailable_without_cuda(name):
    with pytest.raises(ValueError, match=f"'{name}' is not available on this machine; usable backends: auto"):
        set_attention_backend(name)
    with pytest.raises(ValueError, match="not available"):
        Kandinsky5Transformer3DModel.from_config(TINY_TRANSFORMER).set_attention_backend(name)


def test_cuda_backend_refuses_cpu_tensors(monkeypatch):
    """A CUDA kernel chosen (e.g. on a GPU machine) but a call on CPU tensors: an error, never another kernel."""
    monkeypatch.setattr(backends, "_context_backend", "_native_flash")
    with pytest.raises(ValueError, match="needs a CUDA device, got cpu; usable backends: auto"):
        attention(*qkv())


def test_precedence(monkeypatch):
    """model's own > innermost context > process default > environment variable > auto."""
    assert get_attention_backend() == "auto"
    monkeypatch.setenv(ENV_VAR, "MATH")
    assert get_attention_backend() == "_native_math"
    set_attention_backend("sdpa")
    assert get_attention_backend() == "native"
    with attention_backend("flex"):
        assert get_attention_backend() == "flex"
        with attention_backend("math"):
            assert get_attention_backend() == "_native_math"
        with attention_backend(None):  # keeps (pins) the current choice
            assert get_attention_backend() == "flex"
        assert get_attention_backend() == "flex"
    assert get_attention_backend() == "native"
    set_attention_backend(None)
    assert get_attention_backend() == "_native_math"


def test_model_backend_beats_context(monkeypatch):
    seen = []
    sdpa = backends._sdpa

    def spy(q, k, v, mask, kernels):
        seen.append(get_attention_backend())
        return sdpa(q, k, v, mask, kernels)

    monkeypatch.setattr(backends, "_sdpa", spy)
    model = Kandinsky5Transformer3DModel.from_config(TINY_TRANSFORMER).eval()
    gen = torch.Generator().manual_seed(0)
    inputs = (
        torch.randn(1, 1, 2, 2, model.config.visual_input_dim, generator=gen),
        torch.randn(1, 3, model.config.in_text_dim, generator=gen),
        torch.tensor([500.0]),
        torch.randn(1, model.config.in_text_dim2, generator=gen),
    )
    monkeypatch.setenv(ENV_VAR, "sdpa")
    with torch.no_grad():
        model(*inputs)
        assert set(seen) == {"native"}
        seen.clear()
        with attention_backend("math"):
            model(*inputs)
            assert set(seen) == {"_native_math"}
            seen.clear()
            model.set_attention_backend("auto")
            model(*inputs)
            assert set(seen) == {"auto"}
    assert model.attention_backend == "auto"


def test_flex_with_token_mask_falls_back_with_one_warning(caplog):
    q, k, v = qkv(kv_len=9)
    mask = torch.tensor([[True] * 9, [True] * 5 + [False] * 4])[:, None, None, :]
    with caplog.at_level(logging.WARNING, logger=backends.__name__), attention_backend("flex"):
        first = attention(q, k, v, mask=mask)
        second = attention(q, k, v, mask=mask)
    warnings = [r for r in caplog.records if r.name == backends.__name__]
    assert len(warnings) == 1
    assert "'flex' takes no token mask" in warnings[0].getMessage()
    expected = math_attention(q, k, v, mask)
    assert_close(first, expected, ATTENTION_KERNEL)
    assert torch.equal(first, second)


def test_block_map_and_mask_are_exclusive():
    q, k, v = qkv(q_len=64, kv_len=64)
    with pytest.raises(ValueError, match="not both"):
        attention(q, k, v, mask=torch.ones(1, 1, 64, 64, dtype=torch.bool), block_map=torch.ones(1, 1, 1, 1).bool())
