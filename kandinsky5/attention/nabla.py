"""NABLA block-sparse attention: the block map and the token order it needs.

NABLA groups the visual tokens of each latent frame into square spatial tiles ("fractal" order), so that every
block of ``NABLA_BLOCK_SIZE`` consecutive tokens is one tile. A block map is estimated from block-averaged
queries and keys, binarised by cumulative softmax mass, and OR-ed with a sliding-window map.

The map is the whole of NABLA's semantics: the attention is exact softmax attention restricted to the kept
``64 x 64`` blocks. :func:`flex_block_mask` turns it into the ``BlockMask`` that ``flex_attention`` runs (the GPU
path), :func:`expand_block_mask` into the dense token mask that SDPA runs (the CPU path); both give the same
attention.

Latent grids whose height or width (in tokens, after patching) is not a multiple of ``FRACTAL_TILE`` are refused
with a ``ValueError`` (the pipeline checks this before sampling); padding would change what the reference computes.
"""

from __future__ import annotations

import math

import torch
from torch.nn.attention.flex_attention import BlockMask

# Tokens per side of a spatial tile; one tile of one frame is one attention block.
FRACTAL_TILE = 8
NABLA_BLOCK_SIZE = FRACTAL_TILE * FRACTAL_TILE


def check_fractal_grid(grid: tuple[int, int, int]) -> None:
    """Raise a ValueError unless the token grid ``(T, H, W)`` splits into whole ``FRACTAL_TILE`` tiles."""
    _, h, w = grid
    if h % FRACTAL_TILE or w % FRACTAL_TILE:
        raise ValueError(
            f"NABLA attention needs a latent token grid whose height and width are multiples of {FRACTAL_TILE}; "
            f"got {h} x {w} tokens"
        )


def to_fractal_order(x: torch.Tensor) -> torch.Tensor:
    """``(batch, T, H, W, *rest)`` -> ``(batch, T*H*W, *rest)`` with each 8x8 tile contiguous."""
    b, t, h, w, *rest = x.shape
    check_fractal_grid((t, h, w))
    x = x.reshape(b, t, h // FRACTAL_TILE, FRACTAL_TILE, w // FRACTAL_TILE, FRACTAL_TILE, *rest)
    x = x.permute(0, 1, 2, 4, 3, 5, *range(6, x.dim()))
    return x.reshape(b, t * h * w, *rest)


def from_fractal_order(x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """Inverse of :func:`to_fractal_order` for a latent token grid ``(T, H, W)``."""
    t, h, w = grid
    b, _, *rest = x.shape
    x = x.reshape(b, t, h // FRACTAL_TILE, w // FRACTAL_TILE, FRACTAL_TILE, FRACTAL_TILE, *rest)
    x = x.permute(0, 1, 2, 4, 3, 5, *range(6, x.dim()))
    return x.reshape(b, t, h, w, *rest)


def sliding_window_block_mask(
    frames: int, rows: int, cols: int, window_t: int, window_h: int, window_w: int, device=None
) -> torch.Tensor:
    """Boolean ``(N, N)`` map over the ``frames x rows x cols`` tile grid (tile index ``(t*rows + r)*cols + c``):
    True where two tiles are within half a window of each other along every axis."""

    def near(n: int, window: int) -> torch.Tensor:
        idx = torch.arange(n, device=device)
        return (idx[:, None] - idx[None, :]).abs() <= window // 2

    nt, nh, nw = near(frames, window_t), near(rows, window_h), near(cols, window_w)
    mask = nt[:, None, None, :, None, None] & nh[None, :, None, None, :, None] & nw[None, None, :, None, None, :]
    n = frames * rows * cols
    return mask.reshape(n, n)


def nabla_block_mask(
    query: torch.Tensor, key: torch.Tensor, window_mask: torch.Tensor, threshold: float
) -> torch.Tensor:
    """The NABLA block map, ``(batch, heads, blocks, blocks)`` boolean.

    ``query``/``key`` are ``(batch, seq, heads, head_dim)`` in fractal order. For each query block, the key blocks
    are kept in order of decreasing softmax weight of the block-averaged scores until they hold ``threshold`` of
    the mass (ties and order exactly as the reference: ascending sort, cumulative sum, ``>= 1 - threshold``).
    """
    b, s, h, d = query.shape
    if s % NABLA_BLOCK_SIZE or key.shape[1] != s:
        raise ValueError(
            f"NABLA attention needs equal query and key lengths that are multiples of {NABLA_BLOCK_SIZE}; "
            f"got {s} and {key.shape[1]}"
        )
    blocks = s // NABLA_BLOCK_SIZE
    q_mean = query.transpose(1, 2).reshape(b, h, blocks, NABLA_BLOCK_SIZE, d).mean(-2)
    k_mean = key.transpose(1, 2).reshape(b, h, blocks, NABLA_BLOCK_SIZE, d).mean(-2)
    weights = torch.softmax((q_mean @ k_mean.transpose(-2, -1)) / math.sqrt(d), dim=-1)
    sorted_weights, order = weights.sort(-1)
    keep_sorted = sorted_weights.cumsum(-1) >= 1 - threshold
    keep = torch.empty_like(keep_sorted).scatter_(-1, order, keep_sorted)
    return keep | window_mask.to(keep.device)


def expand_block_mask(block_mask: torch.Tensor, block_size: int = NABLA_BLOCK_SIZE) -> torch.Tensor:
    """Block map ``(..., nq, nk)`` -> token mask ``(..., nq*block, nk*block)``."""
    return block_mask.repeat_interleave(block_size, dim=-2).repeat_interleave(block_size, dim=-1)


def flex_block_mask(block_map: torch.Tensor, full_blocks: bool = True) -> BlockMask:
    """The ``flex_attention`` ``BlockMask`` of a block map ``(batch, heads, nq, nk)`` of ``NABLA_BLOCK_SIZE`` blocks.

    With ``full_blocks`` (the reference's layout, and the fast one on a GPU) every kept block is a full block, so
    the kernel never evaluates a mask inside it. Without, the kept blocks are partial blocks whose ``mask_mod``
    reads the map (CPU inductor in torch 2.13 cannot compile full blocks). Either way the ``mask_mod`` reads the
    block map, so even an uncompiled ``flex_attention`` (which ignores the block structure and applies only the
    ``mask_mod``) computes the same sparse attention, never dense attention.
    """
    batch, heads, q_blocks, kv_blocks = block_map.shape
    kept = block_map.to(torch.bool)
    counts = kept.sum(-1, dtype=torch.int32)
    # kept blocks first, in ascending key order (stable sort), then the rest; only the first ``counts`` are read
    indices = kept.to(torch.uint8).argsort(dim=-1, descending=True, stable=True).to(torch.int32)

    def mask_mod(b, h, q_idx, kv_idx):
        return kept[b, h, q_idx // NABLA_BLOCK_SIZE, kv_idx // NABLA_BLOCK_SIZE]

    seq_lengths = (q_blocks * NABLA_BLOCK_SIZE, kv_blocks * NABLA_BLOCK_SIZE)
    if full_blocks:
        return BlockMask.from_kv_blocks(
            torch.zeros_like(counts),
            indices,
            counts,
            indices,
            BLOCK_SIZE=NABLA_BLOCK_SIZE,
            mask_mod=mask_mod,
            seq_lengths=seq_lengths,
            compute_q_blocks=False,
        )
    return BlockMask.from_kv_blocks(
        counts, indices, BLOCK_SIZE=NABLA_BLOCK_SIZE, mask_mod=mask_mod, seq_lengths=seq_lengths, compute_q_blocks=False
    )
