"""Feed-forward in token chunks (``enable_forward_chunking``) against the unchunked forward, float32 CPU.

A chunk's rows take the same products and sums as unchunked, but the matrix multiply library may pick another kernel
for another number of rows, which sums in another order (measured on a 2-core x86 CPU: up to 6.3 EPS of the
feed-forward's output; chunks of 1 and 2 rows differ, chunks of 7 or 64 mostly do not). So the feed-forward alone is
compared within ``FORWARD_REORDER`` (the summation order of the last linear layer), and a whole forward within
``BF16_FLIP`` (another shape of a matrix multiply: a last-bit difference may move a rotated query or key across a
bfloat16 rounding midpoint). Measured: the tiny forwards with chunks of 7 and 64 equal the unchunked ones bit for bit.
"""

import pytest
import torch
from conftest import NABLA_ATTENTION, randomize_
from test_transformer import make_pair, nabla_sparse_params, run_both
from tolerances import BF16_FLIP, FORWARD_REORDER, assert_close
from torch._dynamo.testing import CompileCounterWithBackend

from kandinsky5.models.dit import FeedForward, TextBlock, VisualBlock
from kandinsky5.runtime.chunking import (
    CHUNK_MULTIPLE,
    HIDDEN_COPIES,
    MIN_CHUNK_TOKENS,
    enable_feed_forward_chunking,
    feed_forward_chunk_tokens,
    feed_forward_modules,
)

GRID = (3, 16, 16)  # 3 x 8 x 8 = 192 visual tokens after the 2x2 patch; the text has 5
VISUAL_TOKENS = 192
CHUNKS = [2, 7, 64]  # 2 also chunks the text; 7 divides neither; 64 divides the visual tokens


def feed_forward(dim=32, ff_dim=48, seed=0):
    layer = FeedForward(dim, ff_dim)
    randomize_(layer, seed)
    return layer


@pytest.mark.parametrize("chunk", [1, 7, 64, 149, 150, 1000])
@pytest.mark.parametrize("leading", [(), (2,)])
def test_feed_forward_chunks_equal_unchunked(chunk, leading):
    layer = feed_forward()
    x = torch.randn(*leading, 150, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = layer(x)
        layer.chunk_tokens = chunk
        got = layer(x)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert_close(got, expected, FORWARD_REORDER)


def test_feed_forward_runs_each_chunk_once():
    """The hidden activation never holds more than a chunk of tokens, and every token goes through exactly once."""
    layer = feed_forward()
    rows = []
    layer.in_layer.register_forward_hook(lambda module, args, out: rows.append(tuple(out.shape)))
    layer.chunk_tokens = 7
    with torch.no_grad():
        layer(torch.randn(2, 30, 32))
    assert rows == [(2, 7, 48)] * 4 + [(2, 2, 48)]


def test_bfloat16_chunks_keep_the_dtype():
    layer = feed_forward().to(torch.bfloat16)
    x = torch.randn(1, 40, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = layer(x)
        layer.chunk_tokens = 16
        got = layer(x)
    assert got.dtype == torch.bfloat16
    # bfloat16 outputs of float32-accumulated sums: another kernel's order moves at most one rounding step
    assert (got.float() - expected.float()).abs().max() <= torch.finfo(torch.bfloat16).eps * expected.abs().max()


@pytest.mark.parametrize("chunk", CHUNKS)
def test_transformer_forward_chunked_equals_unchunked(chunk):
    ref, ours = make_pair()
    _, expected = run_both(ref, ours, GRID, batch=2, reference=False)
    ours.enable_forward_chunking(chunk)
    _, chunked = run_both(ref, ours, GRID, batch=2, reference=False)
    assert_close(chunked, expected, BF16_FLIP)
    ours.disable_forward_chunking()
    _, again = run_both(ref, ours, GRID, batch=2, reference=False)
    assert torch.equal(again, expected)


@pytest.mark.parametrize("chunk", [7, 64])
def test_nabla_forward_chunked_equals_unchunked(chunk):
    ref, ours = make_pair(**NABLA_ATTENTION)
    grid = (2, 16, 16)
    sparse = nabla_sparse_params(grid, NABLA_ATTENTION)
    _, expected = run_both(ref, ours, grid, sparse_params=sparse, reference=False)
    ours.enable_forward_chunking(chunk)
    _, chunked = run_both(ref, ours, grid, sparse_params=sparse, reference=False)
    assert_close(chunked, expected, BF16_FLIP)


def test_chunking_and_fused_projections_do_not_interact():
    ref, ours = make_pair()
    ours.fuse_qkv_projections()
    _, fused = run_both(ref, ours, GRID, reference=False)
    ours.enable_forward_chunking(7)
    _, both = run_both(ref, ours, GRID, reference=False)
    assert_close(both, fused, BF16_FLIP)
    # either transform undone leaves the other in place
    ours.unfuse_qkv_projections()
    assert all(layer.chunk_tokens == 7 for layer in feed_forward_modules(ours))
    ours.fuse_qkv_projections()
    ours.disable_forward_chunking()
    _, fused_again = run_both(ref, ours, GRID, reference=False)
    assert torch.equal(fused_again, fused)


def test_enable_sets_every_block_and_none_turns_it_off():
    _, ours = make_pair()
    layers = feed_forward_modules(ours)
    config = ours.config
    assert len(layers) == config.num_text_blocks + config.num_visual_blocks
    owners = [m for m in ours.modules() if isinstance(m, TextBlock | VisualBlock)]
    assert {id(block.feed_forward) for block in owners} == {id(layer) for layer in layers}
    state = {k: v.clone() for k, v in ours.state_dict().items()}
    ours.enable_forward_chunking(32)
    assert all(layer.chunk_tokens == 32 for layer in layers)
    assert ours.state_dict().keys() == state.keys()  # a setting, not a parameter or buffer
    ours.enable_forward_chunking(None)
    assert all(layer.chunk_tokens is None for layer in layers)
    ours.enable_forward_chunking(8)
    ours.disable_forward_chunking()
    assert all(layer.chunk_tokens is None for layer in layers)
    assert FeedForward.chunk_tokens is None  # set per layer, never on the class


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "64"])
def test_bad_chunk_sizes_are_refused(bad):
    _, ours = make_pair()
    with pytest.raises((TypeError, ValueError), match="chunk_tokens"):
        ours.enable_forward_chunking(bad)
    assert all(layer.chunk_tokens is None for layer in feed_forward_modules(ours))


