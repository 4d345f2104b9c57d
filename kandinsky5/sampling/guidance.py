"""Classifier-free guidance as objects: each turns the latents and a timestep into the velocity of one step.

- :class:`NoGuidance`: one transformer call on the condition (guidance scale <= 1, CFG-distilled models).
- :class:`TwoCallGuidance`: the reference's order, a call on the condition and then one on the negative prompt.
- :class:`BatchedGuidance`: condition and negative in one call on a batch of two, text padded and masked; the
  same velocity as two calls (tested), one launch of every kernel instead of two.

Each tells the transformer which branch every call (or batch half) computes, through a
:class:`~kandinsky5.models.forward_context.ForwardContext`, so a step cache can keep state per branch and a
CFG-parallel mode can plug in as another guidance object: with a parallel mesh whose ``cfg_degree`` is 2,
:func:`make_guidance` returns :class:`~kandinsky5.runtime.parallel.cfg.CfgParallelGuidance` (one branch per rank).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kandinsky5.models.forward_context import Branch, ForwardContext

# Guidance scales at or below this run no negative branch (the reference's ``guidance_scale > 1`` test).
NO_GUIDANCE_SCALE = 1.0


@dataclass(frozen=True)
class TextConditioning:
    """One branch's text: Qwen embeddings ``(batch, seq, dim)``, CLIP pooled ``(batch, dim)`` and the padding mask
    ``(batch, seq)`` (True on real tokens; ``None`` when no row is padded)."""

    embeds_qwen: torch.Tensor
    embeds_clip: torch.Tensor
    mask: torch.Tensor | None

    def stacked_with(self, other: TextConditioning) -> TextConditioning:
        """This branch's rows, then ``other``'s, the text zero-padded to the longer length and masked."""
        length = max(self.embeds_qwen.shape[1], other.embeds_qwen.shape[1])
        qwen, masks = [], []
        for part in (self, other):
            rows, own = part.embeds_qwen.shape[:2]
            valid = part.mask
            if valid is None:
                valid = torch.ones(rows, own, dtype=torch.bool, device=part.embeds_qwen.device)
            qwen.append(torch.nn.functional.pad(part.embeds_qwen, (0, 0, 0, length - own)))
            masks.append(torch.nn.functional.pad(valid, (0, length - own), value=False))
        same_length = self.embeds_qwen.shape[1] == other.embeds_qwen.shape[1]
        unpadded = self.mask is None and other.mask is None and same_length
        return TextConditioning(
            torch.cat(qwen), torch.cat([self.embeds_clip, other.embeds_clip]), None if unpadded else torch.cat(masks)
        )


# (latents, timestep per row, text, what the call computes) -> velocity
Denoiser = Callable[[torch.Tensor, torch.Tensor, TextConditioning, ForwardContext], torch.Tensor]


def guided_velocity(condition: torch.Tensor, negative: torch.Tensor, scale: float) -> torch.Tensor:
    """The reference's combination: ``negative + scale * (condition - negative)``."""
    return negative + scale * (condition - negative)


class Guidance:
    """Base of the guidance modes: ``predict(latents, timestep, step) -> velocity``."""

    calls_per_step: int = 1

    def __init__(self, denoiser: Denoiser, condition: TextConditioning, num_steps: int):
        self.denoiser = denoiser
        self.condition = condition
        self.num_steps = num_steps

    def context(self, step: int, *branches: Branch) -> ForwardContext:
        return ForwardContext(branches=branches, step=step, num_steps=self.num_steps)

    def predict(self, latents: torch.Tensor, timestep: torch.Tensor, step: int) -> torch.Tensor:
        raise NotImplementedError

    def with_text(self, condition: TextConditioning, negative: TextConditioning | None) -> Guidance:
        """The same mode on other text (a step callback may swap the embeddings)."""
        raise NotImplementedError


class NoGuidance(Guidance):
    def predict(self, latents, timestep, step):
        rows = timestep.expand(latents.shape[0])
        return self.denoiser(latents, rows, self.condition, self.context(step, Branch.CONDITION))

    def with_text(self, condition, negative):
        return NoGuidance(self.denoiser, condition, self.num_steps)


class TwoCallGuidance(Guidance):
    """Condition, then negative: two transformer calls per step (the reference)."""

    calls_per_step = 2

    def __init__(self, denoiser, condition, negative: TextConditioning, scale: float, num_steps: int):
        super().__init__(denoiser, condition, num_steps)
        self.negative = negative
        self.scale = scale

    def predict(self, latents, timestep, step):
        rows = timestep.expand(latents.shape[0])
        velocity = self.denoiser(latents, rows, self.condition, self.context(step, Branch.CONDITION))
        negative = self.denoiser(latents, rows, self.negative, self.context(step, Branch.NEGATIVE))
        return guided_velocity(velocity, negative, self.scale)

    def with_text(self, condition, negative):
        return type(self)(self.denoiser, condition, negative, self.scale, self.num_steps)


class BatchedGuidance(TwoCallGuidance):
    """Condition and negative in one transformer call on a batch of two (condition rows first)."""

    calls_per_step = 1

    def __init__(self, denoiser, condition, negative, scale, num_steps):
        super().__init__(denoiser, condition, negative, scale, num_steps)
        self.both = condition.stacked_with(negative)  # built once per call, not per step

    def predict(self, latents, timestep, step):
        rows = timestep.expand(2 * latents.shape[0])
        context = self.context(step, Branch.CONDITION, Branch.NEGATIVE)
        velocity, negative = self.denoiser(torch.cat([latents, latents]), rows, self.both, context).chunk(2)
        return guided_velocity(velocity, negative, self.scale)


def make_guidance(
    denoiser: Denoiser,
    condition: TextConditioning,
    negative: TextConditioning | None,
    scale: float,
    num_steps: int,
    batched: bool,
    parallel: Any = None,
) -> Guidance:
    """The guidance mode for ``scale``: none at ``scale <= 1``, else CFG-parallel when ``parallel`` (a
    :class:`~kandinsky5.runtime.parallel.mesh.ParallelMesh`, or ``None``) has ``cfg_degree`` 2, else batched or two
    calls. Without guidance every cfg rank makes the one call (the same on both)."""
    if scale <= NO_GUIDANCE_SCALE:
        return NoGuidance(denoiser, condition, num_steps)
    if negative is None:
        raise ValueError("classifier-free guidance (guidance_scale > 1) needs the negative prompt's embeddings")
    if parallel is not None and parallel.cfg_degree == 2:
        from kandinsky5.runtime.parallel.cfg import CfgParallelGuidance

        return CfgParallelGuidance(
            denoiser, condition, negative, scale, num_steps, group=parallel.cfg_group, rank=parallel.cfg_rank
        )
    mode = BatchedGuidance if batched else TwoCallGuidance
    return mode(denoiser, condition, negative, scale, num_steps)
