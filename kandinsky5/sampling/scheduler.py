"""Flow-matching schedule with shifted timesteps and the Euler step.

The schedule is computed with the same float32/float64 steps as the reference scheduler
(diffusers' ``FlowMatchEulerDiscreteScheduler`` without dynamic shifting), so its timesteps are bit-equal.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch

from kandinsky5.models.base import ComponentConfig

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class FlowMatchSchedulerConfig(ComponentConfig):
    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    invert_sigmas: bool = False
    shift_terminal: float | None = None
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    stochastic_sampling: bool = False
    # Kept for config compatibility; only used with dynamic shifting, which Kandinsky 5 does not use.
    base_shift: float | None = 0.5
    max_shift: float | None = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    time_shift_type: str = "exponential"

    def __post_init__(self):
        unsupported = [
            name
            for name in (
                "use_dynamic_shifting",
                "invert_sigmas",
                "use_karras_sigmas",
                "use_exponential_sigmas",
                "use_beta_sigmas",
                "stochastic_sampling",
            )
            if getattr(self, name)
        ]
        if self.shift_terminal:
            unsupported.append("shift_terminal")
        if unsupported:
            raise ValueError(f"scheduler_config.json: options {unsupported} are not supported by kandinsky5")


def shift_sigmas(sigmas, shift: float):
    """The flow-matching timestep shift ``s*x / (1 + (s-1)*x)``."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


class FlowMatchEulerDiscreteScheduler:
    """Shifted flow-matching schedule; ``step`` is one Euler step along the predicted velocity."""

    order = 1
    config_name = "scheduler_config.json"

    def __init__(self, config: FlowMatchSchedulerConfig | None = None, **kwargs):
        self.config = config if config is not None else FlowMatchSchedulerConfig.from_dict(kwargs)
        train = self.config.num_train_timesteps
        # Bounds of the training schedule, in float32 as the reference computes them.
        train_sigmas = torch.from_numpy(np.linspace(1, train, train, dtype=np.float32)[::-1].copy()) / train
        train_sigmas = shift_sigmas(train_sigmas, self.config.shift)
        self.sigma_max = train_sigmas[0].item()
        self.sigma_min = train_sigmas[-1].item()
        self.timesteps: torch.Tensor | None = None
        self.sigmas: torch.Tensor | None = None
        self.num_inference_steps: int | None = None

    @classmethod
    def from_config(cls, config: dict) -> FlowMatchEulerDiscreteScheduler:
        return cls(FlowMatchSchedulerConfig.from_dict(config))

    @property
    def shift(self) -> float:
        return self.config.shift

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        """Timesteps ``t = 1000 * sigma`` of the shifted schedule, and the sigmas with a final 0 appended."""
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        train = self.config.num_train_timesteps
        timesteps = np.linspace(self.sigma_max * train, self.sigma_min * train, num_inference_steps)
        sigmas = shift_sigmas(timesteps / train, self.config.shift)
        sigmas = torch.from_numpy(sigmas).to(dtype=torch.float32, device=device)
        self.timesteps = sigmas * train
        self.sigmas = torch.cat([sigmas, torch.zeros(1, device=sigmas.device)])
        self.num_inference_steps = num_inference_steps

    def step(self, velocity: torch.Tensor, step_index: int, sample: torch.Tensor) -> torch.Tensor:
        """Euler step from ``sigmas[i]`` to ``sigmas[i+1]``: the sum in float32, the result in ``velocity``'s
        dtype (the reference's rounding)."""
        dt = self.sigmas[step_index + 1] - self.sigmas[step_index]
        return (sample.to(torch.float32) + dt * velocity).to(velocity.dtype)
