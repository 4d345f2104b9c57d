"""MagCache: skip the visual blocks on steps where their residual barely changes, reusing the last one.

The visual blocks turn their input ``x`` into ``x + r``. MagCache (Ma et al., as the original Kandinsky 5
repository adapts it) calibrates, per model and per guidance branch, the ratio of the magnitudes of ``r`` at
consecutive steps. At run time, for each branch separately, after the first ``retention_ratio`` of the calls
(never skipped) every call multiplies an accumulated ratio by its calibrated ratio and adds ``|1 - accumulated
ratio|`` to an accumulated error. The call is skipped, returning ``x`` plus that branch's cached residual, while the
error stays below ``threshold`` and at most ``max_skip_steps`` calls in a row were skipped; otherwise the blocks
run, their residual is cached and the branch's accumulated ratio, error and skip count start over.

This approximates: outputs differ from the exact path (more so for a higher ``threshold``). The text blocks and
the output head always run (the wrapper replaces the visual blocks only).

Call counting follows the original, which numbers the calls of a generation ``0..2*num_steps-1`` with the
condition's call of step ``s`` at ``2s`` and the negative prompt's at ``2s+1``; a model run without guidance
(nocfg) advances that counter by 2 per call, so its call of step ``s`` is number ``2s`` too. Here a call is
identified by ``(context.step, branch)`` and numbered ``2*step + (branch is NEGATIVE)``, which is both rules at
once, so no setting is needed for CFG-distilled models (their negative ratios, zeros in the official data, are
never read when no negative call is made).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import TYPE_CHECKING

import torch

from kandinsky5.models.forward_context import Branch, ForwardContext

if TYPE_CHECKING:
    from kandinsky5.models.dit import StageRun, VisualBlocksInputs
    from kandinsky5.variants import Variant

RATIOS_FILE = "magcache_ratios.json"
# the image models' (kept apart: RATIOS_FILE is the reference data's copy)
IMAGE_RATIOS_FILE = "magcache_image_ratios.json"
# The call numbering: the condition's call of a step first, then the negative prompt's.
BRANCH_ORDER = (Branch.CONDITION, Branch.NEGATIVE)
# The original prepends this ratio for the first step, where nothing is cached yet.
FIRST_STEP_RATIO = 1.0

# Variant short name -> {resolution class name: key of magcache_ratios.json}. The keys are the original
# repository's config names; Lite was calibrated at the 512 class only, Pro per class (SD: 512, HD: 1024).
OFFICIAL_RATIOS_KEYS: dict[str, dict[str, str]] = {
    "lite-sft-5s": {"512": "lite-t2v-sft-5s"},
    "lite-sft-10s": {"512": "lite-t2v-sft-10s"},
    "lite-nocfg-5s": {"512": "lite-t2v-nocfg-5s"},
    "lite-nocfg-10s": {"512": "lite-t2v-nocfg-10s"},
    "lite-i2v-5s": {"512": "lite-i2v-5s"},
    "pro-sft-5s": {"512": "pro-t2v-sft-5s", "1024": "pro-t2v-sft-5s-hd"},
    "pro-sft-10s": {"1024": "pro-t2v-sft-10s-hd"},
    "pro-i2v-5s": {"512": "pro-i2v-sft-5s", "1024": "pro-i2v-sft-5s-hd"},
    "lite-t2i-sft": {"1024": "lite-t2i-sft-hd"},  # the original ships no ratios for its other image models
}


@dataclass(frozen=True)
class MagCacheConfig:
    """MagCache's settings (defaults: the original's).

    ``ratios``: the calibrated magnitude ratios, one per model call after the first step, either in the original's
    layout (condition and negative interleaved: ``2 * (calibrated_steps - 1)`` values) or per branch, a mapping
    ``{"condition": [...], "negative": [...]}`` of ``calibrated_steps - 1`` values each (``"negative"`` may be
    left out for models run without guidance). ``threshold``: the accumulated error below which a call is
    skipped (0 never skips). ``max_skip_steps``: the most calls of a branch skipped in a row. ``retention_ratio``:
    the fraction of the calls at the start that always run. ``calibrated_steps``: the step count the ratios were
    measured at; at other step counts each branch's ratios are resampled (nearest).
    """

    ratios: Sequence[float] | Mapping[str, Sequence[float]]
    threshold: float = 0.12
    max_skip_steps: int = 2
    retention_ratio: float = 0.2
    calibrated_steps: int = 50
    # per branch, one ratio per calibrated step (the first step's 1.0 included); derived from ``ratios``
    branch_ratios: Mapping[Branch, tuple[float, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.calibrated_steps < 1:
            raise ValueError(f"calibrated_steps must be positive, got {self.calibrated_steps}")
        if self.threshold < 0 or self.max_skip_steps < 0 or not 0 <= self.retention_ratio <= 1:
            raise ValueError("threshold and max_skip_steps must be >= 0 and retention_ratio in [0, 1]")
        per_step = self.calibrated_steps - 1
        if isinstance(self.ratios, Mapping):
            given = {Branch(name): [float(r) for r in values] for name, values in self.ratios.items()}
        else:
            flat = [float(r) for r in self.ratios]
            if len(flat) != 2 * per_step:
                raise ValueError(
                    f"interleaved ratios need 2 * (calibrated_steps - 1) = {2 * per_step} values, got {len(flat)}"
                )
            given = {branch: flat[i::2] for i, branch in enumerate(BRANCH_ORDER)}
        for branch, values in given.items():
            if len(values) != per_step:
                raise ValueError(f"{branch} ratios: expected calibrated_steps - 1 = {per_step}, got {len(values)}")
        branch_ratios = {b: (FIRST_STEP_RATIO, *values) for b, values in given.items()}
        object.__setattr__(self, "branch_ratios", branch_ratios)

    @classmethod
    def from_ratios_file(cls, path, **settings) -> MagCacheConfig:
        """The ratios and ``calibrated_steps`` of a file written by ``kandinsky5 calibrate-cache`` (or
        :func:`~kandinsky5.sampling.caches.calibration.save_ratios`), with ``settings`` (threshold, ...)."""
        from kandinsky5.sampling.caches.calibration import load_ratios

        return cls(**load_ratios(path), **settings)

    def ratios_at(self, branch: Branch, num_steps: int) -> tuple[float, ...]:
        """``branch``'s ratio of each of ``num_steps`` steps: the calibrated ones, resampled (nearest) when
        ``num_steps`` differs from ``calibrated_steps``."""
        if branch not in self.branch_ratios:
            raise ValueError(f"these MagCache ratios have none for the {branch} branch (a model run with guidance?)")
        return _resample(self.branch_ratios[branch], num_steps)


@lru_cache(maxsize=64)
def _resample(values: tuple[float, ...], target: int) -> tuple[float, ...]:
    """The original's nearest interpolation: index ``round(i * (n - 1) / (target - 1))`` (ties to even)."""
    if target == len(values):
        return values
    if target == 1:
        return (values[-1],)
    scale = (len(values) - 1) / (target - 1)
    return tuple(values[round(i * scale)] for i in range(target))


