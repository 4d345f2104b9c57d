"""NABLA: our block map, window map and sparse attention against diffusers' nablaT_v2 / fast_sta_nabla.

Note on the oracle: diffusers' NABLA runs ``flex_attention`` uncompiled unless the model is compiled, and
uncompiled ``flex_attention`` ignores a BlockMask's block lists (it applies only the ``mask_mod``, here none), so
on a CPU the reference computes *dense* attention for NABLA checkpoints. Where a test needs the reference's sparse
output it therefore gives the reference's own BlockMask a ``mask_mod`` that reads the same blocks.
"""

import logging
import warnings

import pytest
import torch
from conftest import NABLA_ATTENTION, TINY_TRANSFORMER, randomize_
from diffusers import Kandinsky5T2VPipeline as RefPipeline
from diffusers import Kandinsky5Transformer3DModel as RefTransformer
from diffusers.models.transformers import transformer_kandinsky
from tolerances import ATTENTION_KERNEL, NABLA_FORWARD, SAME_KERNEL, assert_close, max_abs_diff
from torch._dynamo.utils import counters
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from kandinsky5.attention import attention, attention_backend
from kandinsky5.attention.flex import flex_block_sparse_attention
from kandinsky5.attention.nabla import (
    NABLA_BLOCK_SIZE,
    expand_block_mask,
    flex_block_mask,
    nabla_block_mask,
    sliding_window_block_mask,
    to_fractal_order,
)
from kandinsky5.models.dit import Kandinsky5Transformer3DModel
from kandinsky5.pipelines.base import Kandinsky5PipelineBase

# (frames, tile rows, tile cols, wT, wH, wW, P): tile grids and windows from dense to very sparse.
MAP_CASES = [
    (1, 2, 2, 3, 3, 3, 0.9),
    (2, 2, 3, 1, 1, 1, 0.5),
    (3, 2, 2, 11, 3, 3, 0.8),
    (4, 3, 2, 3, 1, 3, 0.9),
    (3, 3, 3, 1, 3, 1, 0.99),
    (5, 1, 4, 2, 2, 2, 0.2),
]
# 2 heads of 16: the tiny transformer's attention, so flex tests here and in test_compile share a compiled kernel
HEADS, HEAD_DIM = 2, 16
REFERENCE_NABLA = transformer_kandinsky.nablaT_v2
# q/k scale: makes the block-averaged softmax peaked enough that P decides which blocks are kept
QK_SCALE = 4.0


def random_qk(case, batch=2, seed=0):
    frames, rows, cols = case[:3]
    seq = frames * rows * cols * NABLA_BLOCK_SIZE
    gen = torch.Generator().manual_seed(seed)
    q = QK_SCALE * torch.randn(batch, seq, HEADS, HEAD_DIM, generator=gen)
    k = QK_SCALE * torch.randn(batch, seq, HEADS, HEAD_DIM, generator=gen)
    v = torch.randn(batch, seq, HEADS, HEAD_DIM, generator=gen)
    return q, k, v


def window(case):
    frames, rows, cols, wt, wh, ww, _ = case
    return sliding_window_block_mask(frames, rows, cols, wt, wh, ww)[None, None]


@pytest.mark.parametrize("case", MAP_CASES)
def test_window_map_equals_fast_sta_nabla(case):
    frames, rows, cols, wt, wh, ww, _ = case
    expected = RefPipeline.fast_sta_nabla(frames, rows, cols, wt, wh, ww, device="cpu")
    assert torch.equal(sliding_window_block_mask(frames, rows, cols, wt, wh, ww), expected)
    assert torch.equal(Kandinsky5PipelineBase.fast_sta_nabla(frames, rows, cols, wt, wh, ww, device="cpu"), expected)


