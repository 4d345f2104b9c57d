"""kandinsky5: an inference engine for the Kandinsky 5.0 video and image diffusion models.

The public API mirrors diffusers': swap ``from diffusers import ...`` for ``from kandinsky5 import ...``.
Names are imported on first use, so ``import kandinsky5`` (and the CLI's start) stays cheap.
"""

import importlib

from kandinsky5.pipelines.registry import PIPELINE_MODULES

__version__ = "0.1.0"

_EXPORTS = {
    **PIPELINE_MODULES,
    "Kandinsky5Transformer3DModel": "kandinsky5.models.dit",
    "AutoencoderKLHunyuanVideo": "kandinsky5.models.vae",
    "AutoencoderKL2D": "kandinsky5.models.vae2d",
    "FlowMatchEulerDiscreteScheduler": "kandinsky5.sampling.scheduler",
    "KandinskyPipelineOutput": "kandinsky5.pipelines.output",
    "KandinskyImagePipelineOutput": "kandinsky5.pipelines.output",
    "GenerationRequest": "kandinsky5.pipelines.request",
    "RunControl": "kandinsky5.sampling.control",
    "ProgressEvent": "kandinsky5.sampling.control",
    "GenerationCancelled": "kandinsky5.sampling.control",
    "MagCacheConfig": "kandinsky5.sampling.caches.magcache",
    "export_to_video": "kandinsky5.io",
    "load_image": "kandinsky5.io",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kandinsky5' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))