@dataclass
class _BranchState:
    ratio: float = 1.0  # accumulated magnitude ratio since the last computed call
    error: float = 0.0  # accumulated |1 - ratio|
    skips: int = 0  # calls in a row counted towards a skip since the last computed call
    residual: torch.Tensor | None = None  # output - input of the visual blocks at the last computed call
    last_step: int | None = None

    def reset(self) -> None:
        self.ratio, self.error, self.skips = 1.0, 0.0, 0


class MagCache:
    """The stage wrapper of the visual blocks that applies MagCache (a ``StageWrapper``; see ``wrap_stage``).

    State is kept per guidance branch and belongs to one generation: a call at step 0 after calls at later steps,
    or a branch seen again at a step it has already had, starts a new generation with fresh state. Without a
    context (a direct transformer call) or without its step, the blocks run unchanged.

    A batched guidance call (``context.branches == (CONDITION, NEGATIVE)``) is decided per branch on each half of
    the batch, exactly as two calls would be. When both halves skip, the blocks do not run; otherwise they run on
    the whole batch (the halves share one launch, so running one half alone would save little), the computed half
    keeps its fresh result and residual, and a half whose branch decided to skip still returns its input plus its
    cached residual, so decisions, state and outputs equal two-call guidance's.

    ``skipped_calls`` / ``total_calls``: branch evaluations skipped / made in the last (or current) generation (a
    batched call counts once per branch); ``decisions``: ``(step, branch, skipped)`` of each, in order.
    """

    def __init__(self, config: MagCacheConfig):
        self.config = config
        self._states: dict[Branch, _BranchState] = {}
        self._previous_step: int | None = None
        self.decisions: list[tuple[int, Branch, bool]] = []

    @property
    def skipped_calls(self) -> int:
        return sum(skipped for _, _, skipped in self.decisions)

    @property
    def total_calls(self) -> int:
        return len(self.decisions)

    def reset(self) -> None:
        """Forget every branch's state (a new generation)."""
        self._states.clear()
        self._previous_step = None
        self.decisions = []

    def __call__(
        self, run: StageRun, visual: torch.Tensor, inputs: VisualBlocksInputs, *, context: ForwardContext | None
    ) -> torch.Tensor:
        if context is None or context.step is None or context.num_steps is None:
            return run(visual, inputs)
        step, num_steps, branches = context.step, context.num_steps, context.branches
        self._start_run_if_new(step, branches)
        chunks = visual.chunk(len(branches))
        skips = [self._decide(branch, step, num_steps, chunk) for branch, chunk in zip(branches, chunks, strict=True)]
        if all(skips):
            out = torch.cat([chunk + self._states[b].residual for b, chunk in zip(branches, chunks, strict=True)])
        else:
            computed = run(visual, inputs).chunk(len(branches))
            parts = []
            for branch, chunk, result, skipped in zip(branches, chunks, computed, skips, strict=True):
                state = self._states[branch]
                if skipped:
                    parts.append(chunk + state.residual)
                else:
                    state.residual = result - chunk
                    parts.append(result)
            out = torch.cat(parts) if len(parts) > 1 else parts[0]
        for branch in branches:
            state = self._states[branch]
            state.last_step = step
            if step >= num_steps - 1:
                state.residual = None  # the generation's last step: nothing will read it
        self._previous_step = step
        return out

    def _start_run_if_new(self, step: int, branches: tuple[Branch, ...]) -> None:
        again = any(
            (s := self._states.get(b)) is not None and s.last_step is not None and s.last_step >= step for b in branches
        )
        restarted = step == 0 and self._previous_step not in (None, 0)
        if again or restarted:
            self.reset()

    def _decide(self, branch: Branch, step: int, num_steps: int, chunk: torch.Tensor) -> bool:
        """Whether ``branch``'s call at ``step`` is skipped; updates the branch's accumulators as the original."""
        state = self._states.setdefault(branch, _BranchState())
        call = 2 * step + BRANCH_ORDER.index(branch)
        skip = False
        if call >= int(2 * num_steps * self.config.retention_ratio):
            state.ratio *= self.config.ratios_at(branch, num_steps)[step]
            state.skips += 1
            state.error += abs(1.0 - state.ratio)
            cached = state.residual is not None and state.residual.shape == chunk.shape
            skip = cached and state.error < self.config.threshold and state.skips <= self.config.max_skip_steps
            if not skip:
                state.reset()
        self.decisions.append((step, branch, skip))
        return skip


