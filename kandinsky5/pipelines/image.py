"""What the image pipelines (text-to-image, image editing) change in the shared core: an image is a one-frame
video of the 2D VAE, so the request, guidance, loop, run control, offload, quantization, caches and LoRA are the
video pipelines'. Here: diffusers' image signatures (``num_images_per_prompt``), the image template and the RoPE
scale of the image models, the 2D decode and the image output.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch

from kandinsky5.models import text_encoders as te
from kandinsky5.pipelines.base import Kandinsky5PipelineBase
from kandinsky5.pipelines.output import KandinskyImagePipelineOutput, decode_image_latents, postprocess_image
from kandinsky5.pipelines.request import GenerationRequest
from kandinsky5.resolutions import IMAGE_RESOLUTIONS, IMAGE_ROPE_SCALE
from kandinsky5.sampling.control import RunControl
from kandinsky5.variants import Task

# An image is a latent "video" of this many frames.
IMAGE_FRAMES = 1


class Kandinsky5ImagePipelineBase(Kandinsky5PipelineBase):
    """The shared core with the image models' conventions (see the module doc)."""

    task: ClassVar[Task] = Task.TEXT_TO_IMAGE
    output_class: ClassVar[type] = KandinskyImagePipelineOutput
    prompt_template = te.IMAGE_PROMPT_TEMPLATE
    # diffusers' attribute: the sizes the models were trained at, as (width, height)
    resolutions: ClassVar[list[tuple[int, int]]] = [(size.width, size.height) for size in IMAGE_RESOLUTIONS]

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        num_images_per_prompt: int | None = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds_qwen: torch.Tensor | None = None,
        prompt_embeds_clip: torch.Tensor | None = None,
        negative_prompt_embeds_qwen: torch.Tensor | None = None,
        negative_prompt_embeds_clip: torch.Tensor | None = None,
        prompt_cu_seqlens: torch.Tensor | None = None,
        negative_prompt_cu_seqlens: torch.Tensor | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        max_sequence_length: int | None = None,
        control: RunControl | None = None,
        **condition,
    ):
        """Generate images; returns an object whose ``.image`` is the list of images (see ``output_type``).

        Arguments left as ``None`` take the checkpoint's recommended values, else diffusers' (1024x1024, 50 steps,
        guidance 3.5, an empty negative prompt, 512 tokens; 1024 for editing). A size that is not one of the
        model's resolutions (``self.resolutions``) becomes the one nearest in aspect ratio, with a warning, as in
        diffusers. ``control`` receives progress events and can cancel. Everything is validated before any work.
        """
        arguments = {name: value for name, value in locals().items() if name not in ("self", "control", "condition")}
        arguments["num_videos_per_prompt"] = arguments.pop("num_images_per_prompt")
        request = GenerationRequest.build(self.model_facts(), num_frames=IMAGE_FRAMES, **arguments, **condition)
        return self._run(request, control or RunControl())

    @torch.no_grad()
    def encode_prompt(
        self,
        prompt: str | list[str],
        num_images_per_prompt: int = 1,
        max_sequence_length: int = 512,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Qwen embeddings, CLIP pooled embeddings and ``cu_seqlens``, each prompt ``num_images_per_prompt`` times
        in a row (diffusers' signature)."""
        return self._embed_prompts(prompt, num_images_per_prompt, max_sequence_length, device, dtype)

    def prepare_latents(
        self,
        batch_size: int,
        num_channels_latents: int = 16,
        height: int = 1024,
        width: int = 1024,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Initial latents ``(batch, 1, H/8, W/8, C')`` (diffusers' image signature; see the video pipelines')."""
        args = (batch_size, num_channels_latents, height, width, IMAGE_FRAMES, dtype, device, generator, latents)
        return self._prepare_latents(*args)

    @staticmethod
    def _get_scale_factor(height: int, width: int) -> tuple[float, float, float]:
        """The image models' RoPE scale: the same at every size."""
        return IMAGE_ROPE_SCALE

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Channels-last one-frame latents ``(batch, 1, H, W, C)`` -> images ``(batch, 3, H, W)`` in [-1, 1]
        (every rank of a parallel run decodes them all: an image is one small tile)."""
        return decode_image_latents(self.vae, latents)

    @staticmethod
    def postprocess(decoded: torch.Tensor, output_type: str):
        return postprocess_image(decoded, output_type)
