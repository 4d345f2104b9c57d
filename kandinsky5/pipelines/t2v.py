"""Text-to-video: the shared pipeline with no extra conditioning."""

from kandinsky5.pipelines.base import Kandinsky5PipelineBase
from kandinsky5.pipelines.registry import T2V_PIPELINE


class Kandinsky5T2VPipeline(Kandinsky5PipelineBase):
    """Kandinsky 5.0 text-to-video, API-compatible with diffusers' ``Kandinsky5T2VPipeline``."""

    checkpoint_classes = (T2V_PIPELINE,)
