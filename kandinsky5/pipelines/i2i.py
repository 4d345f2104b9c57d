"""Image editing: the image pipeline conditioned on a source image twice, as the reference does it. The transformer
gets the image's VAE latents in its condition channels (and a mask of ones), and Qwen2.5-VL sees the image, at half
its size, through transformers' image processor and its own vision tower, inside the editing prompt template.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from kandinsky5.io.preprocess import ImageInput, preprocess_image, repeat_images, to_pil_images
from kandinsky5.models import text_encoders as te
from kandinsky5.pipelines.image import Kandinsky5ImagePipelineBase
from kandinsky5.pipelines.registry import I2I_PIPELINE
from kandinsky5.pipelines.request import GenerationRequest
from kandinsky5.sampling.control import Phase, RunControl
from kandinsky5.variants import Task


class Kandinsky5I2IPipeline(Kandinsky5ImagePipelineBase):
    """Kandinsky 5.0 image editing, API-compatible with diffusers' ``Kandinsky5I2IPipeline``.

    ``pipe(image, prompt=..., ...)``: the source image first (a PIL image, array or tensor, or one per prompt),
    then the text-to-image parameters. Without ``height`` and ``width`` the output takes the image's size, snapped
    to the model's resolutions. ``tokenizer`` may be the Qwen tokenizer (with ``image_processor``, transformers'
    Qwen2-VL image processor) or a transformers ``Qwen2VLProcessor`` holding both, as in diffusers.
    """

    checkpoint_classes = (I2I_PIPELINE,)
    task: ClassVar[Task] = Task.IMAGE_TO_IMAGE
    text_encoder_sees_images: ClassVar[bool] = True
    prompt_template = te.EDIT_PROMPT_TEMPLATE
    prompt_crop_past_prefix: ClassVar[int] = te.EDIT_CROP_PAST_PREFIX

    def __init__(
        self, transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, scheduler, image_processor=None
    ):
        if hasattr(tokenizer, "image_processor") and hasattr(tokenizer, "tokenizer"):  # a transformers processor
            image_processor = image_processor or tokenizer.image_processor
            tokenizer = tokenizer.tokenizer
        super().__init__(transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, scheduler)
        # transformers' Qwen2-VL image processor (diffusers' ``image_processor`` attribute is its VAE processor)
        self.qwen_image_processor = image_processor

    def __call__(self, image: ImageInput | None = None, *args, **kwargs):
        """Edit ``image`` as the prompt says."""
        return super().__call__(*args, image=image, **kwargs)

    @torch.no_grad()
    def encode_prompt(
        self,
        prompt: str | list[str],
        image: ImageInput,
        num_images_per_prompt: int = 1,
        max_sequence_length: int = 1024,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """diffusers' signature: the prompts encoded with the source image (one for all prompts, or one each)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        images = self._qwen_images(image, len(prompts))
        return self._embed_prompts(prompts, num_images_per_prompt, max_sequence_length, device, dtype, images)

    def qwen_images(self, request: GenerationRequest) -> te.QwenImages:
        return self._qwen_images(request.image, request.batch_size)

    def _qwen_images(self, image: ImageInput, num_prompts: int) -> te.QwenImages:
        if self.qwen_image_processor is None:
            raise ValueError(
                "this editing pipeline has no Qwen2-VL image processor: pass `image_processor=` (transformers' "
                "Qwen2VLImageProcessor) or a Qwen2VLProcessor as `tokenizer`"
            )
        images = to_pil_images(image)
        if len(images) == 1:
            images = images * num_prompts
        return te.QwenImages.prepare(self.qwen_image_processor, images)

    def prepare_condition(self, latents: torch.Tensor, request: GenerationRequest, control: RunControl) -> torch.Tensor:
        """The source image's latents in the condition channels and ones in the mask channel, on every output.

        Caller latents that already hold every channel are used as given (as the reference)."""
        given = request.latents
        if given is not None and given.shape[-1] == self.transformer.config.visual_input_dim:
            return latents
        with control.phase(Phase.ENCODE_IMAGE):
            image_latents = self.encode_image(request, latents.shape[0], latents.device)
        channels = self.transformer.config.in_visual_dim
        latents[..., channels : 2 * channels] = image_latents.to(latents.dtype)
        latents[..., -1] = 1
        return latents

    def encode_image(self, request: GenerationRequest, num_outputs: int, device) -> torch.Tensor:
        """Scaled latents ``(num_outputs, 1, H/8, W/8, C)`` of the source image(s) at the output size.

        Each output draws its own sample of the VAE's posterior, after the noise and with the caller's generator(s),
        as diffusers draws them for a batch of one image per output (the same prompt and image repeated)."""
        pixels = preprocess_image(request.image, request.height, request.width)
        pixels = repeat_images(pixels, num_outputs // pixels.shape[0])
        posterior = self.vae.encode(pixels.to(device=device, dtype=self.vae.dtype)).latent_dist
        image_latents = posterior.sample(generator=request.generator) * self.vae.config.scaling_factor
        return image_latents.permute(0, 2, 3, 1).unsqueeze(1)
