"""The DiT's forward in named stages, and ``wrap_stage``: code outside the model running in place of the visual
blocks (a step cache skipping them, a sequence-parallel wrapper rearranging the tokens), float32 CPU."""

import dataclasses

import pytest
import torch
from conftest import TINY_TRANSFORMER, randomize_
from tolerances import BF16_FLIP, FORWARD_REORDER, assert_close

from kandinsky5.models.dit import VISUAL_BLOCKS, Kandinsky5Transformer3DModel, VisualBlocksInputs
from kandinsky5.models.forward_context import Branch, ForwardContext

GRID = (3, 8, 12)  # latent grid: 3 frames x 4 x 6 tokens after the 2x2 patch
TOKENS = 3 * 4 * 6


def tiny_model():
    model = Kandinsky5Transformer3DModel.from_config(TINY_TRANSFORMER).eval()
    randomize_(model, seed=5)
    return model


def model_inputs(model, batch=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, *GRID, model.config.visual_input_dim, generator=gen),
        encoder_hidden_states=torch.randn(batch, 5, model.config.in_text_dim, generator=gen),
        timestep=torch.linspace(900.0, 300.0, batch),
        pooled_projections=torch.randn(batch, model.config.in_text_dim2, generator=gen),
        scale_factor=(1, 2, 2),
    )


def run(model, **kwargs):
    with torch.no_grad():
        return model(**kwargs).sample


def count_block_calls(model) -> list:
    calls = []
    model.visual_transformer_blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def test_a_wrapper_sees_each_call_with_its_context():
    model = tiny_model()
    inputs = model_inputs(model, batch=2)
    expected = run(model, **inputs)
    seen = []

    def counting(run_stage, visual, stage_inputs, *, context):
        seen.append((tuple(visual.shape), stage_inputs.grid, context))
        assert isinstance(stage_inputs, VisualBlocksInputs)
        return run_stage(visual, stage_inputs)

    model.wrap_stage(VISUAL_BLOCKS, counting)
    context = ForwardContext(branches=(Branch.CONDITION, Branch.NEGATIVE), step=3, num_steps=10)
    assert torch.equal(run(model, **inputs, context=context), expected)  # a pass-through changes nothing
    run(model, **inputs)
    model_dim = model.config.model_dim
    assert seen == [((2, TOKENS, model_dim), (3, 4, 6), context), ((2, TOKENS, model_dim), (3, 4, 6), None)]


class ResidualCache:
    """A step cache in miniature: even steps run the blocks and keep each branch's residual, odd steps skip them
    and add it back (MagCache decides by the residual's magnitude; the seam is the same)."""

    def __init__(self):
        self.residuals: dict[Branch, torch.Tensor] = {}

    def __call__(self, run_stage, visual, stage_inputs, *, context):
        chunks = visual.chunk(len(context.branches))
        if context.step % 2:
            return torch.cat([chunk + self.residuals[b] for chunk, b in zip(chunks, context.branches, strict=True)])
        out = run_stage(visual, stage_inputs)
        for branch, chunk, out_chunk in zip(context.branches, chunks, out.chunk(len(chunks)), strict=True):
            self.residuals[branch] = out_chunk - chunk
        return out


def test_a_wrapper_can_skip_the_blocks_and_return_a_residual_per_branch():
    model = tiny_model()
    both = model_inputs(model, batch=2)
    negative_only = {k: v[1:] if isinstance(v, torch.Tensor) else v for k, v in both.items()}
    plain = run(model, **both)
    cache = ResidualCache()
    model.wrap_stage(VISUAL_BLOCKS, cache)
    calls = count_block_calls(model)

    batched = ForwardContext(branches=(Branch.CONDITION, Branch.NEGATIVE), step=0)
    assert torch.equal(run(model, **both, context=batched), plain)
    assert len(calls) == 1
    # the next step, the negative branch alone: its cached residual, no block runs
    skipped = run(model, **negative_only, context=ForwardContext(branches=(Branch.NEGATIVE,), step=1))
    assert len(calls) == 1
    # a skipped stage returns ``visual + (out - visual)``, not ``out``: two float32 roundings, after the last rotary
    # embedding (no bfloat16 rounding can flip), and a batch of one against two
    assert_close(skipped, plain[1:], FORWARD_REORDER)
    # the branches' residuals differ: one shared residual would be wrong
    assert (cache.residuals[Branch.CONDITION] - cache.residuals[Branch.NEGATIVE]).abs().max().item() > 1e-2


def test_removing_the_wrapper_restores_the_exact_output():
    model = tiny_model()
    inputs = model_inputs(model)
    expected = run(model, **inputs)
    handle = model.wrap_stage(VISUAL_BLOCKS, lambda run_stage, visual, stage_inputs, *, context: visual)
    skipped = run(model, **inputs)
    assert (skipped - expected).abs().max().item() > 1e-2
    handle.remove()
    assert torch.equal(run(model, **inputs), expected)


def test_a_wrapper_can_rearrange_the_token_sequence_and_restore_it():
    """What a sequence-parallel wrapper does around the blocks (shard, run, gather), as one reordering: the tokens
    and their RoPE rows are permuted before the blocks and put back after."""
    model = tiny_model()
    inputs = model_inputs(model)
    expected = run(model, **inputs)
    order = torch.randperm(TOKENS, generator=torch.Generator().manual_seed(1))

    def reorder(run_stage, visual, stage_inputs, *, context):
        moved = dataclasses.replace(stage_inputs, rope=stage_inputs.rope[:, order])
        out = run_stage(visual[:, order], moved)
        return torch.empty_like(out).index_copy_(1, order, out)

    model.wrap_stage(VISUAL_BLOCKS, reorder)
    # the same attention over reordered tokens sums in another order (float32), and the next block rounds its
    # rotated queries and keys to bfloat16
    assert_close(run(model, **inputs), expected, BF16_FLIP)


def test_wrappers_nest_the_last_outermost():
    model = tiny_model()
    log = []

    def named(name):
        def wrapper(run_stage, visual, stage_inputs, *, context):
            log.append(f"{name} in")
            out = run_stage(visual, stage_inputs)
            log.append(f"{name} out")
            return out

        return wrapper

    first = model.wrap_stage(VISUAL_BLOCKS, named("first"))
    model.wrap_stage(VISUAL_BLOCKS, named("second"))
    run(model, **model_inputs(model))
    assert log == ["second in", "first in", "first out", "second out"]
    first.remove()
    log.clear()
    run(model, **model_inputs(model))
    assert log == ["second in", "second out"]


def test_unknown_stage_is_refused():
    with pytest.raises(ValueError, match="visual_blocks"):
        tiny_model().wrap_stage("text_encoder", lambda *args, **kwargs: None)


def test_stages_compose_to_the_forward():
    """The named stages, called one by one, give the forward's output bit for bit."""
    model = tiny_model()
    inputs = model_inputs(model)
    expected = run(model, **inputs)
    with torch.no_grad():
        text = model.embed_text(inputs["encoder_hidden_states"])
        time_embed = model.embed_time(inputs["timestep"], inputs["pooled_projections"])
        visual, grid = model.embed_visual(inputs["hidden_states"], fractal=False)
        text = model.text_blocks(text, time_embed, None)
        rope = model.visual_rope(grid, inputs["scale_factor"], False, visual.device)
        visual = model.visual_blocks(visual, VisualBlocksInputs(text, time_embed, rope, None, None, grid))
        got = model.output_head(visual, time_embed, grid, fractal=False)
    assert torch.equal(got, expected)
