"""The per-call run control: progress events in order, cancellation without decoding, previews, diffusers' interrupt.

Counts are checked against what the call must do: one text-encoding phase, one image-encoding phase for
image-to-video, ``num_inference_steps`` step events, one decoding phase; guidance on or off and two-call or
batched guidance change the transformer calls, not the events.
"""

import numpy as np
import pytest
import torch

from kandinsky5 import GenerationCancelled, RunControl
from kandinsky5.models.forward_context import Branch
from kandinsky5.sampling.control import Phase
from kandinsky5.sampling.preview import LatentPreviewer

STEPS = 3
SMALL = dict(prompt="a cat", height=32, width=48, num_frames=5, num_inference_steps=STEPS, output_type="np")


def seeded(**overrides):
    return dict(SMALL, generator=torch.Generator().manual_seed(0), **overrides)


def expected_events(image_to_video: bool) -> list[tuple[Phase, int, int]]:
    events = [(Phase.ENCODE_TEXT, 0, 1), (Phase.ENCODE_TEXT, 1, 1)]
    if image_to_video:
        events += [(Phase.ENCODE_IMAGE, 0, 1), (Phase.ENCODE_IMAGE, 1, 1)]
    events += [(Phase.DENOISE, k, STEPS) for k in range(STEPS + 1)]
    return events + [(Phase.DECODE, 0, 1), (Phase.DECODE, 1, 1)]


@pytest.fixture(params=["t2v", "i2v"])
def pipeline_and_condition(request, our_pipeline, our_i2v_pipeline):
    if request.param == "t2v":
        return our_pipeline, ()
    return our_i2v_pipeline, (np.full((32, 48, 3), 0.5, dtype=np.float32),)


@pytest.mark.parametrize("guidance_scale,batched", [(1.0, False), (5.0, False), (5.0, True)])
def test_progress_events_arrive_in_order(pipeline_and_condition, guidance_scale, batched):
    pipe, condition = pipeline_and_condition
    events, branches = [], []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: branches.append(kwargs["context"].branches), with_kwargs=True
    )
    pipe.batched_guidance = batched
    try:
        pipe(*condition, **seeded(guidance_scale=guidance_scale), control=RunControl(on_progress=events.append))
    finally:
        pipe.batched_guidance = False
        handle.remove()
    assert [(e.phase, e.completed, e.total) for e in events] == expected_events(bool(condition))
    elapsed = [e.elapsed_s for e in events]
    assert elapsed == sorted(elapsed) and elapsed[0] >= 0
    denoise = [e for e in events if e.phase is Phase.DENOISE]
    assert denoise[0].remaining_s is None and all(e.remaining_s >= 0 for e in denoise[1:])
    assert denoise[-1].remaining_s == 0 and denoise[-1].finished
    # which branch each transformer call computed, step by step
    if guidance_scale == 1.0:
        per_step = [(Branch.CONDITION,)]
    elif batched:
        per_step = [(Branch.CONDITION, Branch.NEGATIVE)]
    else:
        per_step = [(Branch.CONDITION,), (Branch.NEGATIVE,)]
    assert branches == per_step * STEPS


@pytest.mark.parametrize("cancel_at_step", [1, 2])
def test_cancel_during_a_step_raises_decodes_nothing_and_leaves_the_pipeline_usable(
    our_pipeline, monkeypatch, cancel_at_step
):
    decoded, steps_started = [], []
    decode = our_pipeline.decode_latents
    monkeypatch.setattr(our_pipeline, "decode_latents", lambda latents: decoded.append(latents) or decode(latents))
    control = RunControl()

    def count_calls(module, args):
        steps_started.append(len(steps_started))
        if len(steps_started) == cancel_at_step:
            control.cancel()  # as another thread would, while step k runs

    handle = our_pipeline.transformer.register_forward_pre_hook(count_calls)
    try:
        with pytest.raises(GenerationCancelled):
            our_pipeline(**seeded(guidance_scale=1.0), control=control)
    finally:
        handle.remove()
    assert len(steps_started) == cancel_at_step  # step k finished; step k + 1 never started
    assert decoded == []
    assert control.cancelled
    # usable: the same call afterwards equals a call on a fresh control
    first = our_pipeline(**seeded(guidance_scale=1.0)).frames
    second = our_pipeline(**seeded(guidance_scale=1.0), control=RunControl()).frames
    assert len(decoded) == 2 and np.array_equal(first, second)


