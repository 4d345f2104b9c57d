"""MagCache with the rest of the engine: image-to-video, NABLA, fused QKV, compiled blocks, model offload and the run
control's cancel. Threshold 0 (never skip) must leave each path's output bit-equal to the same path without the
cache; a high threshold must skip calls and still finish."""

import contextlib

import pytest
import torch

from kandinsky5 import GenerationCancelled, Kandinsky5T2VPipeline, MagCacheConfig, RunControl
from kandinsky5.sampling.caches import official_ratios
from kandinsky5.variants import get_variant

STEPS = 10
SMALL = dict(prompt="a cat", height=32, width=48, num_frames=5, num_inference_steps=STEPS, output_type="latent")
RATIOS = official_ratios(get_variant("lite-sft-5s"))
SKIPPING = 10.0  # a threshold that skips wherever the rule allows


def run(pipe, *condition, **overrides):
    return pipe(*condition, **dict(SMALL, generator=torch.Generator().manual_seed(0), **overrides)).frames


@contextlib.contextmanager
def cached(pipe, threshold):
    cache = pipe.transformer.enable_cache(MagCacheConfig(ratios=RATIOS, threshold=threshold))
    try:
        yield cache
    finally:
        pipe.transformer.disable_cache()


def check_exact_and_skipping(pipe, *condition):
    exact = run(pipe, *condition)
    with cached(pipe, 0.0) as cache:
        never = run(pipe, *condition)
        assert cache.skipped_calls == 0 and cache.total_calls == 2 * STEPS
    assert torch.equal(never, exact)
    with cached(pipe, SKIPPING) as cache:
        approximate = run(pipe, *condition)
        assert 0 < cache.skipped_calls < cache.total_calls
    assert torch.isfinite(approximate).all() and not torch.equal(approximate, exact)


def test_image_to_video(our_i2v_pipeline):
    check_exact_and_skipping(our_i2v_pipeline, torch.full((3, 32, 48), 0.5))


def test_nabla(reference_nabla_checkpoint):
    pipe = Kandinsky5T2VPipeline.from_pretrained(reference_nabla_checkpoint[0])
    pipe.set_progress_bar_config(disable=True)
    exact = run(pipe, height=128, width=128)
    with cached(pipe, 0.0):
        assert torch.equal(run(pipe, height=128, width=128), exact)
    with cached(pipe, SKIPPING) as cache:
        assert torch.isfinite(run(pipe, height=128, width=128)).all() and cache.skipped_calls > 0


def test_fused_projections_and_compiled_blocks(reference_checkpoint):
    pipe = Kandinsky5T2VPipeline.from_pretrained(reference_checkpoint[0])
    pipe.set_progress_bar_config(disable=True)
    pipe.fuse_qkv_projections()
    pipe.transformer.compile(backend="eager")  # the regional compile path, without inductor's compile time
    check_exact_and_skipping(pipe)


def test_model_offload(reference_checkpoint):
    pipe = Kandinsky5T2VPipeline.from_pretrained(reference_checkpoint[0])
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_model_cpu_offload(device="cpu")
    check_exact_and_skipping(pipe)


def test_cancel_leaves_no_cache_state_behind(our_pipeline):
    with cached(our_pipeline, SKIPPING):
        first = run(our_pipeline)
        control = RunControl()
        handle = our_pipeline.transformer.register_forward_pre_hook(
            lambda *_: control.cancel()  # during the first step
        )
        try:
            with pytest.raises(GenerationCancelled):
                run(our_pipeline, control=control)
        finally:
            handle.remove()
        assert torch.equal(run(our_pipeline), first)  # the next generation starts from fresh state
