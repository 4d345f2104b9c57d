"""The VAE decode shared among ranks (kandinsky5/runtime/parallel/vae.py) in gloo process groups on the CPU.

One spawn of four processes decodes in a world of four, then (two ranks regrouped) in a world of two; meanwhile the
test process runs the single-process decodes they must equal. The tiny VAE gets small tiles (32-pixel tiles every
24 pixels, 8-frame temporal tiles every 4 frames), so a decode of 6 latent frames of 7x6 latents is 6 temporal
chunks of 3x2 spatial tiles: 36 pieces, shared round-robin. Each rank decodes its pieces with the single-process
code on the same latent views, and every rank joins all pieces with the single-process join: the result must equal
the single-process decode bit for bit (no tolerance), on every rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from parallel_helpers import free_port, regroup, start_processes

from kandinsky5.models.vae import AutoencoderKLHunyuanVideo
from kandinsky5.pipelines.output import decode_latents
from kandinsky5.runtime.parallel.vae import decode_latents_parallel, decode_parallel
from kandinsky5.tiny import TINY_VAE

SMALL_TILES = dict(
    tile_sample_min_height=32,
    tile_sample_min_width=32,
    tile_sample_stride_height=24,
    tile_sample_stride_width=24,
    tile_sample_min_num_frames=8,
    tile_sample_stride_num_frames=4,
)
# (batch, channels, latent frames, height, width): 6 temporal chunks x 3 x 2 spatial tiles with SMALL_TILES
LATENTS = (1, 16, 6, 7, 6)
# two videos, decoded one after the other (slicing): each its own round-robin of 3 x 2 x 1 pieces
BATCH_LATENTS = (2, 16, 3, 4, 6)
# what each world decodes (the world of two repeats the cheapest cases)
CASES = {4: ("tiled", "pipeline", "sliced", "auto"), 2: ("tiled", "auto")}


def build_vae() -> AutoencoderKLHunyuanVideo:
    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanVideo.from_config(TINY_VAE).eval()
    vae.enable_tiling(**SMALL_TILES)
    return vae


def latents(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def short_of_memory_on_rank_1(device: torch.device) -> int | None:
    """The automatic policy's free memory on rank 1: nothing (it tiles); unknown elsewhere (no tiles)."""
    return 0 if dist.get_rank() == 1 else None


@torch.no_grad()
def decode_on_ranks(cases: tuple[str, ...]) -> dict[str, torch.Tensor]:
    vae = build_vae()
    results = {}
    if "tiled" in cases:
        results["tiled"] = decode_parallel(vae, latents(LATENTS, 1))
    if "pipeline" in cases:
        # the pipeline's decode (channels-last sampler latents, scaled) through the parallel decoder
        channels_last = latents(LATENTS, 2).permute(0, 2, 3, 4, 1)
        results["pipeline"] = decode_latents_parallel(vae, channels_last, dist.group.WORLD)
    if "sliced" in cases:
        vae.enable_slicing()
        results["sliced"] = decode_parallel(vae, latents(BATCH_LATENTS, 3))
        vae.disable_slicing()
    if "auto" in cases:
        # automatic tiling: only rank 1 is short of memory, so every rank must tile
        vae.enable_auto_tiling(short_of_memory_on_rank_1)
        results["auto"] = decode_parallel(vae, latents(LATENTS, 4))
    return results


def worker(rank: int, world_size: int, port: int) -> dict[int, dict[str, torch.Tensor]]:
    results = {world_size: decode_on_ranks(CASES[world_size])}
    if regroup(rank, 2, port):
        results[2] = decode_on_ranks(CASES[2])
    return results


@torch.no_grad()
def test_parallel_decode_equals_single_process_decode_bit_for_bit():
    processes = start_processes(worker, 4, free_port())
    vae = build_vae()
    expected = {
        "tiled": vae.decode(latents(LATENTS, 1)).sample,
        "pipeline": decode_latents(vae, latents(LATENTS, 2).permute(0, 2, 3, 4, 1)),
    }
    vae.enable_slicing()
    expected["sliced"] = vae.decode(latents(BATCH_LATENTS, 3)).sample
    vae.disable_slicing()
    expected["auto"] = vae.decode(latents(LATENTS, 4)).sample  # forced tiles, as the agreement gives
    vae.disable_tiling()
    untiled = vae.decode(latents(LATENTS, 4)).sample
    assert (expected["auto"] - untiled).abs().max() > 1e-2  # the tiles are really blended

    results = processes.results()
    for rank, per_world in enumerate(results):
        worlds = (4, 2) if rank < 2 else (4,)
        assert sorted(per_world) == sorted(worlds)
        for world_size in worlds:
            assert sorted(per_world[world_size]) == sorted(CASES[world_size])
            for name in CASES[world_size]:
                got, video = per_world[world_size][name], expected[name]
                assert got.shape == video.shape, (rank, world_size, name)
                assert torch.equal(got, video), f"rank {rank} of {world_size}, {name}: differs from one process"
