"""diffusers' ways of watching a run, as adapters over the run control: the tqdm progress bar and
``callback_on_step_end``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from kandinsky5.sampling.control import Phase, ProgressEvent, RunControl
from kandinsky5.sampling.guidance import Guidance, TextConditioning


class ProgressBar:
    """A tqdm bar over the denoising steps, fed by the run's progress events; ``close()`` in any case."""

    def __init__(self, **tqdm_options):
        self.options = tqdm_options
        self.bar: tqdm | None = None

    def __call__(self, event: ProgressEvent) -> None:
        if event.phase is not Phase.DENOISE:
            return
        if event.completed == 0:
            self.close()
            self.bar = tqdm(total=event.total, **self.options)
        elif self.bar is not None:
            self.bar.update(event.completed - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class StepCallback:
    """diffusers' ``callback_on_step_end(pipe, step, timestep, tensors) -> tensors`` at the end of each step.

    The callback sees the tensors named in ``tensor_inputs`` and may return replacements (new latents, or new
    prompt embeddings, which rebuild the guidance's text with the same padding masks). Setting ``pipe._interrupt``
    in it skips the remaining steps, as in diffusers.
    """

    def __init__(self, pipe, callback: Callable, tensor_inputs: list[str], control: RunControl):
        self.pipe = pipe
        self.callback = callback
        self.tensor_inputs = tensor_inputs
        self.control = control

    def __call__(self, step: int, timestep: torch.Tensor, latents: torch.Tensor, guidance: Guidance):
        condition = guidance.condition
        negative: TextConditioning | None = getattr(guidance, "negative", None)
        tensors = {"latents": latents, **text_tensors("prompt", condition), **text_tensors("negative_prompt", negative)}
        outputs = self.callback(self.pipe, step, timestep, {k: tensors[k] for k in self.tensor_inputs})
        outputs = check_callback_outputs(outputs, step, latents)
        if self.pipe.interrupt:
            self.control.interrupt()
        latents = outputs.pop("latents", latents)
        new_condition = replaced_text(condition, "prompt", outputs)
        new_negative = replaced_text(negative, "negative_prompt", outputs)
        if new_condition is not condition or new_negative is not negative:
            guidance = guidance.with_text(new_condition, new_negative)
        return latents, guidance


class CallbackError(ValueError):
    """``callback_on_step_end`` returned something the run cannot use; ``latents`` holds the latents after the
    step it failed at (nothing sampled is lost)."""

    def __init__(self, message: str, step: int, latents: torch.Tensor):
        super().__init__(message)
        self.step = step
        self.latents = latents


def check_callback_outputs(outputs, step: int, latents: torch.Tensor) -> dict:
    """A copy of what a step callback returned (``None``: nothing replaced); :class:`CallbackError` unless it is a
    dict whose tensors keep the shapes of those they replace."""
    if outputs is None:
        return {}
    if not isinstance(outputs, dict):
        raise CallbackError(
            f"`callback_on_step_end` returned a {type(outputs).__name__} at step {step}; it must return a dict of "
            "tensors (those of `callback_on_step_end_tensor_inputs` it replaces) or None",
            step,
            latents,
        )
    replaced = outputs.get("latents")
    if replaced is not None and (not isinstance(replaced, torch.Tensor) or replaced.shape != latents.shape):
        got = tuple(replaced.shape) if isinstance(replaced, torch.Tensor) else type(replaced).__name__
        raise CallbackError(
            f"`callback_on_step_end` returned latents of {got} at step {step}; they must keep the shape "
            f"{tuple(latents.shape)}",
            step,
            latents,
        )
    return dict(outputs)


def text_tensors(branch: str, text: TextConditioning | None) -> dict[str, Any]:
    if text is None:
        return {f"{branch}_embeds_qwen": None, f"{branch}_embeds_clip": None}
    return {f"{branch}_embeds_qwen": text.embeds_qwen, f"{branch}_embeds_clip": text.embeds_clip}


def replaced_text(text: TextConditioning | None, branch: str, outputs: dict) -> TextConditioning | None:
    """``text`` with the embeddings a callback returned for ``branch`` (``text`` itself when none)."""
    qwen, clip = outputs.pop(f"{branch}_embeds_qwen", None), outputs.pop(f"{branch}_embeds_clip", None)
    if text is None:
        return None
    qwen = text.embeds_qwen if qwen is None else qwen
    clip = text.embeds_clip if clip is None else clip
    if qwen is text.embeds_qwen and clip is text.embeds_clip:
        return text
    return TextConditioning(qwen, clip, text.mask)
