"""NABLA's parameters for a latent shape, from the transformer's config (what the reference's pipeline builds in
``get_sparse_params``, as a :class:`~kandinsky5.attention.nabla.NablaParams`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kandinsky5.attention.nabla import FRACTAL_TILE, NablaParams, sliding_window_block_mask
from kandinsky5.models.dit import TransformerConfig

# Axes of a channels-last latent batch (batch, T, H, W, C) that hold the frames, height and width.
LATENT_GRID_AXES = slice(1, 4)


def nabla_params_for_latents(
    config: TransformerConfig,
    latent_shape: Sequence[int],
    device: torch.device | str,
    spatial_compression: int,
) -> NablaParams | None:
    """NABLA's parameters for latents of shape ``latent_shape`` ``(batch, T, H, W, C)`` on ``device``; ``None``
    when ``config`` is not a NABLA transformer.

    ``spatial_compression`` (the VAE's pixels per latent, per side) only words the error for a size NABLA cannot
    tile. Raises a ValueError unless the temporal patch size is 1 and the token grid splits into
    ``FRACTAL_TILE x FRACTAL_TILE`` tiles.
    """
    if not config.uses_nabla:
        return None
    pt, ph, pw = config.patch_size
    if pt != 1:
        raise ValueError("NABLA attention needs a temporal patch size of 1")
    frames, height, width = latent_shape[LATENT_GRID_AXES]
    t, h, w = frames // pt, height // ph, width // pw
    if h % FRACTAL_TILE or w % FRACTAL_TILE:
        raise ValueError(
            f"NABLA attention needs a latent token grid divisible by {FRACTAL_TILE}: height and width must be "
            f"multiples of {FRACTAL_TILE * ph * spatial_compression} pixels"
        )
    window = (config.attention_wT, config.attention_wH, config.attention_wW)
    window_map = sliding_window_block_mask(t, h // FRACTAL_TILE, w // FRACTAL_TILE, *window, device=device)
    return NablaParams(
        window_mask=window_map[None, None],
        threshold=config.attention_P,
        fractal=True,
        visual_shape=(t, h, w),
        window=window,
        add_sta=config.attention_add_sta,
        method=config.attention_method,
    )
