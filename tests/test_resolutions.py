"""Sizes: the RoPE scale rule, the trained resolution classes, errors for sizes a model cannot represent (before
any encoding) and one warning for sizes it was not trained at."""

import logging

import pytest
import torch

from kandinsky5 import Kandinsky5T2VPipeline, resolutions
from kandinsky5.pipelines.base import Kandinsky5PipelineBase
from kandinsky5.resolutions import (
    RESOLUTION_512,
    RESOLUTION_1024,
    ROPE_SCALE_512,
    ROPE_SCALE_1024,
    Size,
    SizeError,
    check_size,
    closest_trained_size,
    resolution_class_of,
    rope_scale_factor,
    untrained_size_message,
)
from kandinsky5.variants import get_variant

SMALL = dict(prompt="a cat", height=32, width=48, num_frames=5, num_inference_steps=1, output_type="latent")


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """Each test sees the first warning for a size (they are given once per model and size in a process)."""
    monkeypatch.setattr(resolutions, "_warned_untrained", set())


@pytest.mark.parametrize(
    "height,width,expected",
    [
        (512, 768, ROPE_SCALE_512),
        (480, 854, ROPE_SCALE_512),  # both ends of the range are inside
        (854, 480, ROPE_SCALE_512),
        (464, 768, ROPE_SCALE_1024),  # one side below 480
        (512, 864, ROPE_SCALE_1024),  # one side above 854
        (768, 1280, ROPE_SCALE_1024),
        (1024, 1024, ROPE_SCALE_1024),
        (32, 48, ROPE_SCALE_1024),  # tiny sizes are outside the 512 range too, as in the reference
    ],
)
def test_rope_scale_rule_both_branches(height, width, expected):
    assert rope_scale_factor(height, width) == expected
    assert Kandinsky5PipelineBase._get_scale_factor(height, width) == expected  # the pipeline delegates


def test_rope_rule_matches_the_reference():
    from diffusers import Kandinsky5T2VPipeline as Reference

    for height, width in [(512, 768), (480, 854), (464, 768), (512, 864), (1024, 1024), (640, 1408)]:
        assert tuple(Reference._get_scale_factor(None, height, width)) == rope_scale_factor(height, width)


def test_trained_sizes_fall_in_their_own_class_and_suit_nabla():
    for resolution_class in (RESOLUTION_512, RESOLUTION_1024):
        for size in resolution_class.sizes:
            assert resolution_class_of(*size) is resolution_class
            check_size(*size, 241, nabla=True)  # every trained size is a multiple of 128 px


@pytest.mark.parametrize(
    "parameter,kwargs",
    [
        ("height", dict(height=500)),
        ("width", dict(width=0)),
        ("width", dict(width=-16)),
        ("height", dict(height=512.0)),
        ("height", dict(height=2064)),  # 129 RoPE positions
        ("width", dict(width=2064)),
        ("num_frames", dict(num_frames=513)),  # 129 latent frames
        ("height", dict(height=576, nabla=True)),  # 36 tokens: not whole 8x8 tiles
        ("width", dict(width=832, nabla=True)),
    ],
)
def test_unrepresentable_sizes_name_the_parameter(parameter, kwargs):
    args = dict(height=512, width=768, num_frames=121) | kwargs
    with pytest.raises(SizeError, match=f"`{parameter}`") as caught:
        check_size(**args)
    assert caught.value.parameter == parameter


def test_largest_representable_sizes_pass():
    check_size(2048, 2048, 509)
    check_size(2048, 2048, 509, nabla=True)
    check_size(576, 832, 121)  # untrained but fine for dense attention


def test_untrained_size_names_the_trained_sizes_of_its_class():
    lite = get_variant("lite-sft-5s")
    pro = get_variant("pro-sft-5s")
    assert untrained_size_message(512, 768, lite.trained_classes, "lite") is None
    assert untrained_size_message(768, 1280, pro.trained_classes, "pro") is None
    assert untrained_size_message(512, 768, pro.trained_classes, "pro") is None  # Pro was trained at both
    near_512 = untrained_size_message(480, 832, pro.trained_classes, "pro")
    assert "480x832" in near_512 and "512x768" in near_512 and "1024x1024" not in near_512
    near_1024 = untrained_size_message(1024, 1536, pro.trained_classes, "pro")
    assert "768x1280" in near_1024 and "512x768" not in near_1024
    # Lite was trained at the 512 class only: a 1024-class size names the 512 sizes
    lite_hd = untrained_size_message(1024, 1024, lite.trained_classes, "lite")
    assert "512x768" in lite_hd and "768x1280" not in lite_hd


