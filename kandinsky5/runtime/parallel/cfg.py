"""CFG parallelism: the two classifier-free-guidance branches on two ranks at once.

:class:`CfgParallelGuidance` is a guidance object (:mod:`kandinsky5.sampling.guidance`), chosen by
``make_guidance`` when the pipeline's mesh has ``cfg_degree`` 2: cfg rank 0 computes the condition's velocity, cfg
rank 1 the negative prompt's, each with one transformer call per step on its own text; the two velocities are
all-gathered over the cfg group and combined by the same formula as :class:`TwoCallGuidance`
(``negative + scale * (condition - negative)``) on both ranks, so both hold the same velocity, equal to the two-call
one (each branch's call is the single-process call, on the same shapes).

It composes with Ulysses (each cfg rank's Ulysses group shards its branch's call) and with a step cache: each call's
:class:`~kandinsky5.models.forward_context.ForwardContext` names the one branch it computes, so MagCache keeps that
branch's state on that rank, and decides for it exactly as with two calls.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from kandinsky5.models.forward_context import Branch
from kandinsky5.sampling.guidance import Guidance, TextConditioning, guided_velocity

# cfg rank -> the branch it computes
CFG_BRANCHES = (Branch.CONDITION, Branch.NEGATIVE)


class CfgParallelGuidance(Guidance):
    """One branch per cfg rank, velocities exchanged (see the module doc). ``group``: the cfg group (2 ranks),
    ``rank``: this rank's index in it (0: condition, 1: negative)."""

    calls_per_step = 1  # per rank

    def __init__(
        self,
        denoiser,
        condition: TextConditioning,
        negative: TextConditioning,
        scale: float,
        num_steps: int,
        group: dist.ProcessGroup,
        rank: int,
    ):
        super().__init__(denoiser, condition, num_steps)
        if rank not in (0, 1):
            raise ValueError(f"CFG parallelism has two ranks (0: condition, 1: negative), got rank {rank}")
        self.negative = negative
        self.scale = scale
        self.group = group
        self.rank = rank

    @property
    def branch(self) -> Branch:
        """The branch this rank computes."""
        return CFG_BRANCHES[self.rank]

    def predict(self, latents, timestep, step):
        rows = timestep.expand(latents.shape[0])
        text = self.condition if self.branch is Branch.CONDITION else self.negative
        own = self.denoiser(latents, rows, text, self.context(step, self.branch)).contiguous()
        both = [torch.empty_like(own) for _ in CFG_BRANCHES]
        dist.all_gather(both, own, group=self.group)
        condition, negative = both
        return guided_velocity(condition, negative, self.scale)

    def with_text(self, condition, negative):
        return type(self)(
            self.denoiser, condition, negative, self.scale, self.num_steps, group=self.group, rank=self.rank
        )
