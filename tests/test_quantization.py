"""Low-bit weights (kandinsky5/runtime/quantization.py) on tiny models, on the CPU.

A quantized network is compared with the same network unquantized, in the same dtype, by relative L2. Each bound is
derived from the rounding of its format, not from what a machine gave.

Common to the derivations: rounding to nearest errs by at most half a step, and about uniformly, so its RMS is at
most half a step / sqrt(3). Such errors on the terms of a dot product with random signs add in quadrature, as the
terms themselves do, so a linear layer's output carries the RMS relative error of its weights (and of its inputs,
when those are rounded too). A sublayer of a block chains at most two quantized layers (feed-forward in -> out;
value -> out; query and key -> softmax -> out), whose relative errors add: twice one layer's. The residual stream,
the norms and the unquantized layers pass a relative error on without growing it.
"""

from __future__ import annotations

import copy
import importlib.util
import math

import pytest
import torch
from conftest import TINY_TRANSFORMER, randomize_
from tolerances import relative_l2

from kandinsky5 import Kandinsky5T2VPipeline
from kandinsky5.models.dit import (
    Kandinsky5Transformer3DModel,
    Modulation,
    OutLayer,
    TextBlock,
    TextEmbeddings,
    TimeEmbeddings,
    VisualBlock,
    VisualEmbeddings,
)
from kandinsky5.runtime import quantization as q

needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao is not installed")
needs_bitsandbytes = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed"
)

# int8 with one symmetric scale per row: a step of max|row| / 127, so a weight errs by at most 2**-8 of its row's
# max, RMS 2**-8 / sqrt(3) of it. A row's max is at most 4 times its RMS (Gaussian-like rows of up to thousands of
# weights; the tiny models' rows of 16 to 96 stay under 3): each layer's output errs by 4 * 2**-8 / sqrt(3) ~ 0.9 %;
# two chained layers 1.8 %; 2e-2 with the bfloat16 roundings that differ between the two runs.
INT8_RELATIVE_L2 = 2e-2
# float8 e4m3 has 3 mantissa bits: a value errs by at most half a step, 2**-4 of itself (each row is scaled so that
# its max is e4m3's largest, 448, which keeps the rest in the normal range), RMS 2**-4 / sqrt(3). Weights and inputs
# are both rounded: sqrt(2) of that per layer, ~5.1 %; two chained layers twice that: ~10.2 %.
FP8_RELATIVE_L2 = 2 * math.sqrt(2) * 2**-4 / math.sqrt(3)
# NF4: 16 levels over [-1, 1] of each block's absmax, blocks of 64 weights; 15 gaps of 2/15 on average, so a weight
# errs by RMS (2/15) / sqrt(12) ~ 0.038 of its block's absmax, which is ~2.4 times the RMS of 64 Gaussian weights:
# ~9.2 % per layer (the ~1e-1 usually quoted for NF4); two chained layers twice that: ~18.5 %.
NF4_RELATIVE_L2 = 2 * (2 / 15) / math.sqrt(12) * 2.4
# A generation with both networks quantized (guidance off), against the unquantized one: its latents are the noise
# plus the Euler sum (dt summing to 1) of velocities that carry the DiT's error and that of the prompt embeddings,
# which its normalised text input and attention average pass on without growth: the two bounds added.
PIPELINE_INT8_NF4_RELATIVE_L2 = INT8_RELATIVE_L2 + NF4_RELATIVE_L2

PROMPT = "A red fox runs through fresh snow"


# ---------------------------------------------------------------------------------------------------- tiny DiT


def tiny_transformer(seed: int = 2, fused: bool = False) -> Kandinsky5Transformer3DModel:
    model = Kandinsky5Transformer3DModel.from_config(TINY_TRANSFORMER).eval()
    randomize_(model, seed)
    model.to_dtype(torch.bfloat16)
    if fused:
        model.fuse_qkv_projections()
    return model


