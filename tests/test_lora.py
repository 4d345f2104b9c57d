"""LoRA adapters (kandinsky5/runtime/lora.py, loading/lora_formats.py, pipelines/lora.py, cli/lora_options.py) on
the tiny checkpoint, float32 on the CPU.

The LoRAs are made with PEFT on diffusers' tiny transformer (random nonzero ``lora_B``: PEFT initialises it to zero)
and written by diffusers' own ``Kandinsky5T2VPipeline.save_lora_weights``; diffusers 0.42.1 loading the same file
into the same checkpoint is the oracle. Other formats are written here from the same tensors.

Tolerances (tests/tolerances.py):

- ours against diffusers, unfused or fused: ``FORWARD_REORDER`` on the latents (``PIPELINE`` on frames). Our branch
  does PEFT's operations in PEFT's order (``base(x) + up(down(x)) * scale``, the scale computed as PEFT computes
  it), and fusing adds PEFT's delta ``(up @ down) * scale`` in float32, so the DiT still does the reference's
  arithmetic: what separates the two sides is what separates them without LoRA (measured: nothing, they agree to
  the bit on this machine);
- fused projections, int8 weights, against the plain unfused LoRA: fused QKV changes the GEMMs' shapes like fusion
  without LoRA does (``PIPELINE_BF16_FLIP``, the bound test_fusion uses); int8 weights approximate the base layers,
  not the branch, which stays in float32: the quantization's own bound (test_quantization's ``INT8_RELATIVE_L2``);
- regional compile with ``aot_eager`` (no code generation: the same kernels) and block streaming (the same kernels
  on copies of the same tensors) are compared bit for bit, as test_compile and test_block_offload do without LoRA.
"""

from __future__ import annotations

import argparse
import copy
import json

import pytest
import torch
from safetensors.torch import save_file
from tolerances import FORWARD_REORDER, PIPELINE, PIPELINE_BF16_FLIP, assert_close, max_abs_diff, relative_l2

from kandinsky5 import Kandinsky5T2VPipeline
from kandinsky5.loading import lora_formats as formats
from kandinsky5.pipelines.lora import LoraMixin, with_trigger_words
from kandinsky5.runtime import lora as runtime
from kandinsky5.runtime.block_offload import BlockOffload, tensor_places
from kandinsky5.runtime.offload import SequentialCpuOffload

PROMPT = "A red fox runs through fresh snow"
SMALL = dict(height=32, width=48, num_frames=5, num_inference_steps=2, guidance_scale=5.0)
# adapter "a": every linear layer of the blocks' attentions and feed-forwards, r 4, alpha 8 (scale 2), its config
# in the diffusers metadata; adapter "b": a few layers (one outside the blocks), r 2, no metadata (alpha = rank)
TARGETS_A = (
    r".*_blocks\.\d+\.(self_attention|cross_attention|feed_forward)\.(to_query|to_key|to_value|out_layer|in_layer)"
)
TARGETS_B = r"(visual_transformer_blocks\.\d+\.self_attention\.(to_query|to_value)|visual_embeddings\.in_layer)"
TRIGGER = "kndnsk5 style, "
# int8 weight-only quantization against full precision (tests/test_quantization.py derives it)
INT8_RELATIVE_L2 = 2e-2


# The pipeline with the LoRA methods: itself once the base pipeline inherits LoraMixin, a subclass until then.
if issubclass(Kandinsky5T2VPipeline, LoraMixin):
    LoraT2V = Kandinsky5T2VPipeline
else:
    LoraT2V = type("LoraT2V", (LoraMixin, Kandinsky5T2VPipeline), {})


# ---------------------------------------------------------------------------------------------- fixtures


def make_peft_lora(transformer, rank, alpha, targets, seed):
    """A PEFT LoRA on a copy of diffusers' transformer, ``lora_B`` random: (its state dict, its LoraConfig)."""
    from peft import LoraConfig, get_peft_model_state_dict

    model = copy.deepcopy(transformer)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets)
    model.add_adapter(config, adapter_name="made")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
    return get_peft_model_state_dict(model, adapter_name="made"), config


