"""Initial noise drawn exactly as the reference draws it, so a user's seed gives the reference's video."""

from __future__ import annotations

import torch


def randn(
    shape: tuple[int, ...],
    generator: torch.Generator | list[torch.Generator] | None,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Standard normal noise of ``shape``.

    A CPU generator draws on the CPU and the result moves to ``device`` (same numbers on every device); a list
    of generators draws one batch element each.
    """
    device = torch.device(device)
    draw_device = device
    if generator is not None:
        gen_type = (generator[0] if isinstance(generator, list) else generator).device.type
        if gen_type != device.type:
            if gen_type != "cpu":
                raise ValueError(f"generator: cannot draw a {device} tensor from a {gen_type} generator")
            draw_device = torch.device("cpu")
    if isinstance(generator, list) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(
                f"generator: got a list of {len(generator)} generators for an effective batch of {shape[0]}; "
                "pass one generator or one per video"
            )
        parts = [torch.randn((1, *shape[1:]), generator=g, device=draw_device, dtype=dtype) for g in generator]
        return torch.cat(parts).to(device)
    return torch.randn(shape, generator=generator, device=draw_device, dtype=dtype).to(device)