def transformer_inputs(model, grid=(3, 4, 6), batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    config = model.config
    x = torch.randn(batch, *grid, config.visual_input_dim, generator=gen)
    text = torch.randn(batch, 5, config.in_text_dim, generator=gen)
    pooled = torch.randn(batch, config.in_text_dim2, generator=gen)
    timestep = torch.full((batch,), 937.5)
    return [t.to(torch.bfloat16) for t in (x, text, timestep, pooled)]


def forward(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs).sample


def block_linears(model) -> dict[str, torch.nn.Linear]:
    """The linear layers of the text and visual blocks outside their modulations, found by module types (not by
    the rule under test)."""
    found = {}
    for name, block in model.named_modules():
        if isinstance(block, TextBlock | VisualBlock):
            modulation = {id(m) for sub in block.modules() if isinstance(sub, Modulation) for m in sub.modules()}
            for sub_name, sub in block.named_modules():
                if isinstance(sub, torch.nn.Linear) and id(sub) not in modulation:
                    found[f"{name}.{sub_name}"] = sub
    return found


@needs_torchao
@pytest.mark.parametrize(("seed", "fused"), [(0, False), (1, False), (2, False), (3, True)])
@pytest.mark.parametrize("mode", q.TRANSFORMER_MODES)
def test_transformer_forward_near_unquantized(mode, seed, fused):
    """The tiny DiT in bfloat16, quantized, against itself unquantized (random weights and inputs of ``seed``); the
    compute dtype stays bfloat16."""
    model = tiny_transformer(seed, fused)
    inputs = transformer_inputs(model, seed=seed)
    expected = forward(model, inputs)
    assert q.quantize_transformer(model, mode) is model
    got = forward(model, inputs)
    assert got.dtype == model.dtype == torch.bfloat16
    bound = {"int8": INT8_RELATIVE_L2, "fp8": FP8_RELATIVE_L2}[mode]
    assert 0 < relative_l2(got, expected) <= bound


def dequantized(weight) -> torch.Tensor:
    """A torchao per-row quantized weight as float32, computed here from its stored codes and scales."""
    return weight.qdata.float() * weight.scale


@needs_torchao
def test_fp8_weights_are_per_row_e4m3_with_dynamic_per_row_activations():
    from torchao.quantization import Float8Tensor, PerRow

    model = tiny_transformer()
    originals = {name: layer.weight.detach().float() for name, layer in block_linears(model).items()}
    q.quantize_transformer(model, "fp8")
    e4m3_max = torch.finfo(torch.float8_e4m3fn).max
    for name, layer in block_linears(model).items():
        weight, original = layer.weight, originals[name]
        assert isinstance(weight, Float8Tensor) and not weight.requires_grad, name
        assert weight.qdata.dtype == torch.float8_e4m3fn and weight.qdata.shape == original.shape
        assert weight.scale.shape == (original.shape[0], 1) and weight.scale.dtype == torch.float32
        assert isinstance(weight.act_quant_kwargs.granularity, PerRow)  # activations: dynamic, per row (token)
        assert weight.act_quant_kwargs.float8_dtype == torch.float8_e4m3fn
        assert weight.dtype == torch.bfloat16  # the dtype it computes in
        # each row's max maps to e4m3's largest value (the scale is computed in bfloat16: within 2**-8 of it)
        row_max = original.abs().amax(1, keepdim=True)
        assert torch.allclose(weight.scale, row_max / e4m3_max, rtol=2**-8, atol=0), name
        # e4m3 rounding: at most half a step, 2**-4 of the value, or half the smallest subnormal step (2**-10 of
        # the scale) below the normal range; 2**-8 more for a row max pushed past 448 by the rounded scale
        bound = (2**-4 + 2**-8) * original.abs() + 2**-10 * weight.scale
        assert ((dequantized(weight) - original).abs() <= bound).all(), name


@needs_torchao
def test_int8_weights_are_per_row():
    from torchao.quantization import Int8Tensor

    model = tiny_transformer()
    originals = {name: layer.weight.detach().float() for name, layer in block_linears(model).items()}
    q.quantize_transformer(model, "int8")
    for name, layer in block_linears(model).items():
        weight, original = layer.weight, originals[name]
        assert isinstance(weight, Int8Tensor) and not weight.requires_grad, name
        assert weight.qdata.dtype == torch.int8 and weight.qdata.shape == original.shape
        assert weight.scale.shape == (original.shape[0], 1)
        # a step of at most max|row| / 127, and rounding to nearest: within half a step
        row_max = original.abs().amax(1, keepdim=True)
        assert (weight.scale <= row_max / 127 * (1 + 2**-20)).all(), name
        assert ((dequantized(weight) - original).abs() <= weight.scale * (0.5 + 2**-20)).all(), name


@needs_torchao
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("mode", q.TRANSFORMER_MODES)
def test_only_block_linear_layers_are_quantized(mode, fused):
    """The time embedding, every modulation (in the blocks too), the input embeddings and the output head keep
    their plain tensors in their own dtypes (float32 islands float32); every block linear layer is quantized."""
    model = tiny_transformer(fused=fused)
    before = {name: (type(p), p.dtype, p.detach().clone()) for name, p in model.named_parameters()}
    layers = block_linears(model)
    config = model.config
    # text block: query, key, value, out, feed-forward in and out; visual block: twice the attention's, fused:
    # one layer for query-key-value (self-attention) and for key-value (cross-attention)
    per_text, per_visual = (4, 7) if fused else (6, 10)
    assert len(layers) == config.num_text_blocks * per_text + config.num_visual_blocks * per_visual
    assert set(q.transformer_layers(model)) == set(layers)  # the rule, against the enumeration by type

    q.quantize_transformer(model, mode)
    assert model.dtype == model.compute_dtype == torch.bfloat16
    assert q.quantization_mode(model) == mode
    quantized = {f"{name}.weight" for name in layers}
    for name, param in model.named_parameters():
        if name in quantized:
            assert q.is_low_bit(param), name
            continue
        kind, dtype, value = before[name]
        assert type(param) is kind is torch.nn.Parameter and param.dtype == dtype, name
        assert torch.equal(param, value), name
    kept = {
        "time embedding": model.time_embeddings,
        "text embedding": model.text_embeddings,
        "pooled text embedding": model.pooled_text_embeddings,
        "visual embedding": model.visual_embeddings,
        "output head": model.out_layer,
    }
    kept.update({f"modulation {i}": m for i, m in enumerate(model.modules()) if isinstance(m, Modulation)})
    for what, module in kept.items():
        assert isinstance(module, TimeEmbeddings | TextEmbeddings | VisualEmbeddings | OutLayer | Modulation)
        assert not any(q.is_low_bit(p) for p in module.parameters()), what
    assert model.time_embeddings.in_layer.weight.dtype == torch.float32
    assert model.visual_transformer_blocks[0].visual_modulation.out_layer.weight.dtype == torch.float32
    assert model.out_layer.out_layer.weight.dtype == torch.bfloat16


@needs_torchao
@pytest.mark.parametrize("mode", q.TRANSFORMER_MODES)
def test_quantized_transformer_survives_moves(mode):
    model = q.quantize_transformer(tiny_transformer(), mode)
    inputs = transformer_inputs(model)
    expected = forward(model, inputs)
    kinds = {name: type(p) for name, p in model.named_parameters()}
    model.to("cpu:0")  # a move (new storage) as to a GPU
    model._apply(lambda t: t.to("cpu"))
    assert {name: type(p) for name, p in model.named_parameters()} == kinds
    assert model.dtype == torch.bfloat16
    assert torch.equal(forward(model, inputs), expected)


@needs_torchao
@pytest.mark.parametrize(("mode", "fused"), [("int8", False), ("fp8", False), ("fp8", True)])
def test_saved_quantized_transformer_loads_back_equal(tmp_path, mode, fused):
    model = q.quantize_transformer(tiny_transformer(fused=fused), mode)
    inputs = transformer_inputs(model)
    expected = forward(model, inputs)
    assert q.save_quantized_transformer(model, tmp_path / "transformer") == tmp_path / "transformer"
    loaded = q.load_quantized_transformer(tmp_path / "transformer")
    assert q.quantization_mode(loaded) == mode and loaded.dtype == torch.bfloat16
    assert torch.equal(forward(loaded, inputs), expected)  # the same codes, scales and kept tensors
    quantized = {f"{name}.weight" for name in block_linears(loaded)}  # loaded unfused: the checkpoint's layout
    for name, param in loaded.named_parameters():
        assert q.is_low_bit(param) == (name in quantized) and not param.is_meta, name
    assert loaded.time_embeddings.in_layer.weight.dtype == torch.float32
    with pytest.raises(RuntimeError, match="already quantized"):
        q.quantize_transformer(loaded, mode)


@needs_torchao
def test_saving_refuses_what_it_cannot_write(tmp_path):
    with pytest.raises(ValueError, match="not quantized: save it with save_pretrained"):
        q.save_quantized_transformer(tiny_transformer(), tmp_path / "plain")
    with pytest.raises(ValueError, match="cannot save an int8 transformer with fused projections"):
        q.save_quantized_transformer(q.quantize_transformer(tiny_transformer(fused=True), "int8"), tmp_path / "f")
    assert not (tmp_path / "f").exists()
    with pytest.raises(FileNotFoundError, match="written by save_quantized_transformer"):
        q.load_quantized_transformer(tmp_path)


# ---------------------------------------------------------------------------------------------------- text encoder


def encode(pipe, text_encoder) -> torch.Tensor:
    """The prompt embeddings the DiT receives: Qwen's last hidden states, the template prefix cropped."""
    from kandinsky5.models import text_encoders as te

    prompts = [PROMPT, "A lighthouse on a cliff at dusk, waves below"]
    prefix = pipe.prompt_template_encode_start_idx
    with torch.no_grad():
        embeds, _ = te.encode_qwen(pipe.tokenizer, text_encoder, prompts, prefix, 64, torch.device("cpu"), None)
    return embeds.float()


def decoder_linears(text_encoder) -> dict[str, torch.nn.Module]:
    layers = text_encoder.model.language_model.layers
    return {
        f"model.language_model.layers.{name}": m
        for name, m in layers.named_modules()
        if name.endswith(("_proj", "proj")) and not list(m.children())
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "mode", [pytest.param("int8", marks=needs_torchao), pytest.param("nf4", marks=needs_bitsandbytes)]
)
def test_text_encoder_near_unquantized(our_pipeline, mode, dtype):
    encoder = copy.deepcopy(our_pipeline.text_encoder).to(dtype)  # the session's pipeline stays as it is
    expected = encode(our_pipeline, encoder)
    layers = decoder_linears(encoder)
    assert len(layers) == 7 * len(encoder.model.language_model.layers)  # q, k, v, o; gate, up, down
    assert set(q.text_encoder_layers(encoder)) == set(layers)
    before = {name: p.detach().clone() for name, p in encoder.named_parameters()}

    assert q.quantize_text_encoder(encoder, mode) is encoder
    got = encode(our_pipeline, encoder)
    bound = {"int8": INT8_RELATIVE_L2, "nf4": NF4_RELATIVE_L2}[mode]
    assert 0 < relative_l2(got, expected) <= bound

    quantized = set(layers)
    for name, module in encoder.named_modules():
        if name in quantized:
            if mode == "int8":
                from torchao.quantization import Int8Tensor

                assert isinstance(module.weight, Int8Tensor), name
            else:
                import bitsandbytes as bnb

                assert isinstance(module, bnb.nn.Linear4bit) and isinstance(module.weight, bnb.nn.Params4bit), name
                assert module.weight.quant_type == "nf4" and module.weight.blocksize == q.NF4_BLOCKSIZE
                assert module.weight.bnb_quantized and module.compute_dtype == dtype
    untouched = {n: p for n, p in encoder.named_parameters() if n.rpartition(".")[0] not in quantized}
    assert any(n.startswith("lm_head") for n in untouched) and any("embed_tokens" in n for n in untouched)
    assert any(n.startswith("model.visual") for n in untouched)
    for name, param in untouched.items():
        assert type(param) is torch.nn.Parameter and torch.equal(param, before[name]), name

    # moves keep the packed weights (bitsandbytes' Params4bit, torchao's Int8Tensor)
    kinds = {name: type(p) for name, p in encoder.named_parameters()}
    encoder.to("cpu:0")
    encoder.to("cpu")
    assert {name: type(p) for name, p in encoder.named_parameters()} == kinds
    assert torch.equal(encode(our_pipeline, encoder), got)


# ---------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("transformer", "text_encoder", "message"),
    [
        ("int4", None, "transformer must be one of 'fp8', 'int8' or None, got 'int4'"),
        ("FP8", "int8", "transformer must be one of 'fp8', 'int8' or None, got 'FP8'"),
        (None, "fp8", "text_encoder must be one of 'int8', 'nf4' or None, got 'fp8'"),
        ("int8", "nf8", "text_encoder must be one of 'int8', 'nf4' or None, got 'nf8'"),
    ],
)
def test_bad_modes_are_refused_in_one_line(transformer, text_encoder, message):
    with pytest.raises(ValueError) as error:
        q.check_quantize_arguments(transformer, text_encoder)
    assert str(error.value) == message