@pytest.fixture(scope="module")
def loras(reference_checkpoint, tmp_path_factory):
    """Two LoRAs in diffusers' format: ``{"a": file, "b": file, "a_tensors": PEFT state dict, ...}``."""
    pytest.importorskip("peft", reason="PEFT makes the test LoRAs (pip install -e '.[test]')")
    from diffusers import Kandinsky5T2VPipeline as DiffusersPipeline

    _, ref = reference_checkpoint
    folder = tmp_path_factory.mktemp("loras")
    tensors_a, config_a = make_peft_lora(ref.transformer, 4, 8, TARGETS_A, seed=11)
    tensors_b, _ = make_peft_lora(ref.transformer, 2, 2, TARGETS_B, seed=12)
    DiffusersPipeline.save_lora_weights(
        folder / "a", transformer_lora_layers=tensors_a, transformer_lora_adapter_metadata=config_a.to_dict()
    )
    DiffusersPipeline.save_lora_weights(folder / "b", transformer_lora_layers=tensors_b)
    weights = "pytorch_lora_weights.safetensors"
    return dict(a=folder / "a" / weights, b=folder / "b" / weights, a_tensors=tensors_a, folder=folder)


@pytest.fixture(scope="module")
def loaded(reference_checkpoint):
    """Our pipeline, loaded once (the tokenizers take seconds); tests take copies of it (:func:`ours`)."""
    pipe = LoraT2V.from_pretrained(reference_checkpoint[0])
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def ours(loaded):
    """``ours()``: a pipeline with a transformer of its own; ``ours(networks=True)``: every network its own (for
    offloading, which changes them all)."""

    def make(networks: bool = False) -> LoraT2V:
        components = dict(loaded.components)
        for name in ("transformer", "text_encoder", "text_encoder_2", "vae") if networks else ("transformer",):
            components[name] = copy.deepcopy(components[name])
        pipe = LoraT2V(**components)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return make


def diffusers_pipe(reference_checkpoint):
    """diffusers' tiny pipeline with a transformer of its own (LoRAs change it; the shared fixture stays)."""
    from diffusers import Kandinsky5T2VPipeline as DiffusersPipeline

    _, ref = reference_checkpoint
    pipe = DiffusersPipeline(**dict(ref.components, transformer=copy.deepcopy(ref.transformer)))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, output_type="latent", **kwargs):
    args = dict(SMALL, prompt=PROMPT, generator=torch.Generator().manual_seed(0), output_type=output_type)
    return pipe(**{**args, **kwargs}).frames


@pytest.fixture(scope="module")
def base_and_plain(loaded, loras):
    """Our latents without LoRA, and with adapter "a" at weight 0.7, unfused (what the variants must give)."""
    pipe = LoraT2V(**dict(loaded.components, transformer=copy.deepcopy(loaded.transformer)))
    pipe.set_progress_bar_config(disable=True)
    base = run(pipe)
    pipe.load_lora_weights(loras["a"], adapter_name="a")
    pipe.set_adapters("a", 0.7)
    return base, run(pipe)


def assert_lora_changes(got, base):
    """A LoRA that does something: far beyond any rounding bound."""
    assert max_abs_diff(got, base) > 1e3 * FORWARD_REORDER.bound(base)


# ---------------------------------------------------------------------------------------------- against diffusers


@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_unfused_lora_equals_diffusers(ours, reference_checkpoint, loras, base_and_plain, weight):
    ref, pipe = diffusers_pipe(reference_checkpoint), ours()
    for p in (ref, pipe):
        p.load_lora_weights(loras["a"], adapter_name="a")
        p.set_adapters("a", weight)
    expected, got = run(ref), run(pipe)
    assert_close(got, expected, FORWARD_REORDER)
    assert_lora_changes(got, base_and_plain[0])
    assert pipe.get_active_adapters() == ["a"] and pipe.get_list_adapters() == {"transformer": ["a"]}


def test_two_adapters_mixed_fused_and_unfused_equal_diffusers(ours, reference_checkpoint, loras):
    ref, pipe = diffusers_pipe(reference_checkpoint), ours()
    for p in (ref, pipe):
        p.load_lora_weights(loras["a"], adapter_name="a")
        p.load_lora_weights(loras["b"], adapter_name="b")
    assert pipe.get_active_adapters() == ref.get_active_adapters() == ["b"]  # the last loaded, as diffusers
    for p in (ref, pipe):
        p.set_adapters(["a", "b"], [0.7, 0.3])
    unfused = run(pipe)
    assert_close(unfused, run(ref), FORWARD_REORDER)
    weights = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    for p in (ref, pipe):
        p.fuse_lora(lora_scale=0.8)
    assert_close(run(pipe), run(ref), FORWARD_REORDER)
    assert not any(isinstance(m, runtime.LoraLinear) and m.lora_active for m in pipe.transformer.modules())
    pipe.unfuse_lora()
    # the exact weights back (a host copy, not a subtraction), and the unfused LoRA's output to the bit
    restored = pipe.transformer.state_dict()
    assert all(torch.equal(restored[k], v) for k, v in weights.items())
    assert torch.equal(run(pipe), unfused)


