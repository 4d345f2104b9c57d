"""The memory plan (kandinsky5/runtime/memory_plan.py): measured anchors reproduced, exact parameter counts from meta
builds, the choice of mode at chosen free-memory levels, quantization's savings, the feed-forward chunking rule; the
image models' estimates (their DiT, the 2D VAE's traced counts, the editing model's vision tower)."""

import json
import math
import time
import weakref
from pathlib import Path

import pytest
import torch
from conftest import REFERENCE_DIR
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from kandinsky5.models.dit import TransformerConfig
from kandinsky5.runtime import memory_plan as mp
from kandinsky5.runtime.memory_plan import (
    ANCHOR_TOLERANCE,
    ANCHORS,
    DEFAULT_MARGIN,
    GIB,
    Mode,
    Phase,
    PipelineConfigs,
    PlanInputs,
    choose_mode,
    feed_forward_chunk_tokens,
    fits,
    plan_memory,
)
from kandinsky5.variants import get_variant

DOCS = Path(__file__).resolve().parents[1] / "docs" / "memory.md"
PRO_CHECKPOINT = REFERENCE_DIR / "checkpoint-pro-5s"


@pytest.fixture(scope="module")
def lite():
    return PipelineConfigs.for_variant(get_variant("lite-sft-5s"))


@pytest.fixture(scope="module")
def pro():
    return PipelineConfigs.for_variant(get_variant("pro-sft-5s"))


@pytest.fixture(scope="module")
def pro_plan(pro):
    return plan_memory(pro, PlanInputs(768, 1280, 121))


# ---------------------------------------------------------------------------------------------------- anchors


@pytest.mark.parametrize("anchor", ANCHORS, ids=lambda a: a.name)
def test_anchors_are_reproduced(anchor):
    estimate = mp.anchor_estimate(anchor) / GIB
    assert estimate == pytest.approx(anchor.measured_gib, rel=ANCHOR_TOLERANCE)


def test_the_docs_show_the_anchor_table_as_computed():
    assert mp.anchor_table() in DOCS.read_text()


# ---------------------------------------------------------------------------------------------------- weights


@pytest.mark.parametrize("name,billions", [("lite", 2.008), ("pro", 19.31)])
def test_transformer_parameter_counts_are_the_published_ones(name, billions, lite, pro):
    plan = plan_memory(lite if name == "lite" else pro, PlanInputs(512, 768, 121))
    transformer = plan.component(mp.TRANSFORMER)
    assert transformer.parameters / 1e9 == pytest.approx(billions, abs=0.005)
    # the float32 islands (time embedding, modulations) at 4 bytes, the rest at 2
    with torch.device("meta"):
        model = mp._meta_transformer(plan.configs.transformer)
    islands = sum(p.numel() for n, p in model.named_parameters() if model.keeps_fp32(n))
    assert 0 < islands < transformer.parameters
    assert transformer.bytes == 2 * transformer.parameters + 2 * islands
    # blocks: every block counted once, the resident part (embeddings, head) a few percent
    assert sum(g.count for g in transformer.groups) == (
        plan.configs.transformer["num_text_blocks"] + plan.configs.transformer["num_visual_blocks"]
    )
    assert 0 < transformer.resident_bytes < 0.05 * transformer.bytes