def test_a_model_without_feed_forward_is_refused():
    with pytest.raises(ValueError, match="no feed-forward"):
        enable_feed_forward_chunking(torch.nn.Linear(2, 2), 8)


def test_compiled_blocks_chunk_like_eager():
    """Dynamo captures the chunk loop in one graph per block class (the ``eager`` backend: capture only, no code
    generation), and a new chunk size recompiles instead of running the old graph."""
    torch._dynamo.reset()
    try:
        ref, ours = make_pair()
        ours.enable_forward_chunking(64)
        _, eager = run_both(ref, ours, GRID, reference=False)
        counter = CompileCounterWithBackend("eager")
        ours.compile(backend=counter, fullgraph=True)
        _, compiled = run_both(ref, ours, GRID, reference=False)
        assert counter.frame_count == 2  # a text block and a visual block
        assert_close(compiled, eager, BF16_FLIP)
        ours.enable_forward_chunking(7)
        _, rechunked = run_both(ref, ours, GRID, reference=False)
        assert counter.frame_count == 4
        assert_close(rechunked, eager, BF16_FLIP)
    finally:
        torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------- chunk size


def test_no_chunking_when_everything_fits():
    hidden = HIDDEN_COPIES * 2 * 1000 * 48 * 4
    assert feed_forward_chunk_tokens(hidden, 1000, 48, 4, batch=2) is None
    assert feed_forward_chunk_tokens(hidden - 1, 1000, 48, 4, batch=2) is not None


def test_largest_chunk_that_fits():
    per_token = HIDDEN_COPIES * 48 * 2
    # below CHUNK_MULTIPLE tokens: exactly the largest that fits
    assert feed_forward_chunk_tokens(10 * per_token + per_token - 1, 1000, 48, 2) == 10
    # above: rounded down to a multiple of CHUNK_MULTIPLE
    chunk = feed_forward_chunk_tokens(300 * per_token, 1000, 48, 2)
    assert chunk == 256 and chunk % CHUNK_MULTIPLE == 0
    # the batch and the element size scale the budget a token needs
    assert feed_forward_chunk_tokens(300 * per_token, 1000, 48, 2, batch=2) == 128
    assert feed_forward_chunk_tokens(300 * per_token, 1000, 48, 4) == 128
    # never below the smallest chunk
    assert feed_forward_chunk_tokens(0, 1000, 48, 2) == MIN_CHUNK_TOKENS


def test_pro_at_768x1280x121():
    """The issue's case: Pro (ff_dim 16384) in bfloat16, 31 x 48 x 80 = 119,040 tokens, 3.9 GB per hidden."""
    tokens, ff_dim = 31 * 48 * 80, 16384
    assert tokens * ff_dim * 2 == 3_900_702_720
    gib = 1 << 30
    assert feed_forward_chunk_tokens(8 * gib, tokens, ff_dim, 2) is None
    chunk = feed_forward_chunk_tokens(1 * gib, tokens, ff_dim, 2)
    assert chunk == 16384  # 1 GiB / (2 x 16384 x 2 B) tokens
    assert HIDDEN_COPIES * chunk * ff_dim * 2 <= gib


@pytest.mark.parametrize("name", ["tokens", "ff_dim", "itemsize", "batch"])
def test_chunk_size_arguments_are_checked(name):
    arguments = dict(free_bytes=1 << 20, tokens=100, ff_dim=48, itemsize=2, batch=1)
    arguments[name] = 0
    with pytest.raises(ValueError, match=name):
        feed_forward_chunk_tokens(**arguments)
