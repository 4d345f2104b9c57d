"""The one place where attention is computed.

Every attention call of the package goes through :func:`attention`, so a backend swap touches one place.
Tensors are laid out ``(batch, seq, heads, head_dim)`` as in the reference.
"""

from kandinsky5.attention.backends import (
    attention,
    attention_backend,
    available_backends,
    get_attention_backend,
    set_attention_backend,
)

__all__ = [
    "attention",
    "attention_backend",
    "available_backends",
    "get_attention_backend",
    "set_attention_backend",
]