def test_cancel_before_the_call_stops_before_encoding(our_pipeline, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("work started after cancel")

    monkeypatch.setattr(our_pipeline, "encode_prompt", forbidden)
    control = RunControl()
    control.cancel()
    with pytest.raises(GenerationCancelled):
        our_pipeline(**seeded(), control=control)


def test_preview_callback_receives_frames_of_the_right_shape(pipeline_and_condition):
    pipe, condition = pipeline_and_condition
    previews = []
    control = RunControl(on_preview=lambda step, frames: previews.append((step, frames)), preview_every=2)
    pipe(*condition, **seeded(num_inference_steps=4, guidance_scale=1.0), control=control)
    assert [step for step, _ in previews] == [2, 4]
    latent_frames, latent_height, latent_width = 2, 32 // 8, 48 // 8
    for _, frames in previews:
        assert frames.dtype == np.uint8 and frames.shape == (1, latent_frames, latent_height, latent_width, 3)


def test_preview_is_the_linearised_decoder(our_pipeline):
    """The map is the decoder's response to each channel: decoding a small constant latent gives about the colour
    the preview predicts (exactly so for a linear decoder; this checks the probe's bookkeeping and scaling)."""
    vae = our_pipeline.vae
    previewer = LatentPreviewer.from_vae(vae)
    assert previewer.weight.shape == (vae.config.latent_channels, 3)
    scaled = torch.zeros(1, 1, 4, 4, vae.config.latent_channels)
    scaled[..., 3] = 0.5 * vae.config.scaling_factor  # the probe's own point: reproduced up to rounding
    decoded = vae.decode(scaled.permute(0, 4, 1, 2, 3) / vae.config.scaling_factor).sample.float()
    expected = ((decoded.mean(dim=(2, 3, 4))[0] * 0.5 + 0.5).clamp(0, 1) * 255).round()
    got = torch.from_numpy(previewer(scaled)[0, 0].reshape(-1, 3).astype(np.float32)).mean(0)
    assert (got - expected).abs().max() <= 1  # one uint8 step of rounding


def test_interrupt_skips_the_remaining_steps_and_still_decodes(our_pipeline):
    """diffusers' meaning: a callback sets ``pipe._interrupt``; the remaining steps are skipped, the latents
    decoded."""
    steps = []

    def stop_after_first(pipe, step, timestep, tensors):
        steps.append(step)
        pipe._interrupt = True
        return tensors

    events = []
    out = our_pipeline(
        **seeded(guidance_scale=1.0), callback_on_step_end=stop_after_first, control=RunControl(events.append)
    )
    assert steps == [0] and out.frames.shape == (1, 5, 32, 48, 3)
    assert [e.phase for e in events][-2:] == [Phase.DECODE, Phase.DECODE]
    # the flag is diffusers' per-call flag: the next call runs every step
    steps.clear()
    our_pipeline(**seeded(guidance_scale=1.0), callback_on_step_end=lambda pipe, i, t, tensors: steps.append(i) or {})
    assert steps == list(range(STEPS))


def test_running_call_properties_live_in_the_call(our_pipeline):
    seen = []

    def record(pipe, step, timestep, tensors):
        seen.append((pipe.guidance_scale, pipe.num_timesteps, pipe.do_classifier_free_guidance))
        return tensors

    our_pipeline(**seeded(guidance_scale=3.0), callback_on_step_end=record)
    assert seen == [(3.0, STEPS, True)] * STEPS
    assert (our_pipeline.guidance_scale, our_pipeline.num_timesteps) == (1.0, 0)  # nothing kept after the call


def test_run_control_rejects_bad_preview_settings():
    with pytest.raises(ValueError, match="preview_every"):
        RunControl(preview_every=-1)
    with pytest.raises(ValueError, match="on_preview"):
        RunControl(preview_every=2)


@pytest.mark.parametrize("returned", [[1, 2], {"latents": torch.zeros(1)}])
def test_a_callback_returning_something_unusable_names_itself_and_the_step(our_pipeline, returned):
    from kandinsky5.pipelines.adapters import CallbackError

    def bad(pipe, step, timestep, tensors):
        return tensors if step == 0 else returned

    with pytest.raises(CallbackError, match="callback_on_step_end.*step 1") as raised:
        our_pipeline(**seeded(guidance_scale=1.0, output_type="latent"), callback_on_step_end=bad)
    assert raised.value.step == 1 and raised.value.latents.shape[:4] == (1, 2, 4, 6)  # the latents so far, kept
