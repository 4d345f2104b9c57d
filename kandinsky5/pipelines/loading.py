"""Building a pipeline's components from a checkpoint folder in the Diffusers layout."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from kandinsky5.loading.diffusers_format import (
    CONFIG_FILE,
    CheckpointError,
    component_folder,
    load_component,
    read_json,
)
from kandinsky5.models import text_encoders as te
from kandinsky5.models.base import COMPUTE_DTYPES
from kandinsky5.pipelines.registry import COMPONENT_NAMES
from kandinsky5.sampling.scheduler import FlowMatchEulerDiscreteScheduler
from kandinsky5.variants import Variant

logger = logging.getLogger(__name__)

SCHEDULER_CONFIG = "scheduler_config.json"
TEXT_PARTS = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2")


def check_load_arguments(given: dict[str, Any], torch_dtype) -> None:
    """``from_pretrained``'s components and ``torch_dtype``, checked before anything is read."""
    unknown = sorted(set(given) - set(COMPONENT_NAMES))
    if unknown:
        raise TypeError(f"from_pretrained() got unexpected keyword arguments {unknown}")
    if torch_dtype is not None and torch_dtype not in COMPUTE_DTYPES:
        allowed = ", ".join(f"torch.{str(d).removeprefix('torch.')}" for d in COMPUTE_DTYPES)
        raise ValueError(f"`torch_dtype` must be None or one of {allowed}, got {torch_dtype!r}")


# the VAE classes by the name a checkpoint's vae/config.json gives (diffusers' classes)
VAE_CLASSES = {
    "AutoencoderKLHunyuanVideo": ("kandinsky5.models.vae", "AutoencoderKLHunyuanVideo"),  # the video models
    "AutoencoderKL": ("kandinsky5.models.vae2d", "AutoencoderKL2D"),  # the image models (FLUX's VAE)
}


def vae_class(folder: Path) -> type:
    """Our VAE class for the checkpoint's ``vae`` folder, by the ``_class_name`` of its config."""
    import importlib

    name = read_json(folder / CONFIG_FILE).get("_class_name", "AutoencoderKLHunyuanVideo")
    if name not in VAE_CLASSES:
        raise CheckpointError(f"{folder / CONFIG_FILE} names a {name!r} VAE; known: {', '.join(VAE_CLASSES)}")
    module, class_name = VAE_CLASSES[name]
    return getattr(importlib.import_module(module), class_name)


def load_components(
    root: Path,
    variant: Variant | None,
    torch_dtype: torch.dtype | None,
    given: dict[str, Any],
    image_processor: bool = False,
) -> dict[str, Any]:
    """Every component of the checkpoint at ``root`` that ``given`` does not already hold (and, with
    ``image_processor``, the Qwen image processor that shows the editing model's source image to the encoder)."""
    from kandinsky5.models.dit import Kandinsky5Transformer3DModel

    parts = dict(given)
    if "scheduler" not in parts:
        parts["scheduler"] = load_scheduler(root, variant)
    if "transformer" not in parts:
        folder = component_folder(root, "transformer")
        parts["transformer"] = load_component(Kandinsky5Transformer3DModel, folder, torch_dtype)
    if "vae" not in parts:
        folder = component_folder(root, "vae")
        parts["vae"] = load_component(vae_class(folder), folder, torch_dtype)
    for name in TEXT_PARTS:
        folder = component_folder(root, name)
        if name.startswith("text_encoder") and not (folder / CONFIG_FILE).is_file():
            raise CheckpointError(f"Missing file {folder / CONFIG_FILE}")
    if "tokenizer" not in parts or "tokenizer_2" not in parts:
        tokenizer, tokenizer_2 = te.load_tokenizers(root)
        parts.setdefault("tokenizer", tokenizer)
        parts.setdefault("tokenizer_2", tokenizer_2)
    if "text_encoder" not in parts or "text_encoder_2" not in parts:
        text_encoder, text_encoder_2 = te.load_text_encoders(root, torch_dtype)
        parts.setdefault("text_encoder", text_encoder)
        parts.setdefault("text_encoder_2", text_encoder_2)
    if image_processor and not hasattr(parts["tokenizer"], "image_processor"):
        configs = [root / "tokenizer" / name for name in te.IMAGE_PROCESSOR_CONFIGS]
        if not any(config.is_file() for config in configs):
            raise CheckpointError(
                f"Missing file {configs[0]} (the Qwen2.5-VL image processor of the editing model; or "
                f"{configs[1].name} holding it)"
            )
        parts["image_processor"] = te.load_image_processor(root)
    return parts


def load_scheduler(root: Path, variant: Variant | None) -> FlowMatchEulerDiscreteScheduler:
    """The checkpoint's scheduler; a known variant without a scheduler config gets its shift."""
    path = root / "scheduler" / SCHEDULER_CONFIG
    if variant is not None and not path.is_file():
        logger.info("No %s; using %s's shift", path, variant.short_name)
        return FlowMatchEulerDiscreteScheduler.from_config({"shift": variant.scheduler_shift})
    return FlowMatchEulerDiscreteScheduler.from_config(read_json(path))