def test_fp8_needs_fp8_matrix_units(monkeypatch):
    capability = {}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability["value"])
    cuda = torch.device("cuda", 0)
    for value in [(8, 0), (8, 6), (7, 5)]:
        capability["value"] = value
        with pytest.raises(ValueError, match=r'transformer="fp8" needs FP8 matrix units .*use transformer="int8"'):
            q.check_quantize_arguments("fp8", None, cuda)
        q.check_quantize_arguments("int8", "nf4", cuda)
    for value in [(8, 9), (9, 0), (10, 0)]:
        capability["value"] = value
        q.check_quantize_arguments("fp8", None, cuda)
    q.check_quantize_arguments("fp8", None, torch.device("cpu"))  # the CPU runs it in software


def test_missing_package_named_with_the_install_line(monkeypatch):
    real = importlib.util.find_spec
    missing = {"torchao"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in missing else real(name, *a))
    with pytest.raises(ImportError, match=r"transformer='int8' needs the torchao package.*kandinsky5\[quantization\]"):
        q.check_quantize_arguments("int8", None)
    with pytest.raises(ImportError, match="text_encoder='int8' needs the torchao package"):
        q.quantize_text_encoder(torch.nn.Linear(2, 2), "int8")
    missing = {"bitsandbytes"}
    with pytest.raises(
        ImportError, match=r"text_encoder='nf4' needs the bitsandbytes package, which is not installed: pip install"
    ):
        q.check_quantize_arguments(None, "nf4")
    q.check_quantize_arguments("fp8", "int8")


