"""The pipeline class a checkpoint needs, read from its ``model_index.json``.

``Kandinsky5Pipeline.from_pretrained`` returns a text-to-video or an image-to-video pipeline, whichever the
checkpoint is. A specific class refuses a checkpoint of the other kind, naming the class to use.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import torch

from kandinsky5.loading.diffusers_format import MODEL_INDEX, CheckpointError, read_json, read_model_index
from kandinsky5.loading.hub import resolve_checkpoint

# model_index.json ``_class_name`` -> the module of our class of that name
PIPELINE_MODULES = {
    "Kandinsky5T2VPipeline": "kandinsky5.pipelines.t2v",
    "Kandinsky5I2VPipeline": "kandinsky5.pipelines.i2v",
}
AUTO_PIPELINE = "Kandinsky5Pipeline"


def checkpoint_class_name(root: Path) -> str | None:
    """The pipeline class named by ``root``'s ``model_index.json``."""
    return read_json(root / MODEL_INDEX).get("_class_name")


def check_checkpoint_class(root: Path, pipeline_class: type) -> None:
    """Raise ``CheckpointError`` unless ``pipeline_class`` runs the checkpoint at ``root``."""
    accepted = getattr(pipeline_class, "checkpoint_classes", ()) or (pipeline_class.__name__,)
    name = checkpoint_class_name(root)
    if name in accepted:
        return
    if name in PIPELINE_MODULES:
        raise CheckpointError(
            f"{root / MODEL_INDEX} describes a {name!r} checkpoint, which {pipeline_class.__name__} cannot run. "
            f"Load it with {name}.from_pretrained(...), or with {AUTO_PIPELINE}.from_pretrained(...), which picks "
            "the class from model_index.json."
        )
    read_model_index(root, accepted)  # raises, naming the checkpoint's class


def pipeline_class_for(root: Path) -> type:
    """Our pipeline class for the checkpoint at ``root``."""
    name = checkpoint_class_name(root)
    if name not in PIPELINE_MODULES:
        raise CheckpointError(
            f"{root / MODEL_INDEX} describes a {name!r} pipeline; {AUTO_PIPELINE} loads {', '.join(PIPELINE_MODULES)}"
        )
    return getattr(importlib.import_module(PIPELINE_MODULES[name]), name)


class Kandinsky5Pipeline:
    """Loads any Kandinsky 5.0 video checkpoint with the class its ``model_index.json`` names (as diffusers'
    ``AutoPipeline`` does): an image-to-video checkpoint gives a ``Kandinsky5I2VPipeline``."""

    def __init__(self, *args, **kwargs):
        raise TypeError(f"{AUTO_PIPELINE} is not instantiated; use {AUTO_PIPELINE}.from_pretrained(...)")

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        torch_dtype: torch.dtype | None = None,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        **kwargs,
    ):
        """A ``Kandinsky5T2VPipeline`` or ``Kandinsky5I2VPipeline``; the arguments of their ``from_pretrained``."""
        from kandinsky5.pipelines.base import Kandinsky5PipelineBase

        # components (``vae=...``) are the pipeline constructor's parameters; checked before any download
        components = set(inspect.signature(Kandinsky5PipelineBase.__init__).parameters) - {"self"}
        unknown = sorted(set(kwargs) - components)
        if unknown:
            raise TypeError(f"from_pretrained() got unexpected keyword arguments {unknown}")
        root = resolve_checkpoint(pretrained_model_name_or_path, revision, cache_dir, local_files_only, token)
        return pipeline_class_for(root).from_pretrained(root, torch_dtype=torch_dtype, **kwargs)
