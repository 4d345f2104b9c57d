"""``flex_attention`` calls, compiled once per shape and reused by every layer and step.

``flex_attention`` is only block-sparse (and only fast) when compiled: uncompiled, it materialises the full score
matrix and applies just the ``mask_mod``. Each entry point here is a small function of its own, compiled lazily
on first use with ``torch.compile(fn, dynamic=False)`` and kept in a module-level cache, so one compiled kernel
serves all layers and steps of a generation; a new shape (another resolution or frame count) compiles once more.
Dynamo keeps up to ``torch._dynamo.config.recompile_limit`` (8) shapes per function; beyond that it runs the
function uncompiled. That stays exact, because our ``BlockMask`` carries a ``mask_mod`` that reads the map (the
reference's has none, so its uncompiled flex is dense attention), but it materialises the full score matrix: at
video sizes it runs out of memory rather than returning a wrong result. On a GPU the kept blocks are full blocks,
so the compiled kernel never evaluates that ``mask_mod``.

Inside a region that is already being compiled (``transformer.compile()`` or ``torch.compile(transformer)``) the
plain function is called and the enclosing compilation fuses it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from kandinsky5.attention.nabla import NABLA_BLOCK_SIZE, flex_block_mask

# Tile sizes of the flex kernel for NABLA's 64-token blocks. torch's defaults (128 rows for 16-bit inputs) do not
# divide the block size and fail to compile ("Q and KV block size must be divisible by BLOCK_M and BLOCK_N").
NABLA_KERNEL_OPTIONS = {"BLOCK_M": NABLA_BLOCK_SIZE, "BLOCK_N": NABLA_BLOCK_SIZE}

_compiled: dict[Callable, Callable] = {}


def _block_sparse_flex(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: BlockMask, kernel_options: dict
) -> torch.Tensor:
    return flex_attention(query, key, value, block_mask=block_mask, kernel_options=kernel_options)


def _dense_flex(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return flex_attention(query, key, value)


def _compiled_version(fn: Callable) -> Callable:
    """``fn`` itself inside a region being compiled, else its cached ``torch.compile`` wrapper."""
    if torch.compiler.is_compiling():
        return fn
    compiled = _compiled.get(fn)
    if compiled is None:
        compiled = _compiled[fn] = torch.compile(fn, dynamic=False)
    return compiled


def uses_full_blocks(device: torch.device) -> bool:
    """Whether the ``BlockMask`` on ``device`` lists kept blocks as full blocks (the reference layout).

    CPU inductor in torch 2.13 fails to compile flex attention with full blocks (its C++ template references an
    undeclared ``kv_indices``), so on the CPU the same blocks are given as partial blocks with the map as mask.
    """
    return device.type != "cpu"


def flex_block_sparse_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_map: torch.Tensor
) -> torch.Tensor:
    """Attention restricted to the kept blocks of ``block_map``; tensors ``(batch, seq, heads, head_dim)``.

    ``block_map`` is boolean, broadcastable to ``(batch, heads, seq / 64, seq / 64)``.
    """
    if query.device.type == "cpu" and torch.compiler.is_compiling():
        # CPU inductor cannot lower flex attention whose mask reads a tensor computed in the same graph
        # (NoValidChoicesError in torch 2.13), so on the CPU the call leaves the enclosing graph (a graph break).
        return _flex_block_sparse_outside_graph(query, key, value, block_map)
    return flex_attention_on_block_mask(query, key, value, nabla_flex_block_mask(query, key, block_map))


def nabla_flex_block_mask(query: torch.Tensor, key: torch.Tensor, block_map: torch.Tensor) -> BlockMask:
    """The ``BlockMask`` of ``block_map`` for these query and key tensors (the layout their device needs)."""
    batch, q_len, heads, _ = query.shape
    shape = (batch, heads, q_len // NABLA_BLOCK_SIZE, key.shape[1] // NABLA_BLOCK_SIZE)
    return flex_block_mask(block_map.expand(shape), full_blocks=uses_full_blocks(query.device))


def flex_attention_on_block_mask(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: BlockMask
) -> torch.Tensor:
    """Compiled block-sparse ``flex_attention`` with a ready ``BlockMask`` of NABLA blocks (see
    :func:`nabla_flex_block_mask`); tensors ``(batch, seq, heads, head_dim)``."""
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    out = _compiled_version(_block_sparse_flex)(q, k, v, block_mask, NABLA_KERNEL_OPTIONS)
    return out.transpose(1, 2)


_flex_block_sparse_outside_graph = torch.compiler.disable(flex_block_sparse_attention)


def flex_dense_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Unmasked attention through compiled ``flex_attention``; tensors ``(batch, seq, heads, head_dim)``."""
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    return _compiled_version(_dense_flex)(q, k, v).transpose(1, 2)