@needs_torchao
@pytest.mark.parametrize("mode", q.TRANSFORMER_MODES)
def test_quantizing_twice_is_refused(mode):
    model = q.quantize_transformer(tiny_transformer(), mode)
    for again in q.TRANSFORMER_MODES:
        with pytest.raises(RuntimeError, match=rf"transformer is already quantized \({mode}\); quantize a fresh"):
            q.quantize_transformer(model, again)
    # quantized by other means (no mode recorded): found by its weights
    other = tiny_transformer()
    layer = other.visual_transformer_blocks[0].feed_forward.in_layer
    layer.weight.data = layer.weight.data.to(torch.float8_e4m3fn)
    with pytest.raises(RuntimeError, match="already quantized .*feed_forward.in_layer.weight"):
        q.quantize_transformer(other, mode)


@needs_torchao
def test_fp8_needs_a_bfloat16_transformer_and_a_transformer():
    model = Kandinsky5Transformer3DModel.from_config(TINY_TRANSFORMER).eval()
    with pytest.raises(ValueError, match=r'fp8" needs a torch.bfloat16 transformer .* is torch.float32'):
        q.quantize_transformer(model, "fp8")
    assert not any(q.is_low_bit(p) for p in model.parameters())  # refused before any change
    with pytest.raises(TypeError, match="takes a Kandinsky5Transformer3DModel, got Linear"):
        q.quantize_transformer(torch.nn.Linear(2, 2), "int8")
    with pytest.raises(ValueError, match="transformer must be one of 'fp8', 'int8', got None"):
        q.quantize_transformer(model, None)


