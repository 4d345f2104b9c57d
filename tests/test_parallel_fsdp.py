"""Sharded transformer weights (kandinsky5/runtime/parallel/fsdp.py: FSDP2 over a gloo world on the CPU).

One spawn of two processes runs the package's tiny checkpoint (4 attention heads) in float32, text-to-video and
dense: unsharded with Ulysses 2 and with CFG 2, then with its blocks sharded, with Ulysses 2, with CFG 2, and alone
(every rank computing the whole call); and a bfloat16 copy, sharded alone. The same spawn then runs image-to-video
(the same weights under the I2V class) and NABLA (the same weights with the official NABLA attention settings, at
128x128 pixels and 25 frames: 7 latent frames of one 8x8-token tile, so the checkpoint's temporal window of 11
frames leaves blocks out, which the test checks on the block maps) with Ulysses 2, each unsharded, then sharded
through ``pipe.enable_parallelism(..., shard_weights=True)``. Meanwhile the test process runs the single-process
calls.

Sharding changes where the weights rest between block calls, not what a call computes: each block's forward runs
on the gathered tensors, equal bit for bit to the single process's (gathered in their stored dtype: the float32
modulation of a bfloat16 model stays float32), through the same kernels on the same shapes. So every sharded run
must equal, bit for bit and without tolerance, the same run unsharded: sharded alone the single-process call, sharded
with Ulysses or CFG (text-to-video or image-to-video, dense or NABLA) the unsharded Ulysses or CFG run (which
tests/test_parallel.py compares with one process; ULYSSES_BOUND below repeats that comparison for text-to-video, so
a sharded Ulysses run is also held to it directly).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from parallel_helpers import start_processes
from tolerances import PIPELINE_BF16_FLIP, assert_close
from torch.distributed.tensor import DTensor

from kandinsky5 import Kandinsky5I2VPipeline, Kandinsky5T2VPipeline
from kandinsky5.attention import backends
from kandinsky5.runtime.memory_plan import NABLA_ATTENTION
from kandinsky5.runtime.parallel.fsdp import is_sharded, shard_transformer, sharded_blocks, sharded_bytes
from kandinsky5.tiny import write_tiny_checkpoint

PROMPT = "A red fox runs through fresh snow"
# 9 frames at 64x64: 3 latent frames of 4x4 tokens (48, divisible by 2); guidance on (the default 5)
CALL = dict(prompt=PROMPT, height=64, width=64, num_frames=9, num_inference_steps=2, output_type="latent")
IMAGE = PIL.Image.fromarray(np.random.default_rng(3).integers(0, 256, size=(64, 64, 3), dtype=np.uint8))
I2V_CALL = dict(CALL, image=IMAGE)
# NABLA needs 8x8-token tiles (128x128 pixels); 25 frames = 7 latent frames: 448 tokens, divisible by 2
NABLA_CALL = dict(CALL, height=128, width=128, num_frames=25)
# Ulysses runs the linear layers on half the tokens (see tests/test_parallel.py)
ULYSSES_BOUND = PIPELINE_BF16_FLIP


def load(folder: str, dtype: torch.dtype = torch.float32, cls=Kandinsky5T2VPipeline):
    pipe = cls.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype)


def generate(pipe, call: dict = CALL) -> torch.Tensor:
    return pipe(**call, generator=torch.Generator().manual_seed(42)).frames


def watch_modulation_dtypes(pipe) -> set[torch.dtype]:
    """The dtypes of the blocks' modulation weights as their forwards see them (gathered), collected per call."""
    seen: set[torch.dtype] = set()
    for blocks in sharded_blocks(pipe.transformer):
        for block in blocks:
            modulation = getattr(block, "visual_modulation", None) or block.text_modulation
            modulation.register_forward_pre_hook(lambda module, args: seen.add(module.out_layer.weight.dtype))
    return seen


def worker(rank: int, world_size: int, folders: dict[str, str]) -> dict:
    out: dict = {}
    folder = folders["t2v"]
    pipe = load(folder)
    pipe.enable_parallelism(ulysses_degree=2, cfg_degree=1)
    out["ulysses"] = generate(pipe)
    mesh = pipe.enable_parallelism(ulysses_degree=1, cfg_degree=2)
    out["cfg"] = generate(pipe)

    shard_transformer(pipe.transformer, mesh)
    out["sharded"] = is_sharded(pipe.transformer)
    out["bytes"] = sharded_bytes(pipe.transformer)
    out["cfg+shard"] = generate(pipe)
    pipe.enable_parallelism(ulysses_degree=2, cfg_degree=1)
    out["ulysses+shard"] = generate(pipe)
    pipe.disable_parallelism()
    out["shard"] = generate(pipe)
    # resharded after each forward: the blocks hold their shards only
    out["resharded"] = all(
        isinstance(param, DTensor)
        for blocks in sharded_blocks(pipe.transformer)
        for b in blocks
        for param in b.parameters()
    )
    with pytest.raises(ValueError, match="sharded already"):
        shard_transformer(pipe.transformer, mesh)

    bf16 = load(folder, torch.bfloat16)
    shard_transformer(bf16.transformer)
    seen = watch_modulation_dtypes(bf16)
    out["bf16+shard"] = generate(bf16)
    out["modulation dtypes"] = seen

    # image-to-video and NABLA, Ulysses 2: unsharded, then sharded by enable_parallelism itself
    i2v = load(folders["i2v"], cls=Kandinsky5I2VPipeline)
    i2v.enable_parallelism(ulysses_degree=2, cfg_degree=1)
    out["i2v ulysses"] = generate(i2v, I2V_CALL)
    i2v.enable_parallelism(ulysses_degree=2, cfg_degree=1, shard_weights=True)
    out["i2v sharded"] = is_sharded(i2v.transformer)
    out["i2v ulysses+shard"] = generate(i2v, I2V_CALL)

    nabla = load(folders["nabla"])
    out["nabla maps"] = maps = []
    original = backends.nabla_block_mask

    def spy(query, key, window_mask, threshold):
        block_map = original(query, key, window_mask, threshold)
        maps.append(block_map.clone())
        return block_map

    backends.nabla_block_mask = spy  # this rank's process only
    nabla.enable_parallelism(ulysses_degree=2, cfg_degree=1)
    out["nabla ulysses"] = generate(nabla, NABLA_CALL)
    nabla.enable_parallelism(ulysses_degree=2, cfg_degree=1, shard_weights=True)
    out["nabla sharded"] = is_sharded(nabla.transformer)
    out["nabla ulysses+shard"] = generate(nabla, NABLA_CALL)
    backends.nabla_block_mask = original
    return out


