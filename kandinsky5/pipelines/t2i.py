"""Text-to-image: the image pipeline with no extra conditioning."""

from kandinsky5.pipelines.image import Kandinsky5ImagePipelineBase
from kandinsky5.pipelines.registry import T2I_PIPELINE


class Kandinsky5T2IPipeline(Kandinsky5ImagePipelineBase):
    """Kandinsky 5.0 text-to-image, API-compatible with diffusers' ``Kandinsky5T2IPipeline``."""

    checkpoint_classes = (T2I_PIPELINE,)
