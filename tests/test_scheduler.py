"""The flow-matching schedule and Euler step against diffusers' FlowMatchEulerDiscreteScheduler."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler as RefScheduler

from kandinsky5.sampling.scheduler import FlowMatchEulerDiscreteScheduler


@pytest.mark.parametrize("shift", [1.0, 5.0, 10.0])
@pytest.mark.parametrize("steps", [1, 16, 50])
def test_timesteps_and_sigmas_bit_equal(shift, steps):
    ref = RefScheduler(shift=shift)
    ours = FlowMatchEulerDiscreteScheduler.from_config(dict(ref.config))
    ref.set_timesteps(steps)
    ours.set_timesteps(steps)
    assert torch.equal(ref.timesteps, ours.timesteps)
    assert torch.equal(ref.sigmas, ours.sigmas)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_euler_steps_equal(dtype):
    ref, ours = RefScheduler(shift=5.0), FlowMatchEulerDiscreteScheduler(shift=5.0)
    ref.set_timesteps(4)
    ours.set_timesteps(4)
    gen = torch.Generator().manual_seed(0)
    sample_ref = sample_ours = torch.randn(2, 3, 4, generator=gen).to(dtype)
    for i, t in enumerate(ref.timesteps):
        velocity = torch.randn(2, 3, 4, generator=gen).to(dtype)
        sample_ref = ref.step(velocity, t, sample_ref, return_dict=False)[0]
        sample_ours = ours.step(velocity, i, sample_ours)
        assert sample_ours.dtype == sample_ref.dtype
        assert torch.equal(sample_ref, sample_ours)


def test_unsupported_options_are_named():
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        FlowMatchEulerDiscreteScheduler.from_config({"shift": 5.0, "use_karras_sigmas": True})
