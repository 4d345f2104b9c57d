"""Sharded transformer weights (kandinsky5/runtime/parallel/fsdp.py: FSDP2 over a gloo world on the CPU).

One spawn of two processes runs the package's tiny checkpoint (4 attention heads) in float32: unsharded with
Ulysses 2 and with CFG 2, then with its blocks sharded, with Ulysses 2, with CFG 2, and alone (every rank computing
the whole call); and a bfloat16 copy, sharded alone. Meanwhile the test process runs the single-process calls.

Sharding changes where the weights rest between block calls, not what a call computes: each block's forward runs
on the gathered tensors, equal bit for bit to the single process's (gathered in their stored dtype: the float32
modulation of a bfloat16 model stays float32), through the same kernels on the same shapes. So every sharded run
must equal, bit for bit and without tolerance, the same run unsharded: sharded alone the single-process call, sharded
with Ulysses or CFG the unsharded Ulysses or CFG run (which tests/test_parallel.py compares with one process;
ULYSSES_BOUND below repeats that comparison, so a sharded Ulysses run is also held to it directly).
"""

from __future__ import annotations

import pytest
import torch
from parallel_helpers import start_processes
from tolerances import PIPELINE_BF16_FLIP, assert_close
from torch.distributed.tensor import DTensor

from kandinsky5 import Kandinsky5T2VPipeline
from kandinsky5.runtime.parallel.fsdp import is_sharded, shard_transformer, sharded_blocks, sharded_bytes
from kandinsky5.tiny import write_tiny_checkpoint

PROMPT = "A red fox runs through fresh snow"
# 9 frames at 64x64: 3 latent frames of 4x4 tokens (48, divisible by 2); guidance on (the default 5)
CALL = dict(prompt=PROMPT, height=64, width=64, num_frames=9, num_inference_steps=2, output_type="latent")
# Ulysses runs the linear layers on half the tokens (see tests/test_parallel.py)
ULYSSES_BOUND = PIPELINE_BF16_FLIP


def load(folder: str, dtype: torch.dtype = torch.float32) -> Kandinsky5T2VPipeline:
    pipe = Kandinsky5T2VPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype)


def generate(pipe) -> torch.Tensor:
    return pipe(**CALL, generator=torch.Generator().manual_seed(42)).frames


def watch_modulation_dtypes(pipe) -> set[torch.dtype]:
    """The dtypes of the blocks' modulation weights as their forwards see them (gathered), collected per call."""
    seen: set[torch.dtype] = set()
    for blocks in sharded_blocks(pipe.transformer):
        for block in blocks:
            modulation = getattr(block, "visual_modulation", None) or block.text_modulation
            modulation.register_forward_pre_hook(lambda module, args: seen.add(module.out_layer.weight.dtype))
    return seen


def worker(rank: int, world_size: int, folder: str) -> dict:
    out: dict = {}
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
    return out


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> str:
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-fsdp")))


@torch.no_grad()
def test_sharded_weights_equal_unsharded_runs(tiny_folder):
    processes = start_processes(worker, 2, tiny_folder)
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
    assert torch.equal(results[0]["ulysses+shard"], results[1]["ulysses+shard"])


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
