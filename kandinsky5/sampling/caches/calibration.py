"""MagCache calibration: measure a model's magnitude ratios by running exact generations, and the ratios file.

The magnitude ratio of a call is MagCache's (Ma et al.; the original Kandinsky 5 repository's calibration): for the
visual blocks' residual ``r_s = output - input`` of one guidance branch at step ``s``, the ratio is the mean over
tokens of ``|r_s| / |r_{s-1}|``, each ``|.|`` a token's L2 norm over the channels. Step 0 has no previous residual
(the cache uses 1.0 there), so a generation of ``N`` steps gives ``N - 1`` ratios per branch.
:class:`MagnitudeRecorder` measures them (a stage wrapper that always runs the blocks); :func:`calibrate` runs one
exact generation per prompt with it and averages the ratios per step; :func:`save_ratios` / :func:`load_ratios` write
and read the file that ``MagCacheConfig.from_ratios_file`` and ``kandinsky5 generate --cache-ratios`` take.

The file is JSON: ``{"format": "kandinsky5-magcache-ratios", "version": 1, "steps": N, "ratios": {"condition":
[N - 1 values], "negative": [N - 1 values]}, ...}`` plus information (model, prompts, size, guidance, seed).
``"negative"`` is absent when the model ran without guidance. ``load_ratios`` also takes the original's interleaved
layout as ``"ratios"`` (a list of ``2 * (N - 1)`` values).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kandinsky5.models.forward_context import Branch, ForwardContext

if TYPE_CHECKING:
    from kandinsky5.models.dit import StageRun, VisualBlocksInputs

FILE_FORMAT = "kandinsky5-magcache-ratios"
FILE_VERSION = 1


def magnitude_ratio(residual: torch.Tensor, previous: torch.Tensor) -> float:
    """The mean over tokens of ``|residual| / |previous|``, the previous step's residual (per-token L2 norms over
    the last dimension, in float32)."""
    return (_token_norms(residual) / _token_norms(previous)).mean().item()


def _token_norms(residual: torch.Tensor) -> torch.Tensor:
    return residual.float().norm(dim=-1)


class MagnitudeRecorder:
    """A stage wrapper of the visual blocks (see ``wrap_stage``) that always runs them and records, per guidance
    branch, the magnitude ratio of each step's residual to the previous step's.

    ``generations``: one ``{branch: [ratio of step 1, step 2, ...]}`` per generation seen; a call at step 0 of a
    branch that already had calls starts a new one. A batched guidance call is recorded per half. Calls without a
    context or step (a direct transformer call) are run and not recorded. A branch's steps must come in order
    (0, 1, 2, ...): a gap is an error, since its ratio would span two steps.
    """

    def __init__(self):
        self.generations: list[dict[Branch, list[float]]] = []
        self._previous: dict[Branch, tuple[int, torch.Tensor]] = {}  # branch -> (step, token norms)

    def __call__(
        self, run: StageRun, visual: torch.Tensor, inputs: VisualBlocksInputs, *, context: ForwardContext | None
    ) -> torch.Tensor:
        out = run(visual, inputs)
        if context is None or context.step is None:
            return out
        step, branches = context.step, context.branches
        if step == 0 and (not self.generations or any(b in self._previous for b in branches)):
            self.generations.append({})
            self._previous.clear()
        current = self.generations[-1]
        for branch, x, y in zip(branches, visual.chunk(len(branches)), out.chunk(len(branches)), strict=True):
            norms = _token_norms(y - x)
            if step > 0:
                last = self._previous.get(branch)
                if last is None or last[0] != step - 1:
                    had = "no call" if last is None else f"its last call at step {last[0]}"
                    raise RuntimeError(f"{branch} call at step {step} after {had}: steps must come in order")
                current.setdefault(branch, []).append((norms / last[1]).mean().item())
            self._previous[branch] = (step, norms)
        return out


def average_ratios(generations: Sequence[Mapping[Branch, Sequence[float]]]) -> dict[str, list[float]]:
    """Per branch, the mean of each step's ratio over ``generations`` (which must have the same branches and
    counts); keys are branch names, condition first."""
    if not generations:
        raise ValueError("no generation was recorded")
    branches = [b for b in (Branch.CONDITION, Branch.NEGATIVE) if b in generations[0]]
    if not branches:
        raise ValueError("the generation recorded no ratios (one step only?)")
    averaged = {}
    for branch in branches:
        rows = [g.get(branch) for g in generations]
        if any(row is None or len(row) != len(rows[0]) for row in rows) or set(generations[0]) != set(branches):
            raise ValueError("the generations recorded different branches or step counts; they cannot be averaged")
        averaged[str(branch)] = [math.fsum(column) / len(rows) for column in zip(*rows, strict=True)]
    return averaged


def calibrate(
    pipe, prompts: Iterable[str], num_inference_steps: int, *, seed: int = 0, **generation
) -> dict[str, list[float]]:
    """MagCache ratios of ``pipe``'s transformer: one exact generation per prompt (``output_type="latent"``, the
    ``i``-th prompt from ``torch.Generator("cpu").manual_seed(seed + i)``, ``generation``'s other arguments: height,
    width, num_frames, guidance_scale, the image of image-conditioned models...), their ratios averaged per step.

    Returns ``{"condition": [...], "negative": [...]}`` with ``num_inference_steps - 1`` values each (no
    ``"negative"`` without guidance): what ``MagCacheConfig(ratios=..., calibrated_steps=num_inference_steps)``
    takes. A step cache turned on by ``enable_cache`` is off during calibration (turned back on after) so that the
    generations are exact.
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("calibration needs at least one prompt")
    if num_inference_steps < 2:
        raise ValueError(f"calibration needs at least 2 steps (the first has no ratio), got {num_inference_steps}")
    transformer = pipe.transformer
    cache = transformer.cache
    transformer.disable_cache()
    recorder = MagnitudeRecorder()
    handle = transformer.wrap_stage("visual_blocks", recorder)
    try:
        for index, prompt in enumerate(prompts):
            generated = len(recorder.generations)
            pipe(
                prompt=prompt,  # by name: the editing pipelines take the image first
                num_inference_steps=num_inference_steps,
                generator=torch.Generator("cpu").manual_seed(seed + index),
                output_type="latent",
                **generation,
            )
            if len(recorder.generations) != generated + 1:
                raise RuntimeError(f"prompt {index + 1}: the generation made no recorded model call")
    finally:
        handle.remove()
        if cache is not None:
            transformer.enable_cache(cache.config)
    ratios = average_ratios(recorder.generations)
    for branch, values in ratios.items():
        if len(values) != num_inference_steps - 1:
            raise RuntimeError(f"{branch}: recorded {len(values)} ratios for {num_inference_steps} steps")
    return ratios


