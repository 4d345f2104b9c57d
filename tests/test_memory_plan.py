"""The memory plan (kandinsky5/runtime/memory_plan.py): measured anchors reproduced, exact parameter counts from meta
builds, the choice of mode at chosen free-memory levels, quantization's savings, the feed-forward chunking rule."""

import math
import time
from pathlib import Path

import pytest
import torch
from conftest import REFERENCE_DIR

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
