"""Attention backend registry and the one attention entry point.

Backends (the reference's names, with short aliases in brackets):

- ``auto``: the default. cuDNN first on Hopper or newer GPUs, else SDPA's own choice (the CPU too).
- ``native`` (``sdpa``): ``F.scaled_dot_product_attention``, SDPA picks the kernel.
- ``_native_math`` (``math``): SDPA's math kernel, the plain and slow one.
- ``_native_efficient`` (``efficient``): SDPA's memory-efficient kernel (CUDA).
- ``_native_flash`` (``flash``): SDPA's FlashAttention kernel (CUDA, 16-bit inputs, no mask).
- ``_native_cudnn`` (``cudnn``): SDPA's cuDNN kernel (CUDA).
- ``flex``: compiled ``flex_attention`` for unmasked and NABLA calls (see :mod:`kandinsky5.attention.flex`).

Which backend runs, in order of precedence: the model's own ``set_attention_backend``; the innermost
:func:`attention_backend` context; the process default set by :func:`set_attention_backend`; the environment
variable ``KANDINSKY5_ATTN_BACKEND`` (read at call time, never at import); ``"auto"``.

An unknown name, or one whose kernel this machine lacks, raises a ``ValueError`` listing the usable names. A call
the chosen kernel cannot serve (a mask for flash, float32 for flash or cuDNN, a token mask for flex) runs with the
``auto`` choice instead, with one warning per backend and reason; it is never silently computed differently.

NABLA calls (``block_map=``) run compiled ``flex_attention`` on a GPU whatever the dense backend (a dense mask of
a 5-second video would not fit in memory); on the CPU they run SDPA with the block map expanded to a token mask,
unless ``flex`` is chosen. Both compute the same attention.

The choice lives in module globals, not context variables: ``torch.compile`` guards on globals (a new choice
recompiles) but cannot trace ``ContextVar.get``. It is therefore process-wide, not per thread.

Ulysses sequence parallelism also meets the attention here. Its visual-blocks wrapper
(:mod:`kandinsky5.runtime.parallel.ulysses`) runs the blocks on this rank's shard of the tokens inside
:func:`sequence_exchange`, which makes its exchange the current one for the stage's duration (a module global, for
the reason above). A call flagged ``sequence_parallel=True`` (the visual self-attention; the cross-attention's keys
come from the replicated text and need none) then trades its query, key and value from sequence shards to head
shards (an all-to-all), attends over the whole sequence for this rank's heads, computes NABLA's block map there
(``sparse=``: per head, from the whole sequence's queries and keys, as a single process does) and trades the output
back. Outside such a stage the flag does nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from typing import Protocol

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from kandinsky5.attention.flex import flex_block_sparse_attention, flex_dense_attention
from kandinsky5.attention.nabla import NABLA_BLOCK_SIZE, NablaParams, expand_block_mask, nabla_block_mask

logger = logging.getLogger(__name__)

ENV_VAR = "KANDINSKY5_ATTN_BACKEND"
DEFAULT_BACKEND = "auto"
# cuDNN attention beats FlashAttention from Hopper (compute capability 9.x) on (shared/reference/README.md).
CUDNN_FIRST_MIN_CAPABILITY = 9


@dataclass(frozen=True)
class Backend:
    name: str
    sdpa_kernel: SDPBackend | None  # the one SDPA kernel this backend pins; None: not a pinned SDPA kernel
    needs_cuda: bool
    description: str
    # torch.backends.cuda.can_use_*_attention for a pinned CUDA kernel: whether it can run a given call
    can_use: Callable[[torch.backends.cuda.SDPAParams], bool] | None = None


_BACKENDS = {
    b.name: b
    for b in (
        Backend("auto", None, False, "cuDNN first on Hopper GPUs, else SDPA's choice"),
        Backend("native", None, False, "SDPA's choice"),
        Backend("_native_math", SDPBackend.MATH, False, "SDPA math kernel"),
        Backend(
            "_native_efficient",
            SDPBackend.EFFICIENT_ATTENTION,
            True,
            "SDPA memory-efficient kernel",
            torch.backends.cuda.can_use_efficient_attention,
        ),
        Backend(
            "_native_flash",
            SDPBackend.FLASH_ATTENTION,
            True,
            "SDPA FlashAttention kernel",
            torch.backends.cuda.can_use_flash_attention,
        ),
        Backend(
            "_native_cudnn",
            SDPBackend.CUDNN_ATTENTION,
            True,
            "SDPA cuDNN kernel",
            torch.backends.cuda.can_use_cudnn_attention,
        ),
        Backend("flex", None, False, "compiled flex_attention"),
    )
}
_ALIASES = {
    "sdpa": "native",
    "math": "_native_math",
    "efficient": "_native_efficient",
    "flash": "_native_flash",
    "cudnn": "_native_cudnn",
}
# The backend a call goes to when the chosen one cannot serve it.
FALLBACK_BACKEND = "auto"

# Process-wide default (set_attention_backend) and the innermost attention_backend context; see the module doc.
_process_default: str | None = None
_context_backend: str | None = None
_warned: set[str] = set()


class SequenceExchange(Protocol):
    """A sequence-parallel exchange (:class:`kandinsky5.runtime.parallel.ulysses.UlyssesExchange`):
    ``to_heads`` turns this rank's tokens of all heads, ``(batch, seq / n, heads, head_dim)`` each, into all tokens
    of this rank's heads, ``(batch, seq, heads / n, head_dim)``; ``to_sequence`` is its inverse on the output."""

    def to_heads(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]: ...

    def to_sequence(self, tensor: torch.Tensor) -> torch.Tensor: ...


