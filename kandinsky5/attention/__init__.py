"""The one place where attention is computed.

Every attention call of the DiT goes through :func:`attention`, so a backend swap touches one place.
Tensors are laid out ``(batch, seq, heads, head_dim)`` as in the reference. See :mod:`kandinsky5.attention.backends`
for the backends and their precedence, :mod:`kandinsky5.attention.nabla` for NABLA's block maps and
:mod:`kandinsky5.attention.flex` for the compiled ``flex_attention`` kernel.
"""

from kandinsky5.attention.backends import (
    ENV_VAR,
    attention,
    attention_backend,
    available_backends,
    get_attention_backend,
    set_attention_backend,
)

__all__ = [
    "ENV_VAR",
    "attention",
    "attention_backend",
    "available_backends",
    "get_attention_backend",
    "set_attention_backend",
]