def copy_with(source: Path, target: Path, file: str, **changes) -> str:
    """A copy of the checkpoint ``source`` whose JSON ``file`` has ``changes``: the same weights, another use."""
    shutil.copytree(source, target)
    data = json.loads((target / file).read_text())
    (target / file).write_text(json.dumps(dict(data, **changes), indent=2) + "\n")
    return str(target)


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory) -> dict[str, str]:
    """The tiny text-to-video checkpoint, and copies of it for image-to-video and for NABLA attention."""
    root = tmp_path_factory.mktemp("tiny-fsdp")
    t2v = write_tiny_checkpoint(root / "t2v")
    return {
        "t2v": str(t2v),
        "i2v": copy_with(t2v, root / "i2v", "model_index.json", _class_name="Kandinsky5I2VPipeline"),
        "nabla": copy_with(t2v, root / "nabla", "transformer/config.json", **NABLA_ATTENTION),
    }


@torch.no_grad()
def test_sharded_weights_equal_unsharded_runs(tiny_folders):
    processes = start_processes(worker, 2, tiny_folders)
    tiny_folder = tiny_folders["t2v"]
    single = generate(load(tiny_folder))
    single_bf16 = generate(load(tiny_folder, torch.bfloat16))
    results = processes.results()

    for rank, out in enumerate(results):
        assert out["sharded"] and out["resharded"], rank
        local, full = out["bytes"]
        assert local < 0.6 * full, (rank, local, full)  # half, up to the padding of odd row counts
        assert torch.equal(out["shard"], single), f"rank {rank}: sharded alone differs from one process"
        assert torch.equal(out["cfg+shard"], out["cfg"]), f"rank {rank}: sharding changed the CFG-parallel run"
        assert torch.equal(out["ulysses+shard"], out["ulysses"]), f"rank {rank}: sharding changed the Ulysses run"
        assert_close(out["ulysses+shard"], single, ULYSSES_BOUND)
        assert out["modulation dtypes"] == {torch.float32}, rank  # the float32 islands, gathered as float32
        assert torch.equal(out["bf16+shard"], single_bf16), f"rank {rank}: sharded bf16 differs from one process"
        assert out["i2v sharded"] and out["nabla sharded"], rank  # enable_parallelism(shard_weights=True)
        assert torch.equal(out["i2v ulysses+shard"], out["i2v ulysses"]), f"rank {rank}: sharding changed I2V"
        assert torch.equal(out["nabla ulysses+shard"], out["nabla ulysses"]), f"rank {rank}: sharding changed NABLA"
        # the block maps: after the exchange, 2 of the 4 heads, 7 blocks of the whole sequence; the temporal window
        # leaves blocks out (NABLA is not dense attention here); sharded or not, the same maps
        maps = out["nabla maps"]
        assert maps and all(m.shape == (1, 2, 7, 7) for m in maps), rank
        assert not all(bool(m.all()) for m in maps), rank
        half = len(maps) // 2
        assert all(torch.equal(a, b) for a, b in zip(maps[:half], maps[half:], strict=True)), rank
    for key in ("ulysses+shard", "i2v ulysses+shard", "nabla ulysses+shard"):
        assert torch.equal(results[0][key], results[1][key]), f"{key}: ranks differ"


def test_shard_transformer_refuses_a_cache_that_ranks_decide_apart():
    from kandinsky5.models.dit import Kandinsky5Transformer3DModel
    from kandinsky5.runtime.parallel.fsdp import check_no_divergent_cache
    from kandinsky5.runtime.parallel.mesh import ParallelConfig
    from kandinsky5.sampling.caches import MagCacheConfig
    from kandinsky5.tiny import TINY_TRANSFORMER

    class CfgMesh:
        config = ParallelConfig(ulysses_degree=1, cfg_degree=2)

    transformer = Kandinsky5Transformer3DModel(TINY_TRANSFORMER)
    check_no_divergent_cache(transformer, CfgMesh())  # no cache: fine
    transformer.enable_cache(MagCacheConfig(ratios=[1.0] * 98, calibrated_steps=50))
    with pytest.raises(ValueError, match="cfg_degree 1"):
        check_no_divergent_cache(transformer, CfgMesh())
    check_no_divergent_cache(transformer, None)  # one branch per rank only with CFG parallel