@pytest.mark.parametrize("case", MAP_CASES)
def test_block_map_equals_nablaT_v2(case):
    q, k, _ = random_qk(case)
    sta = window(case)
    threshold = case[-1]
    reference = transformer_kandinsky.nablaT_v2(q, k, sta, thr=threshold)
    ours = nabla_block_mask(q, k, sta, threshold)
    assert torch.equal(ours, reference.to_dense().bool())
    # the map depends on q and k (it differs between heads and prompts) unless it keeps every block
    assert not (ours == ours[:1, :1]).all() or ours.all()
    # our BlockMask holds the same blocks, both layouts
    for full_blocks in (True, False):
        assert torch.equal(flex_block_mask(ours, full_blocks=full_blocks).to_dense().bool(), ours)
    block_mask = flex_block_mask(ours)
    counts, indices = block_mask.full_kv_num_blocks, block_mask.full_kv_indices
    assert torch.equal(counts, reference.full_kv_num_blocks)
    for row in range(counts.numel()):
        n = counts.flatten()[row]
        ours_row = indices.flatten(0, -2)[row, :n].sort().values
        assert torch.equal(ours_row, reference.full_kv_indices.flatten(0, -2)[row, :n].sort().values)


@pytest.mark.parametrize("case", MAP_CASES[:4])
def test_dense_masked_path_equals_sdpa_with_reference_mask(case):
    """CPU default: the block map expanded to a token mask, through SDPA."""
    q, k, v = random_qk(case)
    block_map = nabla_block_mask(q, k, window(case), case[-1])
    token_mask = expand_block_mask(transformer_kandinsky.nablaT_v2(q, k, window(case), thr=case[-1]).to_dense().bool())
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=token_mask
    ).transpose(1, 2)
    got = attention(q, k, v, block_map=block_map)
    assert_close(got, expected, SAME_KERNEL)  # the same kernel (SDPA with the same mask) on both sides
    dense = attention(q, k, v)
    assert (dense - expected).abs().max().item() > 1e-2 or block_map.all()  # the mask matters


# The flex tests share one shape (that of test_compile's tiny NABLA model: 3 frames x 2 x 2 tiles), so the suite
# compiles one block-sparse flex kernel (CPU inductor compiles take seconds).
FLEX_CASE = (3, 2, 2, 1, 3, 3, 0.3)


def test_flex_path_equals_dense_masked_path():
    """The GPU kernel (compiled flex_attention on a BlockMask), here compiled for the CPU."""
    case = FLEX_CASE
    q, k, v = random_qk(case, batch=1)
    block_map = nabla_block_mask(q, k, window(case), case[-1])
    expected = attention(q, k, v, block_map=block_map)
    with attention_backend("flex"):
        got = attention(q, k, v, block_map=block_map)
    assert_close(got, expected, ATTENTION_KERNEL)  # flex against SDPA with the expanded mask


def test_uncompiled_flex_with_our_block_mask_is_still_sparse():
    """Uncompiled flex_attention applies only the mask_mod: ours reads the map, so the result stays sparse."""
    case = MAP_CASES[1]
    q, k, v = random_qk(case, batch=1)
    block_map = nabla_block_mask(q, k, window(case), case[-1])
    expected = attention(q, k, v, block_map=block_map)
    logging.disable(logging.WARNING)  # torch warns (once per process) that uncompiled flex is unfused
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            got = flex_attention(
                *(t.transpose(1, 2) for t in (q, k, v)), block_mask=flex_block_mask(block_map, full_blocks=True)
            ).transpose(1, 2)
    finally:
        logging.disable(logging.NOTSET)
    assert_close(got, expected, ATTENTION_KERNEL)  # flex against SDPA with the expanded mask


def test_flex_compiled_once_for_all_layers_and_steps():
    """One compiled kernel per shape: new block maps and inputs (other layers, other steps) do not recompile."""
    case = FLEX_CASE
    q, k, v = random_qk(case, batch=1)
    flex_block_sparse_attention(q, k, v, nabla_block_mask(q, k, window(case), case[-1]))  # compiled (or cached)
    graphs = counters["stats"]["unique_graphs"]
    for seed in range(1, 4):
        q, k, v = random_qk(case, batch=1, seed=seed)
        flex_block_sparse_attention(q, k, v, nabla_block_mask(q, k, window(case), case[-1]))
    assert counters["stats"]["unique_graphs"] == graphs