# The exchange of the sequence-parallel stage running now (see the module doc), or None.
_sequence_exchange: SequenceExchange | None = None


def canonical_backend_name(name: str) -> str:
    """The registry name of ``name`` (aliases resolved, case and spaces ignored); ValueError if unknown."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _BACKENDS:
        raise ValueError(f"Unknown attention backend {name!r}; usable backends: {', '.join(available_backends())}")
    return key


def _kernel_present(backend: Backend) -> bool:
    if backend.sdpa_kernel == SDPBackend.FLASH_ATTENTION:
        return torch.backends.cuda.is_flash_attention_available()
    if backend.sdpa_kernel == SDPBackend.CUDNN_ATTENTION:
        return torch.backends.cudnn.is_available()
    return True


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Names usable on ``device`` (default: this machine, i.e. CUDA when present), aliases included."""
    on_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    names = [n for n, b in _BACKENDS.items() if (on_cuda or not b.needs_cuda) and _kernel_present(b)]
    return names + [alias for alias, name in _ALIASES.items() if name in names]


def validate_backend(name: str, device: torch.device | str | None = None) -> str:
    """The canonical name of ``name``; ValueError listing the usable backends if unknown or not usable here."""
    key = canonical_backend_name(name)
    usable = available_backends(device)
    if key not in usable:
        where = "on this machine" if device is None else f"on device {torch.device(device)}"
        raise ValueError(f"Attention backend {name!r} is not available {where}; usable backends: {', '.join(usable)}")
    return key


def set_attention_backend(name: str | None) -> None:
    """Set the process-wide default backend (``None`` restores the environment variable / ``auto``)."""
    global _process_default
    _process_default = None if name is None else validate_backend(name)


def get_attention_backend() -> str:
    """The backend an attention call made now would use (before any per-call fallback)."""
    if _context_backend is not None:
        return _context_backend
    if _process_default is not None:
        return _process_default
    env = os.environ.get(ENV_VAR, "").strip()
    return validate_backend(env) if env else DEFAULT_BACKEND


@contextlib.contextmanager
def attention_backend(name: str | None) -> Iterator[None]:
    """Use backend ``name`` inside the block.

    ``None`` keeps the current choice but pins it for the block (the environment variable is read once, on entry),
    so that compiled regions inside see, and guard on, one concrete name.
    """
    global _context_backend
    previous = _context_backend
    _context_backend = get_attention_backend() if name is None else validate_backend(name)
    try:
        yield
    finally:
        _context_backend = previous


@contextlib.contextmanager
def sequence_exchange(exchange: SequenceExchange | None) -> Iterator[None]:
    """Inside the block, attention calls flagged ``sequence_parallel`` go through ``exchange`` (``None``: none)."""
    global _sequence_exchange
    previous = _sequence_exchange
    _sequence_exchange = exchange
    try:
        yield
    finally:
        _sequence_exchange = previous


def current_sequence_exchange() -> SequenceExchange | None:
    """The exchange :func:`sequence_exchange` made current, or ``None``."""
    return _sequence_exchange


@torch.compiler.disable
def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


@cache
def _cuda_capability_major(index: int | None) -> int:
    return torch.cuda.get_device_capability(index)[0]


