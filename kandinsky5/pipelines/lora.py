"""LoRA methods of the pipelines, with diffusers' names and semantics (``KandinskyLoraLoaderMixin``).

``load_lora_weights`` reads a LoRA file, folder or hub repository in diffusers' format, the original Kandinsky-5
repository's PEFT format or a trainer's (kohya / musubi-tuner, ComfyUI / ai-toolkit; see
:mod:`kandinsky5.loading.lora_formats`) and adds it to the transformer as a named adapter, unfused (see
:mod:`kandinsky5.runtime.lora` for how the branches run, fuse and stream). The new adapter becomes the only
active one, weight 1, as in diffusers; ``set_adapters`` mixes several.

Where we differ from diffusers, on purpose:

- ``unfuse_lora`` restores the weights exactly (a host copy of the fused-over weights is kept until then) and
  returns to the adapters' own weights; diffusers subtracts the delta again (not exact in floating point) and keeps
  the fuse's ``lora_scale`` multiplied into the adapters' scales afterwards.
- After ``fuse_lora(adapter_names=[...])`` of some active adapters, the other active ones still run unfused
  (PEFT runs none of them on a layer holding a fused adapter).
- Fusing into quantized weights is refused; unfused, a LoRA runs beside them.
- Adapter tensors compute in the layer's dtype (the compute dtype for quantized layers); PEFT upcasts bfloat16
  adapters to float32.
- ``lora_trigger_words``: the trigger words LoRA files carry in their metadata (the original repository's
  ``trigger``), which diffusers ignores. They are not added to prompts by the pipeline; the command line prepends
  them (``--no-trigger-words`` not), and :func:`with_trigger_words` does it in Python.

Any offloading is re-armed around a change of layers or weights, as ``fuse_qkv_projections`` does.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kandinsky5.runtime import lora as runtime

# the pipeline component that takes LoRAs (diffusers' ``_lora_loadable_modules``)
LORA_COMPONENT = "transformer"
# load_lora_weights keyword arguments that are passed on to the hub download
HUB_KWARGS = ("subfolder", "revision", "cache_dir", "token", "local_files_only")
# diffusers keyword arguments accepted and ignored (no meaning here)
IGNORED_KWARGS = ("low_cpu_mem_usage", "force_download", "proxies", "use_safetensors", "hotswap")


def with_trigger_words(prompt: str, words: Sequence[str]) -> str:
    """``prompt`` with the trigger words before it, each stripped and followed by a space (the original repository
    concatenates its trigger and the prompt; triggers usually end with their own separator)."""
    words = [w.strip() for w in words if w and w.strip()]
    return " ".join([*words, prompt]) if words else prompt


class LoraMixin:
    """LoRA adapters on ``self.transformer`` (diffusers' ``KandinskyLoraLoaderMixin`` API)."""

    _lora_loadable_modules = [LORA_COMPONENT]
    transformer_name = LORA_COMPONENT

    # ------------------------------------------------------------------ loading

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: str | Path | Mapping[str, Any],
        adapter_name: str | None = None,
        weight_name: str | None = None,
        **kwargs,
    ) -> None:
        """Load a LoRA into the transformer as adapter ``adapter_name`` (default ``default_<n>``), unfused, and make
        it the only active adapter (weight 1).

        ``pretrained_model_name_or_path_or_dict``: a ``.safetensors`` file, a folder (``weight_name`` in it, else
        ``pytorch_lora_weights.safetensors``, ``lora.safetensors``, ``adapter_model.safetensors``,
        ``model.safetensors`` or its only ``.safetensors`` file), a hub repository id, or a state dict.
        ``kwargs``: ``adapter_config`` (a PEFT LoraConfig dict or JSON file, for the original repository's format;
        default the ``config_lora.json`` / ``adapter_config.json`` beside the weights), ``subfolder``,
        ``revision``, ``cache_dir``, ``token``, ``local_files_only``; diffusers' ``low_cpu_mem_usage`` and the
        like are accepted and ignored, ``hotswap=True`` is refused. A key that matches no layer of the transformer
        is a ``ValueError`` naming it; nothing is loaded then.
        """
        from kandinsky5.loading.lora_formats import load_lora

        if kwargs.get("hotswap"):
            raise ValueError("hotswap=True is not supported: delete_adapters() the old adapter and load the new one")
        unknown = sorted(set(kwargs) - set(HUB_KWARGS) - set(IGNORED_KWARGS) - {"adapter_config"})
        if unknown:
            raise TypeError(f"load_lora_weights() got unexpected keyword arguments {unknown}")
        transformer = self._lora_transformer()
        name = runtime.default_adapter_name(transformer) if adapter_name is None else adapter_name
        runtime.check_adapter_name(name, runtime.lora_state(transformer))
        hub = {k: kwargs[k] for k in HUB_KWARGS if kwargs.get(k) is not None}
        lora = load_lora(
            pretrained_model_name_or_path_or_dict,
            weight_name=weight_name,
            adapter_config=kwargs.get("adapter_config"),
            layer_names=runtime.reference_linear_names(transformer),
            **hub,
        )
        runtime.check_adapter(transformer, lora)
        self._change_lora_layers(lambda: runtime.add_adapter(transformer, name, lora))

    @classmethod
    def lora_state_dict(
        cls, pretrained_model_name_or_path_or_dict: str | Path | Mapping[str, Any], weight_name=None, **kwargs
    ):
        """The LoRA file's tensors as stored (not converted), as diffusers' ``lora_state_dict``; with
        ``return_lora_metadata=True``, ``(tensors, metadata)``. Same locations as :meth:`load_lora_weights`."""
        from kandinsky5.loading.lora_formats import read_lora_file, resolve_lora_path

        return_metadata = kwargs.pop("return_lora_metadata", False)
        if isinstance(pretrained_model_name_or_path_or_dict, Mapping):
            tensors, metadata = dict(pretrained_model_name_or_path_or_dict), {}
        else:
            hub = {k: kwargs[k] for k in HUB_KWARGS if kwargs.get(k) is not None}
            path = resolve_lora_path(pretrained_model_name_or_path_or_dict, weight_name, **hub)
            tensors, metadata = read_lora_file(path)
        return (tensors, metadata) if return_metadata else tensors

    # ------------------------------------------------------------------ which adapters, how much

    def set_adapters(
        self,
        adapter_names: str | Sequence[str],
        adapter_weights: float | Sequence[float | None] | Mapping[str, float] | None = None,
    ) -> None:
        """Make ``adapter_names`` the active adapters, with ``adapter_weights`` (one number for all, one per
        adapter, ``None`` for 1.0, or diffusers' ``{"transformer": w}``)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if isinstance(adapter_weights, Mapping) or not isinstance(adapter_weights, Sequence):
            adapter_weights = [adapter_weights] * len(names)
        weights = list(adapter_weights)
        if len(weights) != len(names):
            raise ValueError(
                f"Length of adapter names {len(names)} is not equal to the length of their weights {len(weights)}"
            )
        weights = [_adapter_weight(w) for w in weights]
        runtime.set_adapters(self._lora_transformer(), names, weights)

    def get_active_adapters(self) -> list[str]:
        """The active adapters (``[]`` when none is loaded)."""
        state = runtime.lora_state(self._lora_transformer())
        return [] if state is None else list(state.active)

    def get_list_adapters(self) -> dict[str, list[str]]:
        """``{"transformer": [every loaded adapter]}`` (``{}`` when none is loaded), as diffusers."""
        state = runtime.lora_state(self._lora_transformer())
        return {} if state is None or not state.adapters else {LORA_COMPONENT: list(state.adapters)}

    def disable_lora(self) -> None:
        """Turn every adapter's branch off (the base model's output; fused adapters are unfused, exactly)."""
        transformer = self._lora_transformer()
        state = runtime.lora_state(transformer)
        if state is None:
            return  # nothing loaded: nothing to disable (as diffusers)
        if state.merged:
            self._change_lora_layers(lambda: runtime.set_enabled(transformer, False))
        else:
            runtime.set_enabled(transformer, False)

    def enable_lora(self) -> None:
        """Turn the active adapters' branches back on."""
        transformer = self._lora_transformer()
        if runtime.lora_state(transformer) is not None:
            runtime.set_enabled(transformer, True)

    def delete_adapters(self, adapter_names: str | Sequence[str]) -> None:
        """Remove adapters (unfused ones; see ``unfuse_lora``)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        transformer = self._lora_transformer()
        self._change_lora_layers(lambda: runtime.delete_adapters(transformer, names))

    def unload_lora_weights(self) -> None:
        """Remove every adapter: the transformer computes exactly as before loading (bit for bit), except that
        adapters fused with ``fuse_lora`` stay in the weights (diffusers' fuse-then-unload)."""
        transformer = self._lora_transformer()
        if runtime.lora_state(transformer) is not None:
            self._change_lora_layers(lambda: runtime.unload(transformer))

    # ------------------------------------------------------------------ fusing

    def fuse_lora(
        self,
        lora_scale: float = 1.0,
        adapter_names: Sequence[str] | None = None,
        *,
        components: Sequence[str] | None = None,
        safe_fusing: bool = False,
        **kwargs,
    ) -> None:
        """Add the adapters (``adapter_names``, default the active ones) into the transformer's weights, each at
        its weight times ``lora_scale``; their branches stop running. ``safe_fusing``: refuse (``ValueError``)
        when a fused weight would not be finite. A host copy of each fused-over weight is kept for
        :meth:`unfuse_lora` (exact). Quantized weights are refused. ``components``: diffusers' argument, only
        ``["transformer"]``."""
        self._check_components(components)
        scale = _adapter_weight(lora_scale, "lora_scale")
        names = None if adapter_names is None else list(adapter_names)
        transformer = self._lora_transformer()
        runtime.require_state(transformer)  # a clear error before any rebuild
        self._change_lora_layers(lambda: runtime.fuse(transformer, scale, names, safe=safe_fusing))

    def unfuse_lora(self, components: Sequence[str] | None = None, **kwargs) -> None:
        """Restore the weights from before ``fuse_lora`` exactly; the adapters run unfused again."""
        self._check_components(components)
        transformer = self._lora_transformer()
        state = runtime.lora_state(transformer)
        if state is not None and state.merged:
            self._change_lora_layers(lambda: runtime.unfuse(transformer))

    # ------------------------------------------------------------------ trigger words

    @property
    def lora_trigger_words(self) -> dict[str, str]:
        """Trigger words per loaded adapter, from its file's metadata (adapters without any are left out)."""
        state = runtime.lora_state(self._lora_transformer())
        if state is None:
            return {}
        return {name: adapter.trigger for name, adapter in state.adapters.items() if adapter.trigger}

    # ------------------------------------------------------------------ helpers

    def _lora_transformer(self):
        transformer = getattr(self, LORA_COMPONENT, None)
        if transformer is None:
            raise ValueError("this pipeline has no transformer to load LoRAs into")
        return transformer

    def _check_components(self, components: Sequence[str] | None) -> None:
        if components is not None and list(components) != [LORA_COMPONENT]:
            raise ValueError(f"LoRAs live in {self._lora_loadable_modules} only, got components={components!r}")

    def _change_lora_layers(self, change) -> None:
        """Run ``change`` (new branches, changed weights) with offloading re-armed around it, as layout transforms
        are (``_rebuild_layers``); block streaming then streams the new branch tensors with their blocks."""
        rebuild = getattr(self, "_rebuild_layers", None)
        if rebuild is not None and getattr(self, "_offload_plan", None) is not None:
            rebuild(change)
        else:
            change()


def _adapter_weight(value: Any, what: str = "adapter weight") -> float:
    if value is None:
        return 1.0
    if isinstance(value, Mapping):
        extra = sorted(set(value) - {LORA_COMPONENT})
        if extra:
            raise ValueError(f"{what} dicts may name only {LORA_COMPONENT!r}, got {sorted(value)}")
        value = value.get(LORA_COMPONENT, 1.0)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return float(value)
