"""``torch.compile`` for the DiT: regional compilation of its repeated blocks.

A model lists the class names of its repeated blocks in ``_repeated_blocks``. Each such block is compiled in place
with ``nn.Module.compile`` (parameter names and ``state_dict`` keys stay as they are). Dynamo treats a block's
parameters as graph inputs, so all blocks of one class share one compiled graph: compiling the Lite DiT costs two
graphs (a text block and a visual block), not 34, and a new step or layer never recompiles. A new input shape
(another resolution, frame count or prompt length) compiles once more; ``dynamic=None`` lets Dynamo make the
second such shape dynamic.

With the default inductor backend, ``emulate_precision_casts`` is switched on (``EXACT_CAST_OPTIONS``): the
reference rounds rotated queries and keys to bfloat16 even in float32 runs, and inductor would otherwise fuse that
round trip away (float32 outputs then differ from eager by about 1e-3). Pass
``options={"emulate_precision_casts": False}`` to drop it; in bfloat16 runs the round trip is a no-op anyway.

Nothing is compiled unless asked: eager is the default. Compiling the whole model with ``torch.compile(model)``
also works (one graph, longer to compile; pass the option above yourself for float32 exactness).
"""

from __future__ import annotations

from typing import Any

from torch import nn

# Inductor options that keep eager's dtype round trips (see the module doc).
EXACT_CAST_OPTIONS = {"emulate_precision_casts": True}
INDUCTOR = "inductor"


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The submodules of ``model`` whose class name is in ``model._repeated_blocks``, in module order."""
    names = set(getattr(model, "_repeated_blocks", ()))
    return [module for module in model.modules() if type(module).__name__ in names]


def compile_repeated_blocks(
    model: nn.Module, mode: str | None = None, dynamic: bool | None = None, fullgraph: bool = False, **kwargs
) -> nn.Module:
    """Compile every repeated block of ``model`` in place with ``torch.compile`` and return ``model``.

    ``mode``, ``dynamic``, ``fullgraph`` and ``kwargs`` (``backend=``, ``options=``) go to ``torch.compile``.
    """
    blocks = repeated_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} declares no repeated blocks (_repeated_blocks) to compile")
    compile_kwargs = inductor_exact_casts(mode, dynamic, kwargs)
    for block in blocks:
        block.compile(dynamic=dynamic, fullgraph=fullgraph, **compile_kwargs)
    return model


def inductor_exact_casts(mode: str | None, dynamic: bool | None, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``torch.compile`` keyword arguments (``mode`` included) with ``EXACT_CAST_OPTIONS`` added for inductor.

    ``torch.compile`` takes ``mode`` or ``options``, not both, so a mode is expanded into its inductor options.
    """
    kwargs = dict(kwargs)
    backend = kwargs.get("backend", INDUCTOR)
    if backend != INDUCTOR:
        return dict(kwargs, mode=mode)
    user_options = kwargs.pop("options", None)
    if mode is not None and user_options is not None:
        raise ValueError("Either mode or options can be given to compile(), not both")
    import torch._inductor

    mode_options = torch._inductor.list_mode_options(mode, dynamic) if mode not in (None, "default") else {}
    return dict(kwargs, options={**mode_options, **EXACT_CAST_OPTIONS, **(user_options or {})})
