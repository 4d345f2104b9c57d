"""The pipeline classes by the names checkpoints use (``model_index.json``'s ``_class_name``), in one place.

Only names and module paths live here, so any module (the variant registry, the package's lazy exports) may
import it without importing a pipeline, torch or the loaders.
"""

from __future__ import annotations

import importlib
from pathlib import Path

T2V_PIPELINE = "Kandinsky5T2VPipeline"
I2V_PIPELINE = "Kandinsky5I2VPipeline"
T2I_PIPELINE = "Kandinsky5T2IPipeline"
I2I_PIPELINE = "Kandinsky5I2IPipeline"
AUTO_PIPELINE = "Kandinsky5Pipeline"
# the classes a checkpoint can name -> the module of ours of that name
CHECKPOINT_PIPELINES = {
    T2V_PIPELINE: "kandinsky5.pipelines.t2v",
    I2V_PIPELINE: "kandinsky5.pipelines.i2v",
    T2I_PIPELINE: "kandinsky5.pipelines.t2i",
    I2I_PIPELINE: "kandinsky5.pipelines.i2i",
}
PIPELINE_MODULES = {**CHECKPOINT_PIPELINES, AUTO_PIPELINE: "kandinsky5.pipelines.auto"}
# the pipeline constructor's components, in diffusers' order
COMPONENT_NAMES = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")


def checkpoint_class_name(root: Path) -> str | None:
    """The pipeline class named by ``root``'s ``model_index.json``."""
    from kandinsky5.loading.diffusers_format import MODEL_INDEX, read_json

    return read_json(root / MODEL_INDEX).get("_class_name")


def check_checkpoint_class(root: Path, pipeline_class: type) -> None:
    """Raise ``CheckpointError`` unless ``pipeline_class`` runs the checkpoint at ``root``."""
    from kandinsky5.loading.diffusers_format import MODEL_INDEX, CheckpointError, read_model_index

    accepted = getattr(pipeline_class, "checkpoint_classes", ()) or (pipeline_class.__name__,)
    name = checkpoint_class_name(root)
    if name in accepted:
        return
    if name in CHECKPOINT_PIPELINES:
        raise CheckpointError(
            f"{root / MODEL_INDEX} describes a {name!r} checkpoint, which {pipeline_class.__name__} cannot run. "
            f"Load it with {name}.from_pretrained(...), or with {AUTO_PIPELINE}.from_pretrained(...), which picks "
            "the class from model_index.json."
        )
    read_model_index(root, accepted)  # raises, naming the checkpoint's class


def pipeline_class(name: str) -> type:
    """Our pipeline class called ``name`` (imported on first use)."""
    return getattr(importlib.import_module(PIPELINE_MODULES[name]), name)


def pipeline_class_for(root: Path) -> type:
    """Our pipeline class for the checkpoint at ``root``."""
    from kandinsky5.loading.diffusers_format import MODEL_INDEX, CheckpointError

    name = checkpoint_class_name(root)
    if name not in CHECKPOINT_PIPELINES:
        raise CheckpointError(
            f"{root / MODEL_INDEX} describes a {name!r} pipeline; {AUTO_PIPELINE} loads "
            f"{', '.join(CHECKPOINT_PIPELINES)}"
        )
    return pipeline_class(name)
