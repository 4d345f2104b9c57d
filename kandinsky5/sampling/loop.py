"""The denoising loop: Euler steps along the guided velocity, outside any pipeline class (as flux's ``denoise``)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from kandinsky5.sampling.control import RunControl
from kandinsky5.sampling.guidance import Guidance
from kandinsky5.sampling.scheduler import FlowMatchEulerDiscreteScheduler

# (step index, timestep, latents, guidance) -> (latents, guidance): diffusers' step-end callback may swap either
StepEndHook = Callable[[int, torch.Tensor, torch.Tensor, Guidance], tuple[torch.Tensor, Guidance]]
# scaled channels-last latents -> preview frames
Previewer = Callable[[torch.Tensor], object]


def denoise(
    latents: torch.Tensor,
    scheduler: FlowMatchEulerDiscreteScheduler,
    guidance: Guidance,
    control: RunControl,
    *,
    noise_channels: int,
    frozen_frames: int = 0,
    on_step_end: StepEndHook | None = None,
    previewer: Previewer | None = None,
) -> torch.Tensor:
    """Step ``latents`` ``(batch, T, H, W, C')`` through ``scheduler.timesteps`` and return them.

    Only the first ``noise_channels`` channels are stepped (the rest condition the model), and only the frames
    after the first ``frozen_frames`` (image-to-video keeps the image's frame as encoded). ``latents`` is updated
    in place. Cancellation stops before a step (``GenerationCancelled``); an interrupt skips the remaining steps.
    Nothing here reads a device value on the host, so the steps queue without waiting for the GPU.
    """
    timesteps = scheduler.timesteps
    progress = control.steps(len(timesteps))
    for step, timestep in enumerate(timesteps):
        control.raise_if_cancelled()
        if control.interrupted:
            break
        velocity = guidance.predict(latents, timestep, step)
        stepped = latents[:, frozen_frames:, ..., :noise_channels]
        latents[:, frozen_frames:, ..., :noise_channels] = scheduler.step(velocity[:, frozen_frames:], step, stepped)
        if on_step_end is not None:
            latents, guidance = on_step_end(step, timestep, latents, guidance)
        progress.step_done()
        if previewer is not None and control.wants_preview(progress.completed):
            control.on_preview(progress.completed, previewer(latents))
    return latents