def test_frames_equal_diffusers(ours, reference_checkpoint, loras):
    ref, pipe = diffusers_pipe(reference_checkpoint), ours()
    for p in (ref, pipe):
        p.load_lora_weights(loras["a"], adapter_name="a")
    expected = run(ref, output_type="np", guidance_scale=1.0)
    got = run(pipe, output_type="np", guidance_scale=1.0)
    assert_close(got, expected, PIPELINE)


def test_unload_disable_and_state_dict_restore_the_base_exactly(ours, loras, base_and_plain):
    base, plain = base_and_plain
    pipe = ours()
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    pipe.load_lora_weights(loras["a"], adapter_name="a")
    pipe.set_adapters("a", 0.7)
    # unfused, the checkpoint layout and tensors are untouched: the branches are non-persistent buffers
    during = pipe.transformer.state_dict()
    assert list(during) == list(before) and all(torch.equal(during[k], v) for k, v in before.items())
    assert torch.equal(run(pipe), plain)
    pipe.disable_lora()
    assert torch.equal(run(pipe), base)
    pipe.enable_lora()
    assert torch.equal(run(pipe), plain)
    pipe.unload_lora_weights()
    assert torch.equal(run(pipe), base)
    assert not any(isinstance(m, runtime.LoraLinear) for m in pipe.transformer.modules())
    assert type(pipe.transformer.visual_transformer_blocks[0].self_attention.to_query) is torch.nn.Linear
    assert pipe.get_active_adapters() == [] and pipe.get_list_adapters() == {}


def test_fuse_then_unload_keeps_the_lora_in_the_weights(ours, loras, base_and_plain):
    pipe = ours()
    pipe.load_lora_weights(loras["a"], adapter_name="a")
    pipe.fuse_lora(lora_scale=0.7)
    pipe.unload_lora_weights()  # diffusers' way to bake a LoRA in
    assert runtime.lora_state(pipe.transformer) is None
    assert_close(run(pipe), base_and_plain[1], FORWARD_REORDER)


# ---------------------------------------------------------------------------------------------- formats