def test_untrained_size_warns_once_per_model_and_size(caplog):
    lite = get_variant("lite-sft-5s")
    with caplog.at_level(logging.WARNING):
        assert lite.warn_if_untrained(480, 832)
        assert lite.warn_if_untrained(480, 832)
        assert not lite.warn_if_untrained(512, 768)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "lite-sft-5s" in messages[0] and "512x768" in messages[0]


def test_pipeline_warns_for_an_untrained_size(our_pipeline, monkeypatch, caplog):
    monkeypatch.setattr(our_pipeline, "model_variant", get_variant("lite-nocfg-5s"))
    with caplog.at_level(logging.WARNING):
        our_pipeline(**SMALL)
        our_pipeline(**SMALL)
    untrained = [r.getMessage() for r in caplog.records if "trained" in r.getMessage()]
    assert len(untrained) == 1
    assert "32x48" in untrained[0] and "512x512, 512x768, 768x512" in untrained[0]


def test_unknown_checkpoint_gets_no_training_warning(our_pipeline, caplog):
    assert our_pipeline.model_variant is None
    with caplog.at_level(logging.WARNING):
        our_pipeline(**SMALL, guidance_scale=1.0)
    assert not [r for r in caplog.records if "trained" in r.getMessage()]


@pytest.fixture
def guarded(our_pipeline, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("expensive work started before the size was validated")

    monkeypatch.setattr(our_pipeline, "encode_prompt", forbidden)
    monkeypatch.setattr(our_pipeline.transformer, "forward", forbidden)
    return our_pipeline


@pytest.mark.parametrize(
    "parameter,overrides",
    [("height", dict(height=2064)), ("width", dict(width=2064)), ("num_frames", dict(num_frames=600))],
)
def test_pipeline_refuses_sizes_beyond_the_rope_tables_before_encoding(guarded, parameter, overrides):
    with pytest.raises(ValueError, match=parameter):
        guarded(**(SMALL | overrides))


def test_nabla_pipeline_refuses_partial_tiles_before_encoding(reference_nabla_checkpoint, monkeypatch):
    pipe = Kandinsky5T2VPipeline.from_pretrained(reference_nabla_checkpoint[0])
    monkeypatch.setattr(pipe, "encode_prompt", lambda *a, **k: pytest.fail("encoded before validating"))
    for parameter, size in (("height", dict(height=192, width=128)), ("width", dict(height=128, width=64))):
        with pytest.raises(ValueError, match=f"`{parameter}` must be a multiple of 128"):
            pipe(**(SMALL | size))


def test_nabla_pipeline_runs_at_whole_tiles(reference_nabla_checkpoint):
    pipe = Kandinsky5T2VPipeline.from_pretrained(reference_nabla_checkpoint[0])
    pipe.set_progress_bar_config(disable=True)
    latents = pipe(**(SMALL | dict(height=128, width=256, num_frames=1, guidance_scale=1.0))).frames
    assert latents.shape == (1, 1, 16, 32, 16) and torch.isfinite(latents).all()


def test_closest_trained_size_follows_the_aspect_ratio():
    assert closest_trained_size(1.0, RESOLUTION_512) == Size(512, 512)
    assert closest_trained_size(16 / 9, RESOLUTION_512) == Size(512, 768)
    assert closest_trained_size(9 / 16, RESOLUTION_512) == Size(768, 512)
    assert closest_trained_size(16 / 9, RESOLUTION_1024) == Size(768, 1280)
    assert closest_trained_size(2.4, RESOLUTION_1024) == Size(640, 1408)
    assert closest_trained_size(2 / 3, RESOLUTION_1024) == Size(1280, 768)
