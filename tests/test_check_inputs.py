"""Each invalid input raises ValueError naming the parameter, before any encoding or sampling."""

import logging

import pytest
import torch

GOOD = dict(prompt="a cat", height=32, width=48, num_frames=5, num_inference_steps=2, output_type="latent")
EMBEDS = torch.zeros(1, 3, 32)


@pytest.fixture
def guarded_pipeline(our_pipeline, monkeypatch):
    """Our pipeline with encoding and the transformer made to fail if reached."""

    def forbidden(*args, **kwargs):
        raise AssertionError("expensive work started before the input was validated")

    monkeypatch.setattr(our_pipeline, "encode_prompt", forbidden)
    monkeypatch.setattr(our_pipeline.transformer, "forward", forbidden)
    return our_pipeline


CASES = [
    ("height", dict(height=30)),
    ("width", dict(width=50)),
    ("prompt", dict(prompt=3)),
    ("prompt", dict(prompt=["ok", 3])),
    ("negative_prompt", dict(negative_prompt=5)),
    ("prompt_embeds_clip", dict(prompt=None, prompt_embeds_qwen=EMBEDS)),
    ("negative_prompt_cu_seqlens", dict(negative_prompt_embeds_qwen=EMBEDS)),
    ("prompt", dict(prompt=None)),
    ("callback_on_step_end_tensor_inputs", dict(callback_on_step_end_tensor_inputs=["latents", "noise"])),
    ("max_sequence_length", dict(max_sequence_length=1025)),
    ("max_sequence_length", dict(max_sequence_length=0)),
    ("num_inference_steps", dict(num_inference_steps=0)),
    ("num_frames", dict(num_frames=0)),
    ("num_videos_per_prompt", dict(num_videos_per_prompt=0)),
    ("output_type", dict(output_type="gif")),
    ("guidance_scale", dict(guidance_scale="high")),
    ("negative_prompt", dict(prompt=["a", "b"], negative_prompt=["only one"])),
    ("generator", dict(generator=[torch.Generator(), torch.Generator(), torch.Generator()])),
    ("generator", dict(generator=42)),
    ("latents", dict(latents=[1, 2])),
]


@pytest.mark.parametrize("parameter,overrides", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_invalid_input_names_parameter(guarded_pipeline, parameter, overrides):
    with pytest.raises(ValueError, match=parameter):
        guarded_pipeline(**dict(GOOD, **overrides))


def test_check_inputs_directly(our_pipeline):
    with pytest.raises(ValueError, match="height"):
        our_pipeline.check_inputs("a", None, 33, 48)
    our_pipeline.check_inputs("a", None, 32, 48)  # valid input passes


def test_num_frames_rounded_with_warning(our_pipeline, caplog):
    with caplog.at_level(logging.WARNING):
        latents = our_pipeline(**dict(GOOD, num_frames=7, guidance_scale=1.0)).frames
    assert latents.shape[1] == 2  # 7 -> 5 frames -> 2 latent frames, as the reference rounds
    assert any("num_frames" in r.getMessage() for r in caplog.records)
