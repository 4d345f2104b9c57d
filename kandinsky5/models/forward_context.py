"""What a denoiser call is for, passed with it: which guidance branch each batch chunk computes and which step
of the schedule it serves.

The sampling loop builds one per transformer call; the transformer hands it to the wrappers of its stages, so a
step cache can keep state per branch (the condition and the negative prompt drift differently) and a parallel
mode can tell the halves of a batched classifier-free-guidance call apart. Nothing here is stored on a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Branch(StrEnum):
    """The text a transformer call is conditioned on."""

    CONDITION = "condition"
    NEGATIVE = "negative"


@dataclass(frozen=True)
class ForwardContext:
    """One denoiser call: ``branches`` lists the batch's equal chunks in order (``(CONDITION, NEGATIVE)`` for a
    batched guidance call: the first half of the batch is the condition); ``step`` is the index of the denoising
    step in ``0..num_steps-1``."""

    branches: tuple[Branch, ...] = (Branch.CONDITION,)
    step: int | None = None
    num_steps: int | None = None

    @property
    def branch(self) -> Branch:
        """The branch of a call that computes one branch only."""
        if len(self.branches) != 1:
            raise ValueError(f"this call computes {len(self.branches)} branches: {self.branches}")
        return self.branches[0]