def test_qwen_is_built_on_meta_quickly_and_counted_exactly(pro):
    mp._meta_qwen(pro.text_encoder)  # the transformers import, once
    start = time.perf_counter()
    qwen = mp._meta_qwen(pro.text_encoder)
    assert time.perf_counter() - start < 5
    assert all(p.is_meta for p in qwen.parameters())
    weights = plan_memory(pro, PlanInputs(512, 768, 121)).component(mp.TEXT_ENCODER)
    # Qwen2.5-VL-7B from its config's arithmetic: embeddings and head, 28 decoder layers, final norm, vision tower
    c = pro.text_encoder
    h, i = c["hidden_size"], c["intermediate_size"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * i + 2 * h
    vision = sum(p.numel() for p in qwen.model.visual.parameters())
    assert weights.parameters == 2 * c["vocab_size"] * h + c["num_hidden_layers"] * layer + h + vision
    assert weights.bytes == 2 * weights.parameters + 2 * sum(b.numel() for b in qwen.buffers())  # + RoPE tables
    (group,) = weights.groups
    assert (group.count, group.block_bytes) == (28, 2 * layer)
    vision_buffers = sum(b.numel() for b in qwen.model.visual.buffers())
    assert weights.unused_bytes == 2 * (vision + vision_buffers + c["vocab_size"] * h)  # vision tower, LM head


def test_builtin_configs_equal_the_published_checkpoint(pro):
    """The configs built from the registry's facts give the same weights as the checkpoint-pro-5s files."""
    inputs = PlanInputs(512, 768, 121)
    from_files = plan_memory(PipelineConfigs.from_checkpoint(PRO_CHECKPOINT), inputs)
    builtin = plan_memory(pro, inputs)
    assert from_files.weights == builtin.weights
    assert from_files.modes == builtin.modes


def test_a_missing_config_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        PipelineConfigs.from_checkpoint(tmp_path)


# ---------------------------------------------------------------------------------------------------- modes


def test_modes_place_the_weights_as_the_mode_table_says(pro_plan):
    w = {c.name: c for c in pro_plan.weights}
    total = sum(c.bytes for c in w.values())
    resident = pro_plan.mode(Mode.RESIDENT)
    assert all(p.gpu_weights == total and p.host == 0 for p in resident.phases)
    model = pro_plan.mode(Mode.MODEL)
    assert model.phase(Phase.SAMPLING).gpu_weights == w[mp.TRANSFORMER].bytes
    assert model.phase(Phase.SAMPLING).host == total - w[mp.TRANSFORMER].bytes
    assert model.phase(Phase.TEXT).gpu_weights == w[mp.TEXT_ENCODER].bytes  # Qwen, the larger of the two
    blocks = pro_plan.mode(Mode.BLOCKS).phase(Phase.SAMPLING)
    dit = w[mp.TRANSFORMER]
    slots = pro_plan.inputs.blocks_on_gpu + pro_plan.inputs.prefetch
    assert blocks.gpu_weights == dit.resident_bytes + slots * sum(g.block_bytes for g in dit.groups)
    pinned = dit.blocks_bytes + w[mp.TEXT_ENCODER].blocks_bytes  # both streamed networks' blocks, all along
    assert all(p.host_pinned == pinned for p in pro_plan.mode(Mode.BLOCKS).phases)
    text = pro_plan.mode(Mode.BLOCKS).phase(Phase.TEXT)
    qwen = w[mp.TEXT_ENCODER]
    assert text.gpu_weights == qwen.bytes - qwen.blocks_bytes - qwen.unused_bytes + slots * qwen.groups[0].block_bytes
    sequential = pro_plan.mode(Mode.SEQUENTIAL)
    assert sequential.phase(Phase.SAMPLING).gpu_weights == dit.layer_bytes < blocks.gpu_weights
    assert all(p.host == total for p in sequential.phases)
    # activations do not depend on the mode
    for phase in Phase:
        assert len({pro_plan.mode(m).phase(phase).gpu_activations for m in Mode}) == 1


@pytest.mark.parametrize(
    "free_gib,mode,fit",
    [(200, Mode.RESIDENT, True), (60, Mode.MODEL, True), (24, Mode.BLOCKS, True), (4, Mode.SEQUENTIAL, False)],
)
def test_choose_mode_picks_the_fastest_that_fits(pro_plan, free_gib, mode, fit):
    choice = choose_mode(pro_plan, free_gib * GIB)
    assert (choice.mode, choice.fits) == (mode, fit)
    assert choice.reason.startswith(f"offload: {mode.offload} (") and "\n" not in choice.reason
    if fit:
        assert fits(choice.needed_bytes, free_gib * GIB)
        faster = [m for m in mp.MODES[: mp.MODES.index(mode)]]
        for other in faster:  # none of the faster modes fits, even with tiles and chunks
            assert not mp._best_attempt(pro_plan, other, free_gib * GIB, DEFAULT_MARGIN)[1]
    else:
        assert "may not fit" in choice.reason


def test_choose_mode_at_the_edges_of_each_mode(pro_plan):
    """At a mode's need (with the margin) it is chosen; below the least it can need (tiled decode, the smallest
    feed-forward chunks), a slower one is."""
    tiled = pro_plan.replace(vae_tiling=True)  # what automatic tiling decodes with when memory is short
    least = tiled.replace(ff_chunk_tokens=64)
    for mode in mp.MODES[:-1]:
        need = tiled.mode(mode).peak_gpu * (1 + DEFAULT_MARGIN)
        assert choose_mode(pro_plan, math.ceil(need)).mode is mode
        below = choose_mode(pro_plan, math.floor(least.mode(mode).peak_gpu * (1 + DEFAULT_MARGIN)) - 1).mode
        assert mp.MODES.index(below) > mp.MODES.index(mode), (mode, below)


def test_the_reason_names_what_does_not_fit(pro_plan):
    reason = choose_mode(pro_plan, 24 * GIB).reason
    assert reason.startswith("offload: blocks (the transformer's 40.4 GiB of weights and its activations need ")
    assert "more than 24.0 GiB free allows with a 10% margin; blocks needs 13.3 GiB" in reason
    assert choose_mode(pro_plan, 200 * GIB).reason.startswith("offload: none (everything fits: ")


def test_auto_tiling_is_what_lets_a_mode_fit(pro_plan):
    """Pro at 768x1280 decodes untiled in 54.6 GiB: on an 80 GiB GPU everything fits only with tiles."""
    assert not fits(pro_plan.mode(Mode.RESIDENT).peak_gpu, 80 * GIB)
    choice = choose_mode(pro_plan, 80 * GIB)
    assert (choice.mode, choice.vae_tiling) == (Mode.RESIDENT, True) and "the VAE decodes in tiles" in choice.reason
    forced_off = pro_plan.replace(vae_tiling=False)
    assert choose_mode(forced_off, 80 * GIB).mode is not Mode.RESIDENT


# ---------------------------------------------------------------------------------------------------- quantization


def _linear_weights(model, names):
    return [model.get_submodule(name).weight.shape for name in names]


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_quantized_transformer_saves_the_expected_bytes(pro, mode):
    from kandinsky5.runtime.quantization import transformer_layers

    inputs = PlanInputs(768, 1280, 121)
    plain, quantized = plan_memory(pro, inputs), plan_memory(pro, PlanInputs(768, 1280, 121, quantize_transformer=mode))
    model = mp._meta_transformer(pro.transformer)
    shapes = _linear_weights(model, transformer_layers(model))
    row_bytes = {"int8": 4 + 1, "fp8": 4}[mode]  # float32 scale (and int8 zero point) per output row
    saved = sum(math.prod(s) * (2 - 1) - row_bytes * s[0] for s in shapes)
    assert plain.component(mp.TRANSFORMER).bytes - quantized.component(mp.TRANSFORMER).bytes == saved
    for m in (Mode.RESIDENT, Mode.MODEL):
        assert plain.mode(m).phase(Phase.SAMPLING).gpu - quantized.mode(m).phase(Phase.SAMPLING).gpu == saved
    # block streaming moves quantized blocks at their stored size
    slots = inputs.blocks_on_gpu + inputs.prefetch
    block_saving = sum(
        p.block_bytes - q.block_bytes
        for p, q in zip(plain.component(mp.TRANSFORMER).groups, quantized.component(mp.TRANSFORMER).groups, strict=True)
    )
    plain_blocks, quantized_blocks = (x.mode(Mode.BLOCKS).phase(Phase.SAMPLING).gpu for x in (plain, quantized))
    assert plain_blocks - quantized_blocks == slots * block_saving > 0
    assert quantized.sampling == plain.sampling  # activations stay in the compute dtype


def test_quantized_text_encoder_saves_the_expected_bytes(pro):
    from kandinsky5.runtime.quantization import NF4_BLOCKSIZE, text_encoder_layers

    inputs = PlanInputs(512, 768, 121)
    plain = plan_memory(pro, inputs)
    qwen = mp._meta_qwen(pro.text_encoder)
    shapes = _linear_weights(qwen, text_encoder_layers(qwen))
    for mode, per_weight, per_row in (("int8", 1, 5), ("nf4", 0.5, 0)):
        quantized = plan_memory(pro, PlanInputs(512, 768, 121, quantize_text_encoder=mode))
        saved = plain.component(mp.TEXT_ENCODER).bytes - quantized.component(mp.TEXT_ENCODER).bytes
        expected = sum(math.prod(s) * (2 - per_weight) - per_row * s[0] for s in shapes)
        if mode == "nf4":  # 8-bit absmax per block of 64, float32 scales of those per 256 blocks
            blocks = [math.ceil(math.prod(s) / NF4_BLOCKSIZE) for s in shapes]
            expected -= sum(b + 4 * math.ceil(b / 256) for b in blocks)
        assert saved == expected
        assert plain.mode(Mode.MODEL).phase(Phase.TEXT).gpu - quantized.mode(Mode.MODEL).phase(Phase.TEXT).gpu == saved
        # 4-bit bitsandbytes layers cannot stream: block mode moves the quantized encoder whole
        text = quantized.mode(Mode.BLOCKS).phase(Phase.TEXT)
        whole = quantized.component(mp.TEXT_ENCODER).bytes
        assert (text.gpu_weights == whole) == (mode == "nf4")


# ---------------------------------------------------------------------------------------------------- activations


def test_feed_forward_hidden_term(pro_plan):
    """Pro at 768x1280x121: 119,040 tokens; the hidden activation is 3.9 GB per copy (the issue's figure), two
    copies; chunked, two copies of chunk x ff_dim."""
    s = pro_plan.sampling
    assert s.tokens == 31 * 48 * 80 == 119_040
    assert s.hidden == 2 * 119_040 * 16384 * 2 and s.hidden / 2 == pytest.approx(3.9e9, rel=0.01)
    chunked = pro_plan.replace(ff_chunk_tokens=4096).sampling
    assert chunked.hidden == 2 * 4096 * 16384 * 2
    u = 119_040 * 4096 * 2
    assert s.feed_forward_stage - chunked.feed_forward_stage == s.hidden - chunked.hidden - u  # + the output buffer
    assert chunked.attention_stage == s.attention_stage
    # batched guidance doubles the call's rows
    assert pro_plan.replace(batched_guidance=True).sampling.hidden == 2 * s.hidden


def test_feed_forward_chunk_tokens_rule(pro_plan):
    sampling = pro_plan.mode(Mode.BLOCKS).phase(Phase.SAMPLING)
    plenty = math.ceil(sampling.gpu * (1 + DEFAULT_MARGIN))
    assert feed_forward_chunk_tokens(pro_plan, plenty, Mode.BLOCKS) is None  # fits unchunked
    floor = pro_plan.replace(ff_chunk_tokens=64).mode(Mode.BLOCKS).phase(Phase.SAMPLING).gpu
    assert floor < sampling.gpu  # chunking lowers the peak, down to the attention stage
    between = math.floor((floor + sampling.gpu) / 2 * (1 + DEFAULT_MARGIN))
    chunk = feed_forward_chunk_tokens(pro_plan, between, Mode.BLOCKS)
    assert chunk is not None and chunk % 64 == 0 and chunk < pro_plan.sampling.tokens
    assert fits(pro_plan.replace(ff_chunk_tokens=chunk).mode(Mode.BLOCKS).phase(Phase.SAMPLING).gpu, between)
    # the largest such chunk: a chunk 64 tokens larger no longer fits
    larger = pro_plan.replace(ff_chunk_tokens=chunk + 64).mode(Mode.BLOCKS).phase(Phase.SAMPLING).gpu
    assert not fits(larger, between)
    # below what any chunk reaches (the attention stage is the limit), no chunk is offered
    assert feed_forward_chunk_tokens(pro_plan, math.floor(floor * 0.95), Mode.BLOCKS) is None
    # and choose_mode uses it when that is what makes a mode fit
    choice = choose_mode(pro_plan, between)
    assert (choice.mode, choice.ff_chunk_tokens) == (Mode.BLOCKS, chunk)
    assert f"feed-forward in chunks of {chunk} tokens" in choice.reason


def test_decode_reuses_the_vae_estimate():
    """The untiled decode of 121 frames at 512x768: one 17-frame chunk's estimate (vae_tiling) plus the decoded
    chunks kept for blending (16/12 of the video)."""
    from kandinsky5.runtime.vae_tiling import estimate_decode_peak_bytes

    config = get_variant("lite-sft-5s")
    vae = PipelineConfigs.for_variant(config).vae
    video = 3 * 121 * 512 * 768 * 2
    untiled = mp.decode_activations(vae, 31, 64, 96, 1, torch.bfloat16, tiled=False)
    assert untiled == estimate_decode_peak_bytes(17, 512, 768, 128, 2) + video * 16 // 12
    tiled = mp.decode_activations(vae, 31, 64, 96, 1, torch.bfloat16, tiled=True)
    assert tiled == estimate_decode_peak_bytes(17, 256, 256, 128, 2) + video * 16 // 12


def test_inputs_are_checked():
    with pytest.raises(ValueError, match="quantize_transformer"):
        PlanInputs(512, 768, 121, quantize_transformer="fp4")
    with pytest.raises(ValueError, match="height"):
        PlanInputs(0, 768, 121)


def test_format_gib():
    assert mp.format_gib(40.4 * GIB) == "40.4 GiB"
    assert mp.format_gib(0.456 * GIB) == "0.46 GiB"


# ---------------------------------------------------------------------------------------------------- image models


@pytest.fixture(scope="module")
def t2i():
    return PipelineConfigs.for_variant(get_variant("lite-t2i-sft"))


@pytest.fixture(scope="module")
def edit():
    return PipelineConfigs.for_variant(get_variant("lite-edit-sft"))


@pytest.fixture(scope="module")
def t2i_plan(t2i):
    return plan_memory(t2i, PlanInputs(1024, 1024, 1))


@pytest.fixture(scope="module")
def edit_plan(edit):
    return plan_memory(edit, PlanInputs(1024, 1024, 1, max_sequence_length=1024))


def test_image_configs_are_the_image_models(t2i, edit):
    for configs, edits in ((t2i, False), (edit, True)):
        assert configs.makes_images and configs.edits is edits
        assert configs.transformer["visual_cond"] is edits
        assert configs.vae["_class_name"] == "AutoencoderKL"
    c = TransformerConfig.from_dict(t2i.transformer)
    assert (c.model_dim, c.ff_dim, c.time_dim, c.num_text_blocks, c.num_visual_blocks) == (2560, 10240, 512, 2, 50)
    assert (c.head_dim, c.model_dim // c.head_dim, c.attention_type) == (128, 20, "regular")
    assert mp.vae_compression(t2i.vae) == (8, 1)
    # the video models' configs are no image model's
    lite = PipelineConfigs.for_variant(get_variant("lite-sft-5s"))
    assert not lite.makes_images and not lite.edits


def test_image_dit_weights_are_its_parameters_in_bf16(t2i_plan, t2i):
    """The DiT's bytes are its parameter count (a meta build of Kandinsky5Transformer3DModel) at 2 bytes, plus 2
    more in the float32 islands; the VAE is the 2D one."""
    from kandinsky5.models.dit import Kandinsky5Transformer3DModel
    from kandinsky5.models.vae2d import AutoencoderKL2D

    with torch.device("meta"):
        model = Kandinsky5Transformer3DModel.from_config(t2i.transformer)
    parameters = sum(p.numel() for p in model.parameters())
    islands = sum(p.numel() for n, p in model.named_parameters() if model.keeps_fp32(n))
    dit = t2i_plan.component(mp.TRANSFORMER)
    assert dit.parameters == parameters and parameters / 1e9 == pytest.approx(6.02, abs=0.01)
    assert dit.bytes == 2 * parameters + 2 * islands
    assert 2 * parameters < dit.bytes < 2.25 * parameters  # the islands (modulations): about a tenth
    assert sum(g.count for g in dit.groups) == 2 + 50
    vae = mp._meta_vae(t2i.vae, torch.bfloat16, image=True)
    assert isinstance(vae, AutoencoderKL2D)
    assert t2i_plan.component(mp.VAE).bytes == 2 * sum(p.numel() for p in vae.parameters())


def test_image_activations(t2i_plan, edit_plan):
    """One frame of 64 x 64 tokens at 1024x1024; the 2D VAE's decode; the editing model's encode and vision tower."""
    assert t2i_plan.sampling.tokens == edit_plan.sampling.tokens == 64 * 64
    u = 4096 * 2560 * 2
    assert t2i_plan.sampling.hidden == 2 * 4096 * 10240 * 2
    assert t2i_plan.sampling.feed_forward_stage == 4 * u + t2i_plan.sampling.hidden
    assert t2i_plan.decode == int(6 * 1024 * 1024 * 128 * 2 * mp.VAE_WORKSPACE_FACTOR) + 3 * 1024 * 1024 * 2
    assert t2i_plan.encode == t2i_plan.vision == 0
    assert 0 < edit_plan.encode < edit_plan.decode < 3 * GIB
    assert 0 < edit_plan.vision < 0.5 * GIB
    # Qwen on 54 + 1024 tokens with the vision tower's activations beside them, more than text-to-image's 40 + 512
    assert t2i_plan.text[mp.TEXT_ENCODER] < edit_plan.text[mp.TEXT_ENCODER] - edit_plan.vision
    # other trained sizes: fewer tokens; the 2D VAE tiles only when told, in sample_size (1024) tiles
    wide = t2i_plan.replace(height=640, width=1408)
    assert wide.sampling.tokens == 40 * 88
    assert wide.replace(vae_tiling=True).decode < wide.decode
    assert t2i_plan.replace(vae_tiling=True).decode == t2i_plan.decode  # one tile
    with pytest.raises(ValueError, match="num_frames must be 1"):
        t2i_plan.replace(num_frames=5)


class LiveBytes(TorchDispatchMode):
    """The peak bytes of the storages that operations under it create and keep alive."""

    def __init__(self):
        super().__init__()
        self.sizes, self.refs, self.now, self.peak = {}, {}, 0, 0

    def _release(self, key):
        self.refs[key] -= 1
        if not self.refs[key]:
            self.now -= self.sizes.pop(key)
            del self.refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage()._cdata for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            key = tensor.untyped_storage()._cdata
            if key not in self.sizes:
                if key in inputs:  # a view of a tensor made outside
                    continue
                self.sizes[key], self.refs[key] = tensor.untyped_storage().nbytes(), 0
                self.now += self.sizes[key]
                self.peak = max(self.peak, self.now)
            self.refs[key] += 1
            weakref.finalize(tensor, self._release, key)
        return out


def test_image_vae_counts_are_a_trace_of_our_vae(t2i):
    """IMAGE_DECODE_TENSORS and IMAGE_ENCODE_TENSORS: the peak live tensors of our AutoencoderKL2D (official config,
    meta device), in full-resolution tensors of block_out_channels[0] channels."""
    vae = mp._meta_vae(t2i.vae, torch.bfloat16, image=True)
    unit = 256 * 256 * 128 * 2
    for run, tensors, shape in (
        (vae.decode, mp.IMAGE_DECODE_TENSORS, (1, 16, 32, 32)),
        (vae.encode, mp.IMAGE_ENCODE_TENSORS, (1, 3, 256, 256)),
    ):
        given = torch.empty(shape, device="meta", dtype=torch.bfloat16)
        with torch.no_grad(), LiveBytes() as live:
            run(given)
        assert live.peak == tensors * unit


def test_image_modes_in_order_and_the_choice(t2i_plan, edit_plan):
    """Each slower mode needs less at its peak; choose_mode picks from resident down as free memory shrinks (no
    automatic tiles for the 2D VAE)."""
    for plan in (t2i_plan, edit_plan):
        peaks = [plan.mode(mode).peak_gpu for mode in mp.MODES]
        assert peaks[0] > peaks[1] > peaks[2] and peaks[0] > peaks[3]
        assert peaks[1] < 17 * GIB < peaks[0] < 32 * GIB  # the text encoder alone, then the whole pipeline
        for free_gib, mode in ((40, Mode.RESIDENT), (24, Mode.MODEL), (12, Mode.BLOCKS), (1, Mode.SEQUENTIAL)):
            choice = choose_mode(plan, free_gib * GIB)
            assert choice.mode is mode and choice.vae_tiling is None, (free_gib, choice.reason)
            assert "tiles" not in choice.reason


def test_the_editing_models_vision_tower_is_resident_in_block_mode(t2i_plan, edit_plan, edit):
    qwen = mp._meta_qwen(edit.text_encoder)
    vision = 2 * sum(t.numel() for t in [*qwen.model.visual.parameters(), *qwen.model.visual.buffers()])
    head = 2 * qwen.lm_head.weight.numel()
    plain, editing = t2i_plan.component(mp.TEXT_ENCODER), edit_plan.component(mp.TEXT_ENCODER)
    assert plain.bytes == editing.bytes
    assert (plain.unused_bytes, editing.unused_bytes) == (vision + head, head)
    assert editing.resident_bytes - plain.resident_bytes == vision
    text = [p.mode(Mode.BLOCKS).phase(Phase.TEXT) for p in (t2i_plan, edit_plan)]
    assert text[1].gpu_weights - text[0].gpu_weights == vision
    streamed = mp.Placement.STREAMED
    assert plain.host_bytes(streamed) - editing.host_bytes(streamed) == vision  # not left on the host
    # model offload moves the whole encoder either way
    assert {p.mode(Mode.MODEL).phase(Phase.TEXT).gpu_weights for p in (t2i_plan, edit_plan)} == {plain.bytes}


def test_image_configs_from_a_checkpoint_folder(tmp_path, t2i):
    """A checkpoint's config files (vae/config.json naming AutoencoderKL) give the built-in configs' plan."""
    for name in mp.COMPONENTS:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(getattr(t2i, name)))
    from_files = PipelineConfigs.from_checkpoint(tmp_path)
    assert from_files.makes_images and not from_files.edits
    inputs = PlanInputs(1024, 1024, 1)
    assert plan_memory(from_files, inputs).modes == plan_memory(t2i, inputs).modes