# ---- the official ratios (package data) ----


@lru_cache(maxsize=1)
def _official_data() -> dict[str, list[float]]:
    ratios = {}
    for name in (RATIOS_FILE, IMAGE_RATIOS_FILE):
        ratios |= json.loads(resources.files(__package__).joinpath(name).read_text(encoding="utf-8"))["ratios"]
    return ratios


def official_ratios_key(variant: Variant, resolution_class: str | None = None) -> str:
    """The key of ``variant``'s official ratios in ``magcache_ratios.json`` at ``resolution_class`` ("512" or
    "1024"; default: the variant's default size's class). ``ValueError`` when there are none."""
    resolution = resolution_class or variant.resolution_class.name
    keys = OFFICIAL_RATIOS_KEYS.get(variant.short_name, {})
    if resolution not in keys:
        have = f" (it has them for the {' and '.join(sorted(keys))} class)" if keys else ""
        raise ValueError(
            f"{variant.short_name} has no official MagCache ratios at the {resolution} resolution class{have}. "
            "Measure them by calibration (`kandinsky5 calibrate-cache --model ... --prompts FILE --out ratios.json`) "
            "and pass them as pipe.transformer.enable_cache(MagCacheConfig.from_ratios_file('ratios.json'))."
        )
    return keys[resolution]


def official_ratios(variant: Variant, resolution_class: str | None = None) -> tuple[float, ...]:
    """``variant``'s official ratios in the original's interleaved layout (see :func:`official_ratios_key`)."""
    return tuple(_official_data()[official_ratios_key(variant, resolution_class)])


def magcache_config_for(variant: Variant | None, resolution_class: str | None = None, **settings) -> MagCacheConfig:
    """A :class:`MagCacheConfig` with ``variant``'s official ratios and ``settings`` (threshold, ...)."""
    if variant is None:
        raise ValueError(
            "the pipeline's checkpoint is no known variant, so it has no official MagCache ratios; pass ratios as "
            "pipe.transformer.enable_cache(MagCacheConfig(ratios=...))"
        )
    return MagCacheConfig(ratios=official_ratios(variant, resolution_class), **settings)
