"""Image-to-video: the shared pipeline with its first latent frame fixed to the VAE-encoded input image."""

from __future__ import annotations

import torch

from kandinsky5.io.preprocess import ImageInput, preprocess_image
from kandinsky5.pipelines.base import Kandinsky5PipelineBase
from kandinsky5.pipelines.registry import I2V_PIPELINE
from kandinsky5.pipelines.request import GenerationRequest
from kandinsky5.sampling.control import Phase, RunControl
from kandinsky5.variants import Task

# After sampling, the reference re-normalises this many leading latent frames (its fix for mesh artifacts)...
NORMALIZED_LEADING_FRAMES = 4
# ...to the mean and std of (at most) this many latent frames that follow them, taken over the whole batch...
NORMALIZATION_REFERENCE_FRAMES = 5
# ...each kept within these distances below / above the leading frames' own mean and std.
MEAN_SHIFT_LIMITS = (0.05, 0.1)
STD_SHIFT_LIMITS = (0.1, 0.25)


class Kandinsky5I2VPipeline(Kandinsky5PipelineBase):
    """Kandinsky 5.0 image-to-video, API-compatible with diffusers' ``Kandinsky5I2VPipeline``.

    ``pipe(image, prompt=..., ...)``: ``image`` first, then the text-to-video parameters (see
    ``Kandinsky5PipelineBase.__call__``), positionally or by name.
    """

    checkpoint_classes = (I2V_PIPELINE,)
    task = Task.IMAGE_TO_VIDEO
    # the image's latent frame: the sampler leaves it as encoded
    num_frozen_latent_frames = 1

    def __call__(self, image: ImageInput | None = None, *args, **kwargs):
        """Generate videos that start from ``image`` (a PIL image, numpy array, tensor, or one per prompt)."""
        return super().__call__(*args, image=image, **kwargs)

    def prepare_condition(self, latents: torch.Tensor, request: GenerationRequest, control: RunControl) -> torch.Tensor:
        """Put the image's latent into frame 0 of the noise channels and mark that frame in the mask channel.

        Caller latents that already hold every channel are used as given, the image unencoded (as the reference).
        """
        given = request.latents
        if given is not None and given.shape[-1] == self.transformer.config.visual_input_dim:
            return latents
        num_videos = latents.shape[0]
        with control.phase(Phase.ENCODE_IMAGE):
            image_latents = self.encode_image(
                request.image, request.height, request.width, request.generator, num_videos, latents.device
            )
        # one image per prompt: each prompt's videos are consecutive (prompt-major)
        image_latents = image_latents.repeat_interleave(num_videos // image_latents.shape[0], dim=0)
        num_channels = self.transformer.config.in_visual_dim
        latents[:, :1, :, :, :num_channels] = image_latents.to(latents.dtype)
        if self.transformer.visual_cond:
            latents[:, :1, :, :, -1] = 1  # the mask channel, last: 1 on frames given as condition
        return latents

    def encode_image(self, image: ImageInput, height: int, width: int, generator, num_videos: int, device):
        """Scaled latents ``(num_images, 1, H/8, W/8, C)`` of ``image``, sampled from the VAE's posterior.

        The sample is drawn after the noise, with the caller's generator; with a list of generators, each image
        uses the generator of its first video (the reference's draws where it runs).
        """
        pixels = preprocess_image(image, height, width).to(device=device, dtype=self.vae.dtype)
        posterior = self.vae.encode(pixels.unsqueeze(2)).latent_dist  # each image as a one-frame video
        num_images = pixels.shape[0]
        if isinstance(generator, list) and len(generator) > 1:
            videos_per_image = num_videos // num_images
            generator = [generator[i * videos_per_image] for i in range(num_images)]
        image_latents = posterior.sample(generator=generator) * self.vae.config.scaling_factor
        return image_latents.permute(0, 2, 3, 4, 1)

    def finalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The reference's re-normalisation of the leading latent frames, without its failures: a video of
        at most ``NORMALIZED_LEADING_FRAMES`` latent frames is left as it is (the reference returns NaN there, or
        fails on a single frame)."""
        reference = latents[:, NORMALIZED_LEADING_FRAMES : NORMALIZED_LEADING_FRAMES + NORMALIZATION_REFERENCE_FRAMES]
        if reference.shape[1] == 0:
            return latents
        leading = latents[:, :NORMALIZED_LEADING_FRAMES]
        video_dims = tuple(range(1, latents.ndim))
        mean = leading.mean(dim=video_dims, keepdim=True)
        std = leading.std(dim=video_dims, keepdim=True)
        # the targets are the whole batch's statistics (so a video depends on the others, as in the reference)
        target_mean = torch.clamp(reference.mean(), mean - MEAN_SHIFT_LIMITS[0], mean + MEAN_SHIFT_LIMITS[1])
        target_std = torch.clamp(reference.std(), std - STD_SHIFT_LIMITS[0], std + STD_SHIFT_LIMITS[1])
        latents = latents.clone()
        latents[:, :NORMALIZED_LEADING_FRAMES] = (leading - mean) / std * target_std + target_mean
        return latents