def test_unaligned_sizes_raise_clear_errors():
    with pytest.raises(ValueError, match="multiples of 8"):
        to_fractal_order(torch.zeros(1, 2, 12, 16, 4))
    q = torch.zeros(1, 100, 2, 8)
    with pytest.raises(ValueError, match="multiples of 64"):
        nabla_block_mask(q, q, torch.ones(1, 1, 1, 1, dtype=torch.bool), 0.9)


def sparse_reference_nabla(q, k, sta, thr=0.9):
    """diffusers' nablaT_v2, its BlockMask given a mask_mod with the same blocks (see the module doc)."""
    reference = REFERENCE_NABLA(q, k, sta, thr)
    kept = reference.to_dense().bool()

    def mask_mod(b, h, q_idx, kv_idx):
        return kept[b, h, q_idx // NABLA_BLOCK_SIZE, kv_idx // NABLA_BLOCK_SIZE]

    return BlockMask.from_kv_blocks(
        reference.kv_num_blocks,
        reference.kv_indices,
        reference.full_kv_num_blocks,
        reference.full_kv_indices,
        BLOCK_SIZE=NABLA_BLOCK_SIZE,
        mask_mod=mask_mod,
    )


def test_transformer_with_sparse_window_equals_reference(monkeypatch):
    """A window and P that leave most blocks out (the checkpoint defaults cover these tiny grids entirely).

    Ours runs the CPU default (SDPA with the expanded mask); the flex kernel equals that path (tests above), and
    the model's flex path is run by tests/test_compile.py.
    """
    config = dict(TINY_TRANSFORMER, **dict(NABLA_ATTENTION, attention_wT=1, attention_P=0.3))
    ref = RefTransformer(**config).eval()
    randomize_(ref, seed=5)
    ours = Kandinsky5Transformer3DModel.from_config(dict(ref.config)).eval()
    ours.load_state_dict(ref.state_dict())
    grid = (3, 32, 32)  # latent grid; 3 frames x 2 x 2 tiles of 8x8 tokens after the 2x2 patch
    t, h, w = grid
    patched = (t, h // 2, w // 2)
    window_map = Kandinsky5PipelineBase.fast_sta_nabla(
        t,
        patched[1] // 8,
        patched[2] // 8,
        config["attention_wT"],
        config["attention_wH"],
        config["attention_wW"],
        "cpu",
    )
    sparse = {"sta_mask": window_map[None, None], "to_fractal": True, "P": config["attention_P"]}
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, t, h, w, ours.config.visual_input_dim, generator=gen)
    text = torch.randn(1, 5, ours.config.in_text_dim, generator=gen)
    pooled = torch.randn(1, ours.config.in_text_dim2, generator=gen)
    timestep = torch.tensor([900.0])
    monkeypatch.setattr(transformer_kandinsky, "nablaT_v2", sparse_reference_nabla)
    ref.set_attention_backend("flex")
    logging.disable(logging.WARNING)
    try:
        with torch.no_grad():
            pos = [torch.arange(n) for n in patched]
            expected = ref(x, text, timestep, pooled, pos, torch.arange(5), (1, 2, 2), sparse).sample
            got = ours(x, text, timestep, pooled, sparse_params=sparse, scale_factor=(1, 2, 2)).sample
            dense = ours(x, text, timestep, pooled, scale_factor=(1, 2, 2)).sample
    finally:
        logging.disable(logging.NOTSET)
        ref.set_attention_backend("native")
    # flex against SDPA with the expanded mask: other summation orders, then the bfloat16 rounding of the rotated
    # queries and keys (measured here: 2**-16 of the output's magnitude, 1/16 of the bound)
    assert_close(got, expected, NABLA_FORWARD)
    # A wrong block map is far beyond the bound: all blocks (dense) by 82x here; one block wrong in one head of
    # one layer was measured at over 20x.
    assert max_abs_diff(dense, expected) > 16 * NABLA_FORWARD.bound(expected)
