"""``Kandinsky5Pipeline.from_pretrained`` returns the pipeline the checkpoint's ``model_index.json`` names
(text-to-video, image-to-video, text-to-image or image editing). A specific class refuses a checkpoint of another
kind, naming the class to use (``kandinsky5/pipelines/registry.py``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from kandinsky5.loading.hub import resolve_checkpoint
from kandinsky5.pipelines.loading import check_load_arguments
from kandinsky5.pipelines.registry import AUTO_PIPELINE, pipeline_class_for


class Kandinsky5Pipeline:
    """Loads any Kandinsky 5.0 checkpoint with the class its ``model_index.json`` names (as diffusers'
    ``AutoPipeline`` does): an image-to-video checkpoint gives a ``Kandinsky5I2VPipeline``, a text-to-image one a
    ``Kandinsky5T2IPipeline``."""

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
        """The checkpoint's pipeline; the arguments of the pipelines' ``from_pretrained``."""
        check_load_arguments(kwargs, torch_dtype)  # before any download
        root = resolve_checkpoint(pretrained_model_name_or_path, revision, cache_dir, local_files_only, token)
        return pipeline_class_for(root).from_pretrained(root, torch_dtype=torch_dtype, **kwargs)
