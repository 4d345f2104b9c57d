"""Each invalid input raises ValueError naming the parameter, before any encoding or sampling."""

import logging

import pytest
import torch

GOOD = dict(prompt="a cat", height=32, width=48, num_frames=5, num_inference_steps=2, output_type="latent")
EMBEDS = torch.zeros(1, 3, 32)
# precomputed text of the tiny model's widths (Qwen 32, CLIP 24), three tokens
TEXT = dict(prompt_embeds_qwen=EMBEDS, prompt_embeds_clip=torch.zeros(1, 24), prompt_cu_seqlens=torch.tensor([0, 3]))


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
    ("guidance_scale", dict(guidance_scale=float("nan"))),
    ("height", dict(height="32")),
    ("guidance_scale", dict(guidance_scale=True)),
    ("prompt", dict(prompt="")),
    ("prompt", dict(prompt=["ok", "  "])),
    ("callback_on_step_end", dict(callback_on_step_end=5)),
    ("generator", dict(generator=[])),
    ("max_sequence_length", dict(max_sequence_length="long")),
    ("num_inference_steps", dict(num_inference_steps=2.5)),
    ("prompt_cu_seqlens", dict(prompt=None, **dict(TEXT, prompt_cu_seqlens=torch.tensor([1, 3])))),
    ("prompt_cu_seqlens", dict(prompt=None, **dict(TEXT, prompt_cu_seqlens=torch.tensor([0, 4])))),
    ("prompt_embeds_qwen", dict(prompt=None, **dict(TEXT, prompt_embeds_qwen=torch.zeros(1, 3, 31)))),
    ("prompt_embeds_clip", dict(prompt=None, **dict(TEXT, prompt_embeds_clip=torch.zeros(1, 23)))),
    ("prompt_cu_seqlens", dict(prompt=None, **dict(TEXT, prompt_cu_seqlens=[0, 3]))),
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


def test_numpy_integers_and_floats_are_numbers(our_pipeline):
    import numpy as np

    sizes = dict(height=np.int64(32), width=np.int32(48), num_frames=np.int64(5), num_inference_steps=np.int16(1))
    got = our_pipeline(**dict(GOOD, **sizes, guidance_scale=np.float32(1.0))).frames
    assert got.shape == (1, 2, 4, 6, 16)