# ---------------------------------------------------------------------------------------------------- pipeline


@pytest.fixture
def pipe(reference_checkpoint):
    """A pipeline of our own (quantizing changes it; the session's stays as it is)."""
    pipe = Kandinsky5T2VPipeline.from_pretrained(reference_checkpoint[0])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_quantize_pipeline_after_offload_is_refused(pipe):
    pipe.enable_model_cpu_offload(device="cpu")
    with pytest.raises(RuntimeError, match=r"call quantize before enable_model_cpu_offload"):
        q.quantize_pipeline(pipe, transformer="int8")
    with pytest.raises(ValueError, match="text_encoder must be one of"):  # arguments first
        q.quantize_pipeline(pipe, text_encoder="int4")
    pipe.remove_all_hooks()
    with pytest.raises(ValueError, match="transformer must be one of"):
        q.quantize_pipeline(pipe, transformer="int4", text_encoder="int8")
    assert not any(q.is_low_bit(p) for m in (pipe.transformer, pipe.text_encoder) for p in m.parameters())


@needs_torchao
@needs_bitsandbytes
def test_quantize_pipeline(pipe, our_pipeline):
    """Both networks quantized; the other networks untouched; a generation runs on them."""
    with pytest.raises(ValueError, match="fp8"):  # a float32 checkpoint: checked before the text encoder changes
        q.quantize_pipeline(pipe, transformer="fp8", text_encoder="nf4")
    assert q.quantization_mode(pipe.text_encoder) is None
    q.quantize_pipeline(pipe, transformer="int8", text_encoder="nf4")
    assert q.quantization_mode(pipe.transformer) == "int8" and q.quantization_mode(pipe.text_encoder) == "nf4"
    for network in (pipe.text_encoder_2, pipe.vae):
        assert not any(q.is_low_bit(p) for p in network.parameters())
    assert pipe.transformer.dtype == torch.float32
    with pytest.raises(RuntimeError, match="already quantized"):
        q.quantize_pipeline(pipe, text_encoder="int8")
    args = dict(prompt=PROMPT, height=32, width=48, num_frames=5, num_inference_steps=2, guidance_scale=1.0)
    args["output_type"] = "latent"
    got = pipe(generator=torch.Generator().manual_seed(0), **args).frames
    expected = our_pipeline(generator=torch.Generator().manual_seed(0), **args).frames
    assert 0 < relative_l2(got, expected) <= PIPELINE_INT8_NF4_RELATIVE_L2


def test_import_needs_neither_package():
    """The module imports without torchao and bitsandbytes: they are imported only when a mode runs."""
    import subprocess
    import sys

    code = "import sys, kandinsky5.runtime.quantization; print(sorted({'torchao', 'bitsandbytes'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
