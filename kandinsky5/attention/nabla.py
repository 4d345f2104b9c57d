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
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.attention.flex_attention import BlockMask

# Tokens per side of a spatial tile; one tile of one frame is one attention block.
FRACTAL_TILE = 8
NABLA_BLOCK_SIZE = FRACTAL_TILE * FRACTAL_TILE


# The reference's ``sparse_params`` keys (diffusers' ``Kandinsky5T2VPipeline.get_sparse_params``).
REFERENCE_WINDOW_MASK = "sta_mask"
REFERENCE_THRESHOLD = "P"
REFERENCE_FRACTAL = "to_fractal"


@dataclass(frozen=True, eq=False)
class NablaParams:
    """What NABLA attention needs for one latent grid (the reference passes the same as a 10-key dict).

    ``window_mask``: the sliding-window block map, boolean, broadcastable to ``(batch, heads, blocks, blocks)``
    (the reference's ``sta_mask``: :func:`sliding_window_block_mask` with two leading singleton axes).
    ``threshold``: the softmax mass the kept blocks of each query block must hold (the reference's ``P``).
    ``fractal``: whether the visual tokens go through the attention in fractal order (``to_fractal``; the
    block map assumes it). ``visual_shape``: the latent token grid ``(T, H, W)`` the map was built for, if known.
    ``window``: the window sizes in tiles ``(wT, wH, wW)``, if known. The reference's remaining keys
    (``attention_type``, ``add_sta``, ``method``) select NABLA's only implemented variant and are kept for
    :meth:`to_reference` only.
    """

    window_mask: torch.Tensor
    threshold: float
    fractal: bool = True
    visual_shape: tuple[int, int, int] | None = None
    window: tuple[int, int, int] | None = None
    add_sta: bool | None = None
    method: str | None = None

    @classmethod
    def from_reference(cls, params: Mapping[str, Any]) -> NablaParams:
        """Read the reference's ``sparse_params`` dict; ``sta_mask`` and ``P`` are required."""
        missing = [k for k in (REFERENCE_WINDOW_MASK, REFERENCE_THRESHOLD) if params.get(k) is None]
        if missing:
            raise ValueError(f"NABLA sparse_params lack {missing}; got keys {sorted(params)}")
        shape = params.get("visual_shape")
        window = tuple(params.get(k) for k in ("wT", "wH", "wW"))
        return cls(
            window_mask=params[REFERENCE_WINDOW_MASK],
            threshold=params[REFERENCE_THRESHOLD],
            fractal=bool(params.get(REFERENCE_FRACTAL, False)),
            visual_shape=None if shape is None else tuple(shape),
            window=None if None in window else window,
            add_sta=params.get("add_sta"),
            method=params.get("method"),
        )

    def to_reference(self) -> dict[str, Any]:
        """The reference's ``sparse_params`` dict (the keys diffusers' pipeline builds)."""
        w_t, w_h, w_w = self.window or (None, None, None)
        return {
            REFERENCE_WINDOW_MASK: self.window_mask,
            "attention_type": "nabla",
            REFERENCE_FRACTAL: self.fractal,
            REFERENCE_THRESHOLD: self.threshold,
            "wT": w_t,
            "wW": w_w,
            "wH": w_h,
            "add_sta": self.add_sta,
            "visual_shape": self.visual_shape,
            "method": self.method,
        }


def as_nabla_params(params: NablaParams | Mapping[str, Any] | None) -> NablaParams | None:
    """``params`` as :class:`NablaParams` (a reference dict is converted; ``None`` stays ``None``)."""
    if params is None or isinstance(params, NablaParams):
        return params
    return NablaParams.from_reference(params)


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
