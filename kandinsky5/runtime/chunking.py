"""Feed-forward in token chunks: a transform of the DiT applied from outside the model file.

Each block's feed-forward widens the tokens to ``ff_dim`` (Pro at 768x1280x121: 119,040 visual tokens of 16,384
hidden values, 3.9 GB in bfloat16, and GELU makes a second such tensor). :func:`enable_feed_forward_chunking`
sets :attr:`kandinsky5.models.dit.FeedForward.chunk_tokens` on every feed-forward of a model, so that it runs at most
that many tokens at a time and writes each chunk's output into one preallocated output. Every token's row goes
through the same products and sums as unchunked: the values are the same (a matrix multiply library may pick
another kernel for another number of rows, which changes the summation order at most). Nothing else changes: the
parameters, ``state_dict()``, fused projections, compilation (``torch.compile`` unrolls the loop over the chunks,
whose count a given shape fixes; changing the chunk size recompiles).

:func:`feed_forward_chunk_tokens` picks the chunk size from a memory budget (say, the free device memory less what
the rest of a step needs).
"""

from __future__ import annotations

from torch import nn

from kandinsky5.models.dit import FeedForward

# Tensors of a chunk's hidden size alive at once: the input layer's output and GELU's (not in-place) result. The
# output layer runs once the first is freed, and its output is ``dim / ff_dim`` of a hidden.
HIDDEN_COPIES = 2
# A chunk of at least this many tokens is rounded down to a multiple of it: GPU matrix-multiply tiles are 64 or 128
# rows, so only the last chunk fills a tile partly.
CHUNK_MULTIPLE = 64
# The smallest chunk returned, even when the budget holds less (one token's hidden is tiny; a budget below it means
# the step does not fit at all, which the caller learns from the allocator).
MIN_CHUNK_TOKENS = 1


def _check_chunk_tokens(chunk_tokens: int | None) -> int | None:
    if chunk_tokens is None:
        return None
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int):
        raise TypeError(f"chunk_tokens must be a positive int or None, got {chunk_tokens!r}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive int or None, got {chunk_tokens}")
    return chunk_tokens


def feed_forward_modules(model: nn.Module) -> list[FeedForward]:
    """The feed-forward layers of ``model`` (every text and visual block's), in module order."""
    return [module for module in model.modules() if isinstance(module, FeedForward)]


def enable_feed_forward_chunking(model: nn.Module, chunk_tokens: int | None) -> nn.Module:
    """Run every feed-forward of ``model`` in chunks of at most ``chunk_tokens`` tokens (``None``: unchunked), in
    place; returns ``model``. A sequence no longer than the chunk runs unchunked."""
    chunk_tokens = _check_chunk_tokens(chunk_tokens)
    layers = feed_forward_modules(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no feed-forward layers to chunk")
    for layer in layers:
        layer.chunk_tokens = chunk_tokens
    return model


def disable_feed_forward_chunking(model: nn.Module) -> nn.Module:
    """Undo :func:`enable_feed_forward_chunking` (nothing when it is off); returns ``model``."""
    for layer in feed_forward_modules(model):
        layer.chunk_tokens = None
    return model


def feed_forward_chunk_tokens(free_bytes: int, tokens: int, ff_dim: int, itemsize: int, batch: int = 1) -> int | None:
    """The largest chunk of tokens whose feed-forward hidden activations (``HIDDEN_COPIES`` tensors of ``batch x
    chunk x ff_dim`` elements of ``itemsize`` bytes) fit into ``free_bytes``, rounded down to a multiple of
    ``CHUNK_MULTIPLE`` when it is at least that, and never below ``MIN_CHUNK_TOKENS``; ``None`` when all ``tokens``
    fit at once (no chunking needed).

    ``tokens`` is the sequence length of one batch row (the visual tokens: latent frames x height / 16 x width / 16),
    ``itemsize`` the compute dtype's (2 for bfloat16).
    """
    for name, value in (("tokens", tokens), ("ff_dim", ff_dim), ("itemsize", itemsize), ("batch", batch)):
        if value < 1:
            raise ValueError(f"{name} must be positive, got {value}")
    per_token = HIDDEN_COPIES * batch * ff_dim * itemsize
    if tokens * per_token <= free_bytes:
        return None
    chunk = max(free_bytes, 0) // per_token
    if chunk >= CHUNK_MULTIPLE:
        chunk -= chunk % CHUNK_MULTIPLE
    return max(chunk, MIN_CHUNK_TOKENS)
