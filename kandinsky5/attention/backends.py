"""Attention backend registry.

Backends are chosen by name, in this order of precedence: the innermost :func:`attention_backend` context, the
model's ``set_attention_backend`` (applied as such a context around its forward), the environment variable
``KANDINSKY5_ATTN_BACKEND`` (read at call time, never at import), then ``"auto"``.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

logger = logging.getLogger(__name__)

ENV_VAR = "KANDINSKY5_ATTN_BACKEND"
DEFAULT_BACKEND = "auto"


@dataclass(frozen=True)
class Backend:
    name: str
    sdpa_kernels: tuple[SDPBackend, ...] | None  # None: let SDPA choose
    supports_mask: bool
    cuda_only: bool


_BACKENDS = {
    "auto": Backend("auto", None, True, False),
    "native": Backend("native", None, True, False),
    "_native_math": Backend("_native_math", (SDPBackend.MATH,), True, False),
    "_native_efficient": Backend("_native_efficient", (SDPBackend.EFFICIENT_ATTENTION,), True, True),
    "_native_flash": Backend("_native_flash", (SDPBackend.FLASH_ATTENTION,), False, True),
    "_native_cudnn": Backend("_native_cudnn", (SDPBackend.CUDNN_ATTENTION,), True, True),
}
_ALIASES = {
    "sdpa": "native",
    "math": "_native_math",
    "efficient": "_native_efficient",
    "flash": "_native_flash",
    "cudnn": "_native_cudnn",
}
# A masked call that the chosen kernel cannot serve goes to this one, with one warning.
_MASK_FALLBACK = "native"

_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("kandinsky5_attention_backend", default=None)
_warned: set[str] = set()


def _canonical(name: str) -> str:
    key = name.strip().lower() if name.strip().lower() in _ALIASES else name.strip()
    key = _ALIASES.get(key, key)
    if key not in _BACKENDS:
        raise ValueError(f"Unknown attention backend {name!r}; usable backends: {', '.join(available_backends())}")
    return key


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Names of the backends usable on ``device`` (default: CUDA if present, else CPU), aliases included."""
    if device is None:
        on_cuda = torch.cuda.is_available()
    else:
        on_cuda = torch.device(device).type == "cuda"
    names = [n for n, b in _BACKENDS.items() if on_cuda or not b.cuda_only]
    names += [a for a, n in _ALIASES.items() if n in names]
    return names


def validate_backend(name: str, device: torch.device | str | None = None) -> str:
    """Return the canonical name of ``name`` or raise a ValueError listing the usable backends."""
    key = _canonical(name)
    usable = available_backends(device)
    if key not in usable:
        raise ValueError(f"Attention backend {name!r} is not available here; usable backends: {', '.join(usable)}")
    return key


def set_attention_backend(name: str | None) -> None:
    """Set the process-wide default backend (``None`` restores the environment/auto default)."""
    _current.set(None if name is None else _canonical(name))


def get_attention_backend() -> str:
    name = _current.get()
    if name is not None:
        return name
    env = os.environ.get(ENV_VAR)
    return _canonical(env) if env else DEFAULT_BACKEND


@contextlib.contextmanager
def attention_backend(name: str | None) -> Iterator[None]:
    """Use backend ``name`` inside the block (``None``: leave the current choice)."""
    if name is None:
        yield
        return
    token = _current.set(_canonical(name))
    try:
        yield
    finally:
        _current.reset(token)


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


def _auto_kernels(device: torch.device) -> tuple[SDPBackend, ...] | None:
    # cuDNN attention is the fastest dense kernel on Hopper; SDPA falls back if it refuses the call.
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9:
        return (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)
    return None


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention on ``(batch, seq, heads, head_dim)`` tensors.

    ``mask`` is boolean, broadcastable to ``(batch, heads, q_len, kv_len)``, True where attention is allowed.
    """
    backend = _BACKENDS[get_attention_backend()]
    if backend.cuda_only and query.device.type != "cuda":
        raise ValueError(
            f"Attention backend {backend.name!r} needs a CUDA device; usable backends: "
            f"{', '.join(available_backends(query.device))}"
        )
    if mask is not None and not backend.supports_mask:
        _warn_once(f"Attention backend {backend.name!r} cannot take a mask; using {_MASK_FALLBACK!r} for masked calls")
        backend = _BACKENDS[_MASK_FALLBACK]
    kernels = _auto_kernels(query.device) if backend.name == "auto" else backend.sdpa_kernels
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    if kernels is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    else:
        with sdpa_kernel(list(kernels)):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2)
