"""MagCache: its skip schedule against an independent implementation of the original's rule, and its effect on a
tiny pipeline. The cache approximates: only threshold 0 reproduces the exact path, and a cached generation is
checked for being finite and loosely close to the exact one, not equal."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kandinsky5 import MagCacheConfig
from kandinsky5.models.forward_context import Branch, ForwardContext
from kandinsky5.sampling.caches import MagCache, official_ratios
from kandinsky5.sampling.caches.magcache import OFFICIAL_RATIOS_KEYS
from kandinsky5.variants import get_variant

RATIOS_JSON = Path(__file__).resolve().parents[2] / "shared" / "reference" / "magcache_ratios.json"
PACKAGED_JSON = Path(__file__).resolve().parents[1] / "kandinsky5" / "sampling" / "caches" / "magcache_ratios.json"
# the image models' ratios (the original's text-to-image config), packaged apart from the reference data's copy
PACKAGED_IMAGE_JSON = PACKAGED_JSON.with_name("magcache_image_ratios.json")
OFFICIAL = json.loads(PACKAGED_JSON.read_text())["ratios"] | json.loads(PACKAGED_IMAGE_JSON.read_text())["ratios"]
ORIGINAL_SETTINGS = dict(threshold=0.12, max_skip_steps=2, retention_ratio=0.2)
SMALL = dict(height=32, width=48, num_frames=5, guidance_scale=5.0, output_type="latent", prompt="a red fox")


def reference_schedule(ratios, num_steps, no_cfg, threshold=0.12, k=2, retention=0.2):
    """The original's loop, written from its definition: one call counter over ``2 * num_steps`` calls (condition
    even, negative odd; +2 per call without guidance), [1, 1] prepended to the ratios, per-branch nearest
    resampling when the counts differ. Returns ``(step, branch index, skipped)`` per call."""
    mag = np.array([1.0, 1.0] + list(ratios))
    if len(mag) != 2 * num_steps:

        def nearest(values, n):
            if n == 1:
                return values[-1:]
            return values[np.round(np.arange(n) * ((len(values) - 1) / (n - 1))).astype(int)]

        mag = np.stack([nearest(mag[0::2], num_steps), nearest(mag[1::2], num_steps)], axis=1).reshape(-1)
    total = 2 * num_steps
    acc_ratio, acc_err, acc_steps = [1.0, 1.0], [0.0, 0.0], [0, 0]
    schedule, cnt = [], 0
    while cnt < total:
        b, skip = cnt % 2, False
        if cnt >= int(total * retention):
            acc_ratio[b] *= mag[cnt]
            acc_steps[b] += 1
            acc_err[b] += abs(1 - acc_ratio[b])
            if acc_err[b] < threshold and acc_steps[b] <= k:
                skip = True
            else:
                acc_ratio[b], acc_err[b], acc_steps[b] = 1.0, 0.0, 0
        schedule.append((cnt // 2, b, skip))
        cnt += 2 if no_cfg else 1
    return schedule


def drive(cache: MagCache, num_steps: int, branches_per_step, batched: bool = False):
    """Synthetic transformer calls through ``cache``; returns ``(step, branch index, skipped)`` per branch call,
    skipped read off whether the fake blocks ran, and checks each skipped output is input + cached residual."""
    calls = [0]

    def run(visual, inputs):
        calls[0] += 1
        return visual + float(calls[0])  # a different residual per computed call

    residual = {}
    observed = []
    for step in range(num_steps):
        groups = [tuple(branches_per_step)] if batched else [(b,) for b in branches_per_step]
        for branches in groups:
            visual = torch.randint(-8, 8, (len(branches), 3, 4)).float()  # integers: exact sums
            before = calls[0]
            out = cache(run, visual, None, context=ForwardContext(branches, step, num_steps))
            ran = calls[0] > before
            for branch, x, y in zip(branches, visual.chunk(len(branches)), out.chunk(len(branches)), strict=True):
                skipped = not (ran and torch.equal(y, x + float(calls[0])))
                if skipped:
                    assert torch.equal(y, x + residual[branch])
                else:
                    residual[branch] = float(calls[0])
                observed.append((step, branch is Branch.NEGATIVE, skipped))
    return [(s, int(b), k) for s, b, k in observed]


def test_packaged_ratios_equal_the_reference_file():
    assert json.loads(PACKAGED_JSON.read_text()) == json.loads(RATIOS_JSON.read_text())


def test_every_official_key_is_mapped():
    mapped = {key for keys in OFFICIAL_RATIOS_KEYS.values() for key in keys.values()}
    assert mapped == set(OFFICIAL)
    for short_name in OFFICIAL_RATIOS_KEYS:
        assert get_variant(short_name).short_name == short_name


@pytest.mark.parametrize("num_steps", [50, 16, 100])
@pytest.mark.parametrize("key", sorted(OFFICIAL))
def test_schedule_matches_independent_reference(key, num_steps):
    ratios = OFFICIAL[key]
    no_cfg = "nocfg" in key
    expected = reference_schedule(ratios, num_steps, no_cfg)
    cache = MagCache(MagCacheConfig(ratios=ratios, **ORIGINAL_SETTINGS))
    branches = (Branch.CONDITION,) if no_cfg else (Branch.CONDITION, Branch.NEGATIVE)
    observed = drive(cache, num_steps, branches)
    assert observed == expected
    assert [(s, int(b is Branch.NEGATIVE), k) for s, b, k in cache.decisions] == expected
    assert cache.skipped_calls == sum(k for *_, k in expected) > 0
    assert cache.total_calls == len(expected)
    # a second generation through the same cache starts fresh
    assert drive(cache, num_steps, branches) == expected


@pytest.mark.parametrize("key", ["lite-t2v-sft-5s", "pro-t2v-sft-5s-hd"])
@pytest.mark.parametrize("num_steps", [50, 16])
def test_batched_decisions_equal_two_calls_synthetic(key, num_steps):
    both = (Branch.CONDITION, Branch.NEGATIVE)
    two = drive(MagCache(MagCacheConfig(ratios=OFFICIAL[key])), num_steps, both)
    one = drive(MagCache(MagCacheConfig(ratios=OFFICIAL[key])), num_steps, both, batched=True)
    assert one == two


def test_per_branch_ratios_equal_interleaved():
    flat = OFFICIAL["lite-t2v-sft-5s"]
    per_branch = MagCacheConfig(ratios={"condition": flat[0::2], "negative": flat[1::2]})
    interleaved = MagCacheConfig(ratios=flat)
    for branch in Branch:
        for steps in (50, 16, 100, 1):
            assert per_branch.ratios_at(branch, steps) == interleaved.ratios_at(branch, steps)
    with pytest.raises(ValueError, match="2 \\* \\(calibrated_steps - 1\\)"):
        MagCacheConfig(ratios=flat[:-1])
    with pytest.raises(ValueError, match="negative"):
        MagCacheConfig(ratios={"condition": flat[0::2]}).ratios_at(Branch.NEGATIVE, 50)


def test_no_context_runs_the_blocks():
    cache = MagCache(MagCacheConfig(ratios=OFFICIAL["lite-t2v-sft-5s"], threshold=100.0))
    visual = torch.zeros(1, 2, 2)
    for _ in range(3):
        assert torch.equal(cache(lambda v, i: v + 1, visual, None, context=None), visual + 1)
    assert cache.total_calls == 0


# ---- the tiny pipeline ----


@pytest.fixture
def pipe(our_pipeline):
    variant = our_pipeline.model_variant
    yield our_pipeline
    our_pipeline.transformer.disable_cache()
    our_pipeline.batched_guidance = False
    our_pipeline.model_variant = variant


def generate(pipe, steps=10, seed=0):
    return pipe(**SMALL, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed)).frames


def config(**settings):
    return MagCacheConfig(ratios=official_ratios(get_variant("lite-sft-5s")), **settings)


def test_threshold_zero_is_bit_equal(pipe):
    exact = generate(pipe)
    cache = pipe.transformer.enable_cache(config(threshold=0.0))
    cached = generate(pipe)
    assert cache.skipped_calls == 0 and cache.total_calls == 20
    assert torch.equal(cached, exact)


def test_skipped_calls_run_no_visual_block_and_state_is_fresh(pipe):
    runs = [0]
    handle = pipe.transformer.visual_transformer_blocks[0].register_forward_pre_hook(
        lambda m, a: runs.__setitem__(0, runs[0] + 1)
    )
    try:
        cache = pipe.transformer.enable_cache(config(threshold=10.0))
        first = generate(pipe)
        first_decisions = list(cache.decisions)
        first_runs = runs[0]
        runs[0] = 0
        second = generate(pipe)
    finally:
        handle.remove()
    assert cache.total_calls == 20 and cache.skipped_calls > 0
    assert first_runs == cache.total_calls - cache.skipped_calls == runs[0]
    assert cache.decisions == first_decisions
    assert torch.equal(second, first)
    assert torch.isfinite(first).all()


def test_cached_output_approximates_the_exact_path(pipe):
    exact = generate(pipe)
    cache = pipe.transformer.enable_cache(config(threshold=10.0))
    cached = generate(pipe)
    assert cache.skipped_calls > 0
    assert not torch.equal(cached, exact)
    assert torch.isfinite(cached).all()
    relative = ((cached - exact).norm() / exact.norm()).item()
    print(f"MagCache (threshold 10, {cache.skipped_calls}/{cache.total_calls} skipped): relative L2 {relative:.3g}")
    assert relative < 1.0  # an approximation, loosely bounded: a random tiny model, not a calibrated one


def test_batched_guidance_gives_the_same_decisions(pipe):
    cache = pipe.transformer.enable_cache(config(threshold=0.5))
    two_calls = generate(pipe)
    two_call_decisions = list(cache.decisions)
    pipe.batched_guidance = True
    batched = generate(pipe)
    assert cache.decisions == two_call_decisions
    assert 0 < cache.skipped_calls < cache.total_calls
    assert torch.isfinite(batched).all() and batched.shape == two_calls.shape


def test_enable_replaces_and_disable_removes(pipe):
    transformer = pipe.transformer
    first = transformer.enable_cache(config())
    second = transformer.enable_cache(config(threshold=0.3))
    wrappers = list(transformer._stage_wrappers["visual_blocks"].values())
    assert wrappers == [second] and transformer.cache is second and first is not second
    transformer.disable_cache()
    assert not transformer._stage_wrappers["visual_blocks"] and transformer.cache is None


def test_enable_magcache_picks_the_variant_ratios(pipe):
    pipe.model_variant = get_variant("lite-sft-5s")
    cache = pipe.enable_magcache(threshold=0.2)
    assert cache.config.threshold == 0.2
    assert cache.config.ratios == tuple(OFFICIAL["lite-t2v-sft-5s"])
    pipe.model_variant = get_variant("pro-sft-5s")
    assert pipe.enable_magcache().config.ratios == tuple(OFFICIAL["pro-t2v-sft-5s-hd"])
    assert pipe.enable_magcache(resolution_class="512").config.ratios == tuple(OFFICIAL["pro-t2v-sft-5s"])


def test_variant_without_ratios_is_a_clear_error(pipe):
    pipe.model_variant = get_variant("lite-distilled-5s")
    with pytest.raises(ValueError, match="lite-distilled-5s has no official MagCache ratios.*calibration"):
        pipe.enable_magcache()
    pipe.model_variant = None
    with pytest.raises(ValueError, match="no known variant"):
        pipe.enable_magcache()
    assert pipe.transformer.cache is None