def _auto_kernels(device: torch.device) -> list[SDPBackend] | None:
    """SDPA kernels in priority order for ``auto`` (None: SDPA's own order)."""
    if device.type == "cuda" and _cuda_capability_major(device.index) >= CUDNN_FIRST_MIN_CAPABILITY:
        return [
            SDPBackend.CUDNN_ATTENTION,
            SDPBackend.FLASH_ATTENTION,
            SDPBackend.EFFICIENT_ATTENTION,
            SDPBackend.MATH,
        ]
    return None


def _cannot_serve(backend: Backend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> str | None:
    """Why the pinned SDPA kernel of ``backend`` cannot run this call, or None if it can (or cannot be asked)."""
    if backend.can_use is None:
        return None
    if backend.sdpa_kernel == SDPBackend.FLASH_ATTENTION and mask is not None:
        return "an attention mask"
    if torch.compiler.is_compiling():
        return None  # the SDPA checks below run eagerly only
    if not backend.can_use(torch.backends.cuda.SDPAParams(q, k, v, mask, 0.0, False, False)):
        return f"this call ({q.dtype}, head_dim {q.shape[-1]}, mask {'yes' if mask is not None else 'no'})"
    return None


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, kernels: list[SDPBackend] | None) -> torch.Tensor:
    if kernels is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with sdpa_kernel(kernels, set_priority=True):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None = None,
    block_map: torch.Tensor | None = None,
    *,
    sparse: NablaParams | None = None,
    sequence_parallel: bool = False,
) -> torch.Tensor:
    """Scaled dot-product attention on ``(batch, seq, heads, head_dim)`` tensors, scale ``1/sqrt(head_dim)``.

    ``mask``: boolean, broadcastable to ``(batch, heads, q_len, kv_len)``, True where attention is allowed.
    ``block_map``: NABLA's boolean block map, broadcastable to ``(batch, heads, q_len / 64, kv_len / 64)``, True
    where a 64x64 block of query and key tokens attends (exclusive with ``mask``).
    ``sparse``: NABLA's parameters instead of a block map: the map is computed here from ``query`` and ``key``
    (:func:`~kandinsky5.attention.nabla.nabla_block_mask`), after any sequence exchange.
    ``sequence_parallel``: this is a self-attention over the tokens a sequence-parallel stage shards; inside
    :func:`sequence_exchange` the inputs are this rank's tokens and are exchanged for this rank's heads of all
    tokens (and the output back). Elsewhere it changes nothing.
    """
    exchange = _sequence_exchange if sequence_parallel else None
    if exchange is not None:
        query, key, value = exchange.to_heads(query, key, value)
    if sparse is not None:
        if block_map is not None:
            raise ValueError("attention() takes NABLA's parameters or a block map, not both")
        block_map = nabla_block_mask(query, key, sparse.window_mask, sparse.threshold)
    out = _attention(query, key, value, mask, block_map)
    return out if exchange is None else exchange.to_sequence(out)


def _attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    block_map: torch.Tensor | None,
) -> torch.Tensor:
    name = get_attention_backend()
    backend = _BACKENDS[name]
    device = query.device
    if backend.needs_cuda and device.type != "cuda":
        raise ValueError(
            f"Attention backend {name!r} needs a CUDA device, got {device}; usable backends: "
            f"{', '.join(available_backends(device))}"
        )
    if block_map is not None:
        if mask is not None:
            raise ValueError("attention() takes a token mask or a NABLA block map, not both")
        if name == "flex" or device.type == "cuda":
            return flex_block_sparse_attention(query, key, value, block_map)
        mask = expand_block_mask(block_map, NABLA_BLOCK_SIZE)

    if name == "flex":
        if mask is None:
            return flex_dense_attention(query, key, value)
        _warn_once(f"Attention backend 'flex' takes no token mask; masked calls run the {FALLBACK_BACKEND!r} backend")
        backend = _BACKENDS[FALLBACK_BACKEND]

    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    reason = _cannot_serve(backend, q, k, v, mask)
    if reason is not None:
        _warn_once(f"Attention backend {backend.name!r} cannot serve {reason}; using {FALLBACK_BACKEND!r} for it")
        backend = _BACKENDS[FALLBACK_BACKEND]
    if backend.name == "auto":
        kernels = _auto_kernels(device)
    else:
        kernels = None if backend.sdpa_kernel is None else [backend.sdpa_kernel]
    return _sdpa(q, k, v, mask, kernels).transpose(1, 2)