def save_ratios(path: str | os.PathLike, ratios: Mapping[str, Sequence[float]], metadata: Mapping[str, Any] = ()):
    """Write ``ratios`` (per branch, as :func:`calibrate` returns them) and ``metadata`` (JSON values: model,
    prompts, ...) to ``path`` as a ratios file, atomically (a temporary name, then a rename). Returns the path."""
    from kandinsky5.io.atomic import atomic_path

    ratios = {str(Branch(name)): [float(r) for r in values] for name, values in ratios.items()}
    lengths = {len(values) for values in ratios.values()}
    if len(lengths) != 1 or not all(math.isfinite(r) for values in ratios.values() for r in values):
        raise ValueError("ratios need the same number of finite values for every branch")
    reserved = {"format", "version", "steps", "ratios"} & set(metadata)
    if reserved:
        raise ValueError(f"metadata may not set {sorted(reserved)}")
    document = {"format": FILE_FORMAT, "version": FILE_VERSION, "steps": lengths.pop() + 1, "ratios": ratios}
    document.update(metadata)
    path = Path(path)
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def read_ratios_file(path: str | os.PathLike) -> dict[str, Any]:
    """The whole JSON document of a ratios file, checked (``ValueError`` naming the file when it is not one)."""
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not a MagCache ratios file (not JSON: {err})") from err
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a MagCache ratios file (not text)") from err
    if not isinstance(document, dict) or "ratios" not in document or "steps" not in document:
        raise ValueError(f'{path}: not a MagCache ratios file (needs "ratios" and "steps")')
    if document.get("format", FILE_FORMAT) != FILE_FORMAT or document.get("version", FILE_VERSION) != FILE_VERSION:
        raise ValueError(f"{path}: format {document.get('format')!r} version {document.get('version')!r} is unknown")
    return document


def load_ratios(path: str | os.PathLike) -> dict[str, Any]:
    """A ratios file as ``MagCacheConfig``'s arguments: ``{"ratios": ..., "calibrated_steps": N}``, so that
    ``MagCacheConfig(**load_ratios(path), threshold=...)`` uses them. The ratios are checked as the config does
    (``ValueError`` naming the file)."""
    from kandinsky5.sampling.caches.magcache import MagCacheConfig

    document = read_ratios_file(path)
    ratios, steps = document["ratios"], document["steps"]
    if isinstance(ratios, Mapping):
        ratios = {name: tuple(values) for name, values in ratios.items()}
    elif isinstance(ratios, list):
        ratios = tuple(ratios)
    arguments = {"ratios": ratios, "calibrated_steps": steps}
    try:
        if not isinstance(steps, int) or isinstance(steps, bool):
            raise ValueError(f"steps must be an integer, got {steps!r}")
        MagCacheConfig(**arguments)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path}: bad MagCache ratios: {err}") from err
    return arguments
