"""Classifier-free guidance batched into one transformer call equals the reference's two calls (float32).

A batch of two sums in other orders than two batches of one, so frames agree within tolerances.PIPELINE_BF16_FLIP.
"""

import pytest
import torch
from tolerances import PIPELINE_BF16_FLIP, assert_close

SMALL = dict(height=32, width=48, num_frames=5, num_inference_steps=3, guidance_scale=5.0, output_type="np")


@pytest.fixture
def toggle(our_pipeline):
    yield our_pipeline
    our_pipeline.batched_guidance = False


def frames(pipe, batched, videos=1, **kwargs):
    pipe.batched_guidance = batched
    generator = [torch.Generator().manual_seed(i) for i in range(videos)]  # fresh: generators are consumed
    args = dict(SMALL, prompt="a red fox", generator=generator)
    args.update(kwargs)
    return pipe(**args).frames


@pytest.mark.parametrize(
    "kwargs",
    [
        {},  # prompt shorter than the default negative prompt: padded and masked
        {"negative_prompt": "a red fox"},  # equal lengths: no mask
        {"prompt": ["a red fox", "two astronauts playing chess on the Moon"], "num_videos_per_prompt": 2},
    ],
    ids=["padded", "equal-length", "mixed-batch"],
)
def test_batched_guidance_equals_two_calls(toggle, kwargs):
    if "prompt" in kwargs:
        kwargs = dict(kwargs, videos=4)
    two_calls = frames(toggle, False, **kwargs)
    one_call = frames(toggle, True, **kwargs)
    assert_close(one_call, two_calls, PIPELINE_BF16_FLIP)


def test_batched_guidance_uses_one_transformer_call_per_step(toggle, monkeypatch):
    calls = []
    forward = toggle.transformer.forward

    def counting(*args, **kwargs):
        calls.append(kwargs["hidden_states"].shape[0])
        return forward(*args, **kwargs)

    monkeypatch.setattr(toggle.transformer, "forward", counting)
    frames(toggle, True, output_type="latent")
    assert calls == [2, 2, 2]


def test_batched_guidance_image_to_video(our_i2v_pipeline):
    from PIL import Image

    image = Image.new("RGB", (48, 32), (200, 80, 40))
    kwargs = dict(SMALL, num_frames=17, prompt="a red fox")
    try:
        our_i2v_pipeline.batched_guidance = False
        two_calls = our_i2v_pipeline(image, generator=torch.Generator().manual_seed(0), **kwargs).frames
        our_i2v_pipeline.batched_guidance = True
        one_call = our_i2v_pipeline(image, generator=torch.Generator().manual_seed(0), **kwargs).frames
    finally:
        our_i2v_pipeline.batched_guidance = False
    assert_close(one_call, two_calls, PIPELINE_BF16_FLIP)
