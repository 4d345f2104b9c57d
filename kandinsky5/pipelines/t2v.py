"""Text-to-video: the shared pipeline with no extra conditioning."""

from kandinsky5.pipelines.base import Kandinsky5PipelineBase


class Kandinsky5T2VPipeline(Kandinsky5PipelineBase):
    """Kandinsky 5.0 text-to-video, API-compatible with diffusers' ``Kandinsky5T2VPipeline``."""

    checkpoint_classes = ("Kandinsky5T2VPipeline",)
