"""The command line's LoRA options: ``--lora PATH[:SCALE]`` (repeatable) and ``--no-trigger-words``.

``PATH`` is a LoRA ``.safetensors`` file, a folder holding one, or a hub repository id (see
:mod:`kandinsky5.loading.lora_formats` for the formats); ``SCALE`` its weight (default 1). A path that exists is
taken whole (a colon in it is no scale). The trigger words the LoRA files carry in their metadata are put before
the prompt unless ``--no-trigger-words`` is given.

:func:`check_lora_options` runs before any model is loaded (one-line errors naming ``--lora``);
:func:`apply_lora_options` loads the adapters into the pipeline and returns the trigger words.
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass
from pathlib import Path

LORA_FLAG = "--lora"
NO_TRIGGER_WORDS_FLAG = "--no-trigger-words"
# an adapter name made of the file's name: letters, digits and underscores
_NOT_NAME = re.compile(r"[^0-9A-Za-z_]+")


@dataclass(frozen=True)
class LoraSpec:
    """One ``--lora``: where the LoRA is, its weight, and the adapter name it gets."""

    source: str
    scale: float
    adapter_name: str


def add_lora_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--lora PATH[:SCALE]`` (repeatable) and ``--no-trigger-words`` to ``parser``."""
    parser.add_argument(
        LORA_FLAG,
        action="append",
        default=[],
        metavar="PATH[:SCALE]",
        help="a LoRA adapter for the transformer: a .safetensors file, a folder or a hub id (diffusers, original "
        "Kandinsky-5 / PEFT, kohya / musubi-tuner or ComfyUI format), optionally with its weight (default 1); "
        "repeat to mix several",
    )
    parser.add_argument(
        NO_TRIGGER_WORDS_FLAG,
        action="store_true",
        help="do not put the LoRAs' trigger words (from their metadata) before the prompt",
    )


def parse_lora_spec(text: str) -> tuple[str, float]:
    """``PATH[:SCALE]`` -> ``(path, scale)``. A ``ValueError`` (without the flag's name) when the scale is not a
    finite number or the path is empty."""
    if Path(text).expanduser().exists():
        return text, 1.0
    path, colon, scale_text = text.rpartition(":")
    if not colon or "/" in scale_text or "\\" in scale_text:
        path, scale_text = text, ""
    if not path:
        raise ValueError(f"no path in {text!r}")
    if not scale_text:
        return path, 1.0
    try:
        scale = float(scale_text)
    except ValueError:
        raise ValueError(f"the scale {scale_text!r} of {text!r} is not a number") from None
    if not math.isfinite(scale):
        raise ValueError(f"the scale of {text!r} must be finite, got {scale_text!r}")
    return path, scale


def lora_specs(args) -> list[LoraSpec]:
    """The ``--lora`` options as :class:`LoraSpec`, with distinct adapter names made from the files' names."""
    specs, used = [], set()
    for text in getattr(args, "lora", None) or []:
        path, scale = parse_lora_spec(text)
        stem = Path(path.rstrip("/\\")).name.removesuffix(".safetensors")
        base = _NOT_NAME.sub("_", stem).strip("_") or "lora"
        name, count = base, 1
        while name in used:
            count += 1
            name = f"{base}_{count}"
        used.add(name)
        specs.append(LoraSpec(path, scale, name))
    return specs


def check_lora_options(args) -> None:
    """Before loading: each ``--lora`` has a numeric scale and names an existing file or folder (or looks like a
    hub id), a readable LoRA in a supported format. One-line ``UsageError`` naming ``--lora``."""
    from kandinsky5.cli.main import UsageError, one_line_message
    from kandinsky5.loading.hub import is_hub_id
    from kandinsky5.loading.lora_formats import (
        FORMAT_KOHYA,
        LoraFormatError,
        LoraNotFoundError,
        detect_format,
        read_lora_file,
        resolve_lora_path,
    )

    for text in getattr(args, "lora", None) or []:
        try:
            path, _ = parse_lora_spec(text)
        except ValueError as err:
            raise UsageError(f"{LORA_FLAG} {text}: {err}") from err
        local = Path(path).expanduser()
        if not local.exists():
            if is_hub_id(path) and not path.endswith(".safetensors"):
                continue  # downloaded when loading
            raise UsageError(f"{LORA_FLAG} {text}: no such file or folder: {path}")
        try:
            weights = resolve_lora_path(local)
            tensors, metadata = read_lora_file(weights)
            if detect_format(tensors) != FORMAT_KOHYA:  # kohya's names are resolved against the model
                from kandinsky5.loading.lora_formats import convert_lora

                convert_lora(tensors, metadata, source=str(weights))
        except (LoraFormatError, LoraNotFoundError, OSError) as err:
            raise UsageError(f"{LORA_FLAG} {text}: {one_line_message(err)}") from err


def apply_lora_options(args, pipe) -> list[str]:
    """Load every ``--lora`` into ``pipe`` (adapters named after the files), activate them all with their scales,
    and return the trigger words to put before the prompt (in ``--lora`` order; ``[]`` with
    ``--no-trigger-words``)."""
    specs = lora_specs(args)
    if not specs:
        return []
    for spec in specs:
        pipe.load_lora_weights(spec.source, adapter_name=spec.adapter_name)
    pipe.set_adapters([s.adapter_name for s in specs], [s.scale for s in specs])
    if getattr(args, "no_trigger_words", False):
        return []
    triggers = pipe.lora_trigger_words
    return [triggers[s.adapter_name] for s in specs if s.adapter_name in triggers]