def original_format(tensors, folder):
    """The original Kandinsky-5 repository's adapter: PEFT's raw keys (``base_model.model.``, the adapter name),
    the trigger word in the safetensors metadata, r and alpha in ``config_lora.json`` beside it."""
    folder.mkdir()
    renamed = {
        "base_model.model." + key.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): t
        for key, t in tensors.items()
    }
    save_file(renamed, str(folder / "lora.safetensors"), metadata={"trigger": TRIGGER})
    (folder / "config_lora.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "target_modules": TARGETS_A}))
    return folder


def kohya_format(tensors, path):
    """musubi-tuner's / kohya's: flattened names, lora_down / lora_up, a per-layer alpha."""
    converted = {}
    for key, tensor in tensors.items():
        layer, _, role = key.rpartition(".lora_")
        flat = "lora_unet_" + layer.replace(".", "_")
        converted[f"{flat}.lora_{'down' if role.startswith('A') else 'up'}.weight"] = tensor
        converted[f"{flat}.alpha"] = torch.tensor(8.0)
    save_file(converted, str(path))
    return path


def comfy_format(tensors, path):
    """ComfyUI / ai-toolkit's: ``diffusion_model.`` prefix, an alpha per layer."""
    converted = {f"diffusion_model.{key}": tensor for key, tensor in tensors.items()}
    for key in tensors:
        converted[f"diffusion_model.{key.rpartition('.lora_')[0]}.alpha"] = torch.tensor(8.0)
    save_file(converted, str(path))
    return path


def test_formats_load_to_the_same_weights(ours, loras, tmp_path):
    tensors = loras["a_tensors"]
    pipe = ours()
    pipe.fuse_qkv_projections()  # the formats name the unfused projections
    pipe.load_lora_weights(loras["a"], adapter_name="diffusers")
    pipe.load_lora_weights(original_format(tensors, tmp_path / "original"), adapter_name="original")
    pipe.load_lora_weights(kohya_format(tensors, tmp_path / "kohya.safetensors"), adapter_name="kohya")
    pipe.load_lora_weights(comfy_format(tensors, tmp_path / "comfy.safetensors"), adapter_name="comfy")
    state = runtime.lora_state(pipe.transformer)
    formats_seen = {name: adapter.format for name, adapter in state.adapters.items()}
    assert formats_seen == {
        "diffusers": formats.FORMAT_DIFFUSERS,
        "original": formats.FORMAT_ORIGINAL,
        "kohya": formats.FORMAT_KOHYA,
        "comfy": formats.FORMAT_COMFY,
    }
    layers = state.adapters["diffusers"].layers
    assert len(layers) == len(tensors) // 2 == 26
    for layer in layers:
        expected = runtime.effective_delta(pipe.transformer, "diffusers", layer)
        for name in ("original", "kohya", "comfy"):
            assert torch.equal(runtime.effective_delta(pipe.transformer, name, layer), expected), (name, layer)
    assert runtime.effective_delta(pipe.transformer, "diffusers", next(iter(layers))).abs().max() > 0
    assert pipe.lora_trigger_words == {"original": TRIGGER.strip()}  # the original repository's metadata key
    assert with_trigger_words(PROMPT, list(pipe.lora_trigger_words.values())) == f"kndnsk5 style, {PROMPT}"


def test_unknown_keys_are_named(ours, loras):
    pipe = ours()
    tensors = {f"transformer.{k}": v for k, v in loras["a_tensors"].items()}
    wrong = "transformer.visual_transformer_blocks.0.self_attention.to_nothing.lora_A.weight"
    bad = dict(tensors, **{wrong: torch.zeros(4, 32), wrong.replace("lora_A", "lora_B"): torch.zeros(32, 4)})
    with pytest.raises(ValueError, match="to_nothing.lora_A.weight.*matches no linear layer"):
        pipe.load_lora_weights(bad)
    block = "lora_unet_visual_transformer_blocks_7_self_attention_to_query"
    with pytest.raises(ValueError, match=f"{block}.lora_down.weight.*matches no linear layer"):
        pipe.load_lora_weights(
            {f"{block}.lora_down.weight": torch.zeros(4, 32), f"{block}.lora_up.weight": torch.zeros(32, 4)}
        )
    not_lora = "transformer.visual_transformer_blocks.0.self_attention.to_query.weight"
    with pytest.raises(ValueError, match=f"{not_lora}.*is not a LoRA tensor"):
        pipe.load_lora_weights(dict(tensors, **{not_lora: torch.zeros(32, 32)}))
    dora = "transformer.visual_transformer_blocks.0.self_attention.to_query.lora_magnitude_vector"
    with pytest.raises(ValueError, match="DoRA"):
        pipe.load_lora_weights(dict(tensors, **{dora: torch.zeros(32)}))
    shape = "transformer.visual_transformer_blocks.0.feed_forward.in_layer.lora_B.weight"
    with pytest.raises(ValueError, match="does not fit layer"):
        pipe.load_lora_weights(dict(tensors, **{shape: torch.zeros(32, 4)}))
    assert pipe.get_list_adapters() == {}  # nothing half-loaded
    with pytest.raises(ValueError, match="without dots"):
        pipe.load_lora_weights(tensors, adapter_name="a.b")
    pipe.load_lora_weights(tensors, adapter_name="a")
    with pytest.raises(ValueError, match="loaded already"):
        pipe.load_lora_weights(tensors, adapter_name="a")
    with pytest.raises(ValueError, match=r"\['c'\] are not loaded"):
        pipe.set_adapters(["a", "c"])


# ------------------------------------------------------------------------------------ with the other transforms


def test_fused_qkv_projections(ours, loras, base_and_plain):
    plain = base_and_plain[1]
    fused_first = ours()
    fused_first.fuse_qkv_projections()
    fused_first.load_lora_weights(loras["a"], adapter_name="a")
    fused_first.set_adapters("a", 0.7)
    attention = fused_first.transformer.visual_transformer_blocks[0].self_attention
    branch = attention.fused_projection.lora_adapters["a"]
    assert branch.rows == ((0, 32), (32, 64), (64, 96))  # query, key, value: each its rows of the fused output
    assert_close(run(fused_first), plain, PIPELINE_BF16_FLIP)
    # loaded first, then fused: the branches move onto the fused layers
    loaded_first = ours()
    loaded_first.load_lora_weights(loras["a"], adapter_name="a")
    loaded_first.set_adapters("a", 0.7)
    loaded_first.fuse_qkv_projections()
    runtime.sync(loaded_first.transformer)  # what the pipeline's fuse_qkv_projections does once wired
    assert_close(run(loaded_first), plain, PIPELINE_BF16_FLIP)
    # unfused behind the LoRA's back: the next LoRA call puts the branches back on the new layers
    loaded_first.unfuse_qkv_projections()
    loaded_first.set_adapters("a", 0.7)
    assert torch.equal(run(loaded_first), plain)
    # fusing the LoRA into a fused projection's rows, and back exactly
    weights = {k: v.clone() for k, v in fused_first.transformer.state_dict().items()}
    fused_first.fuse_lora()
    assert_close(run(fused_first), plain, PIPELINE_BF16_FLIP)
    fused_first.unfuse_lora()
    assert all(torch.equal(v, weights[k]) for k, v in fused_first.transformer.state_dict().items())


def test_regional_compile(ours, loras, base_and_plain):
    """Compiled blocks run the branches: loading after compiling takes effect, so does unloading (aot_eager: the
    eager kernels, so the outputs are the eager ones to the bit). No guidance: one graph per block class."""
    pipe = ours()
    base = run(pipe, guidance_scale=1.0)
    pipe.load_lora_weights(loras["a"], adapter_name="a")
    pipe.set_adapters("a", 0.7)
    eager = run(pipe, guidance_scale=1.0)
    pipe.unload_lora_weights()
    torch._dynamo.reset()
    pipe.transformer.compile(backend="aot_eager")
    pipe.load_lora_weights(loras["a"], adapter_name="a")
    pipe.set_adapters("a", 0.7)
    assert torch.equal(run(pipe, guidance_scale=1.0), eager)
    pipe.unload_lora_weights()
    assert torch.equal(run(pipe, guidance_scale=1.0), base)


def test_int8_weights_keep_an_unfused_branch_and_refuse_fusing(ours, loras, base_and_plain):
    pytest.importorskip("torchao")
    plain = base_and_plain[1]
    pipe = ours()
    pipe.quantize(transformer="int8")
    pipe.load_lora_weights(loras["a"], adapter_name="a")
    pipe.set_adapters("a", 0.7)
    got = run(pipe)
    assert relative_l2(got, plain) <= INT8_RELATIVE_L2
    assert_lora_changes(got, base_and_plain[0])
    # the layer: its quantized base output plus the branch in float32, exactly
    layer = pipe.transformer.visual_transformer_blocks[0].feed_forward.in_layer
    branch = layer.lora_adapters["a"]
    assert type(layer.weight).__name__ == "Int8Tensor" and branch.down_0.dtype == torch.float32
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base_out = torch.nn.functional.linear(x, layer.weight, layer.bias)
        expected = base_out + (x @ branch.down_0.T @ branch.up_0.T) * branch.scales[0]
        assert torch.equal(layer(x), expected)
    with pytest.raises(ValueError, match="quantized.*keep the LoRA unfused"):
        pipe.fuse_lora()
    assert torch.equal(run(pipe), got)  # nothing changed by the refused fuse
    # quantized after loading: the same layers, the same branches
    later = ours()
    later.load_lora_weights(loras["a"], adapter_name="a")
    later.set_adapters("a", 0.7)
    later.quantize(transformer="int8")
    assert torch.equal(run(later), got)


def test_block_streaming_streams_the_branches(ours, loras, base_and_plain):
    plain = base_and_plain[1]
    pipe = ours(networks=True)
    pipe.load_lora_weights(loras["a"], adapter_name="a")
    pipe.set_adapters("a", 0.7)
    pipe._enable_offload(BlockOffload, None, "cpu:0")
    block = pipe.transformer.visual_transformer_blocks[0]
    branch_buffers = {id(b) for m in block.modules() if isinstance(m, runtime.LoraBranch) for b in m.buffers()}
    placed = {id(p.get()) for p in tensor_places(block)}
    assert len(branch_buffers) == 2 * 10 and branch_buffers <= placed  # down and up of the block's 10 layers
    assert torch.equal(run(pipe), plain)
    # loaded while streaming: the offload is re-armed around the new layers
    late = ours(networks=True)
    late._enable_offload(BlockOffload, None, "cpu:0")
    late.load_lora_weights(loras["a"], adapter_name="a")
    late.set_adapters("a", 0.7)
    assert isinstance(late._offload_plan, BlockOffload)
    assert torch.equal(run(late), plain)
    late.unload_lora_weights()
    assert torch.equal(run(late), base_and_plain[0])
    # sequential offload copies each branch's buffers for its own forward
    pipe.remove_all_hooks()
    pipe._enable_offload(SequentialCpuOffload, None, "cpu:0")
    assert torch.equal(run(pipe), plain)


def test_branches_take_the_layers_dtype(ours, loras):
    """The branch computes in its layer's dtype: the compute dtype, float32 in the float32 islands; a cast of the
    model is followed at the next LoRA call (``to_dtype`` casts parameters only)."""
    pipe = ours()
    island = "visual_transformer_blocks.0.visual_modulation.out_layer"
    tensors = {
        f"transformer.{island}.lora_A.weight": torch.randn(2, 16),
        f"transformer.{island}.lora_B.weight": torch.randn(288, 2),
    }
    pipe.load_lora_weights(loras["b"], adapter_name="b")
    pipe.load_lora_weights(tensors, adapter_name="island")
    pipe.transformer.to_dtype(torch.bfloat16)
    pipe.set_adapters(["b", "island"])
    blocks = pipe.transformer.visual_transformer_blocks
    assert blocks[0].self_attention.to_query.lora_adapters["b"].down_0.dtype == torch.bfloat16
    assert blocks[0].visual_modulation.out_layer.lora_adapters["island"].up_0.dtype == torch.float32


# ---------------------------------------------------------------------------------------------- command line


def cli_args(*argv):
    from kandinsky5.cli.lora_options import add_lora_options

    parser = argparse.ArgumentParser()
    add_lora_options(parser)
    return parser.parse_args(list(argv))


def test_check_lora_options_name_the_flag(loras, tmp_path):
    from kandinsky5.cli.lora_options import check_lora_options
    from kandinsky5.cli.main import UsageError

    check_lora_options(cli_args("--lora", str(loras["a"]), "--lora", f"{loras['b']}:0.5"))
    check_lora_options(cli_args("--lora", "someone/kandinsky5-lora:0.8"))  # a hub id: fetched when loading
    with pytest.raises(UsageError, match=r"^--lora .*missing\.safetensors: no such file"):
        check_lora_options(cli_args("--lora", str(tmp_path / "missing.safetensors")))
    with pytest.raises(UsageError, match=r"^--lora .*: the scale 'abc' of .* is not a number"):
        check_lora_options(cli_args("--lora", f"{loras['a']}:abc"))
    with pytest.raises(UsageError, match=r"^--lora .*: the scale of .* must be finite"):
        check_lora_options(cli_args("--lora", f"{loras['a']}:nan"))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    with pytest.raises(UsageError, match=r"^--lora .*broken\.safetensors.*not a readable safetensors"):
        check_lora_options(cli_args("--lora", str(broken)))
    foreign = tmp_path / "foreign.safetensors"
    save_file({"transformer.x.weight": torch.zeros(2, 2)}, str(foreign))
    with pytest.raises(UsageError, match=r"^--lora .*'transformer\.x\.weight' is not a LoRA tensor"):
        check_lora_options(cli_args("--lora", str(foreign)))


def test_apply_lora_options(ours, loras, tmp_path):
    from kandinsky5.cli.lora_options import apply_lora_options

    original = original_format(loras["a_tensors"], tmp_path / "camera-arc")
    pipe = ours()
    words = apply_lora_options(cli_args("--lora", f"{original}:0.5", "--lora", str(loras["b"])), pipe)
    assert words == [TRIGGER.strip()]
    state = runtime.lora_state(pipe.transformer)
    assert pipe.get_active_adapters() == ["camera_arc", "pytorch_lora_weights"]
    assert state.weights == {"camera_arc": 0.5, "pytorch_lora_weights": 1.0}
    quiet = ours()
    assert apply_lora_options(cli_args("--lora", str(original), "--no-trigger-words"), quiet) == []
    assert quiet.lora_trigger_words == {"camera_arc": TRIGGER.strip()}
    assert apply_lora_options(cli_args(), quiet) == []


def test_with_trigger_words():
    assert with_trigger_words("a cat", []) == "a cat"
    assert with_trigger_words("a cat", ["arc-left ", " dolly"]) == "arc-left dolly a cat"
