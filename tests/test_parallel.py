"""Ulysses sequence parallelism and CFG parallelism (kandinsky5/runtime/parallel) in gloo process groups on the CPU.

One spawn of four processes runs every parallel configuration: Ulysses 4 and Ulysses 2 x CFG 2 in a world of
four, then (two ranks regrouped into a world of two) Ulysses 2 and CFG 2; each runs text-to-video (dense and
NABLA), image-to-video, text-to-image and image editing, returning latents; Ulysses 2 x CFG 2 also returns decoded
frames and a MagCache run, Ulysses 2 a batched-guidance run (a batch of two, sharded). Meanwhile the test process
computes the single-process runs they must equal. Every rank must return the same latents bit for bit; rank 0's must
equal the single-process ones within the tolerance derived below. Only rank 0 has tokenizers and text encoders.

The tiny test checkpoints have 2 attention heads (model_dim 32, head_dim 16), too few for Ulysses 4: every run here
(parallel or not) swaps in a transformer of the same configuration with model_dim 64, i.e. 4 heads, random weights
from a fixed seed; the checkpoint's own 2-head transformer serves the "heads not divisible" error.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np
import PIL.Image
import pytest
import torch
import torch.distributed as dist
from conftest import randomize_
from parallel_helpers import free_port, init_gloo, regroup, start_processes
from tolerances import FORWARD_REORDER, PIPELINE_BF16_FLIP, assert_close, max_abs_diff

from kandinsky5 import (
    Kandinsky5I2IPipeline,
    Kandinsky5I2VPipeline,
    Kandinsky5T2IPipeline,
    Kandinsky5T2VPipeline,
    MagCacheConfig,
)
from kandinsky5.attention import backends
from kandinsky5.models.dit import Kandinsky5Transformer3DModel
from kandinsky5.runtime.parallel import ParallelConfig, current_mesh
from kandinsky5.runtime.parallel.cfg import CfgParallelGuidance
from kandinsky5.sampling.guidance import TwoCallGuidance

PROMPT = "A red fox runs through fresh snow"
NEGATIVE = "blurry, static"
# 9 frames at 64x64: 3 latent frames of 4x4 tokens (48, divisible by 2 and 4)
DENSE = dict(height=64, width=64, num_frames=9, num_inference_steps=2)
# NABLA needs 8x8-token tiles (128x128 pixels); 25 frames = 7 latent frames, so the checkpoint's temporal window
# (11 frames: 5 either side) leaves blocks out; 7 x 64 = 448 tokens
NABLA = dict(height=128, width=128, num_frames=25, num_inference_steps=2)
IMAGE = PIL.Image.fromarray(np.random.default_rng(3).integers(0, 256, size=(64, 64, 3), dtype=np.uint8))
# the image models' smallest sizes are 1024-class: 64x64 tokens (4096, divisible by 2 and 4)
IMAGE_CALL = dict(height=1024, width=1024, num_inference_steps=2, output_type="latent")
# (checkpoint, arguments): what each configuration runs; "frames" decodes, "magcache" runs with a step cache
CASES = {
    "t2v": ("t2v", dict(DENSE, output_type="latent")),
    "t2v-nabla": ("nabla", dict(NABLA, output_type="latent")),
    "i2v": ("i2v", dict(DENSE, image=IMAGE, output_type="latent")),
    "t2i": ("t2i", IMAGE_CALL),
    "i2i": ("i2i", dict(IMAGE_CALL, image=IMAGE)),
    "frames": ("t2v", dict(DENSE, output_type="np")),
    "magcache": ("t2v", dict(DENSE, num_inference_steps=6, output_type="latent")),
    "batched": ("t2v", dict(DENSE, output_type="latent")),  # batched guidance: both branches in a batch of 2
}
LATENT_CASES = ("t2v", "t2v-nabla", "i2v", "t2i", "i2i")
# (ulysses_degree, cfg_degree) -> cases; the first two in a world of 4, the last two in a world of 2
CONFIGS = {
    (4, 1): LATENT_CASES,
    (2, 2): (*LATENT_CASES, "frames", "magcache"),
    (2, 1): (*LATENT_CASES, "batched"),
    (1, 2): LATENT_CASES,
}
WORLD_OF_4 = ((4, 1), (2, 2))
WORLD_OF_2 = ((2, 1), (1, 2))
# model_dim 64 / head_dim 16 = 4 heads
FOUR_HEADS = dict(model_dim=64, ff_dim=96)
TRANSFORMER_SEED = 7
# MagCache: ratios near 1 (every call after the first 20 % may skip, up to 2 in a row) at any step count
MAGCACHE = MagCacheConfig(ratios=[1.0] * 98, threshold=0.5, calibrated_steps=50)

# Ulysses runs each linear layer on a quarter or half of the tokens (another row count: the matrix multiply may sum
# in another order) and attends with another head layout; the DiT's arithmetic differs from the single process's as
# "another batch shape" does, whose float32 differences can flip a rotated query or key's bfloat16 rounding:
# PIPELINE_BF16_FLIP is the bound derived for a whole pipeline whose DiT arithmetic differs so. CFG parallel alone
# makes the single process's calls on the same shapes (one branch per rank): FORWARD_REORDER.
ULYSSES_BOUND = PIPELINE_BF16_FLIP
CFG_ONLY_BOUND = FORWARD_REORDER


PIPELINES = {"i2v": Kandinsky5I2VPipeline, "t2i": Kandinsky5T2IPipeline, "i2i": Kandinsky5I2IPipeline}


def load(kind: str, folder: str, text: dict | None, four_heads: bool = True):
    """Our pipeline of the checkpoint in ``folder``; ``text``: its tokenizers and text encoders given (all ``None``:
    a rank that never encodes text), or ``None`` to load them."""
    cls = PIPELINES.get(kind, Kandinsky5T2VPipeline)
    pipe = cls.from_pretrained(folder, **(text or {}))
    pipe.set_progress_bar_config(disable=True)
    if four_heads:
        config = dict(pipe.transformer.config.to_dict(), **FOUR_HEADS)
        transformer = Kandinsky5Transformer3DModel.from_config(config).eval()
        randomize_(transformer, TRANSFORMER_SEED)
        pipe.transformer = transformer
    return pipe


def generate(pipe, case: str):
    kwargs = dict(CASES[case][1])
    magcache = case == "magcache"
    cache = pipe.transformer.enable_cache(MAGCACHE) if magcache else None
    pipe.batched_guidance = case == "batched"
    try:
        generator = torch.Generator().manual_seed(42)
        out = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, generator=generator, **kwargs)
        out = out.image if kind_of(case).endswith("i") else out.frames
    finally:
        if magcache:
            pipe.transformer.disable_cache()
        pipe.batched_guidance = False
    out = torch.as_tensor(np.asarray(out))
    return (out, list(cache.decisions)) if magcache else out


def kind_of(case: str) -> str:
    return CASES[case][0]


def catch(fn) -> str:
    try:
        fn()
    except (ValueError, RuntimeError) as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


NO_TEXT = dict.fromkeys(("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2"))


def tokenizers_of(pipe) -> dict:
    """The tokenizers of a loaded pipeline (reading the real Qwen tokenizer takes seconds: read it once)."""
    return dict(tokenizer=pipe.tokenizer, tokenizer_2=pipe.tokenizer_2)


def worker(rank: int, world_size: int, folders: dict[str, str], second_port: int) -> dict:
    """Every configuration of CONFIGS on this rank; their outputs and timings, and the errors asked for.

    Only rank 0 has tokenizers and text encoders: the others get the text from it (text encoding runs once)."""
    out: dict = {"seconds": {}}
    two_heads = load("t2v", folders["t2v"], None if rank == 0 else NO_TEXT, four_heads=False)
    out["heads error"] = catch(lambda: two_heads.enable_parallelism(ulysses_degree=4, cfg_degree=1))
    out["degrees error"] = catch(lambda: two_heads.enable_parallelism(ulysses_degree=3, cfg_degree=2))
    text = tokenizers_of(two_heads) if rank == 0 else NO_TEXT
    pipes = {kind: load(kind, folder, text) for kind, folder in folders.items()}
    out["heads seen"] = heads_seen = []
    spy_on_block_maps(heads_seen)
    pipes["t2v"].enable_parallelism(ulysses_degree=4, cfg_degree=1)
    out["tokens error"] = catch(lambda: generate_odd_size(pipes["t2v"]))
    for configs in (WORLD_OF_4, WORLD_OF_2):
        if configs is WORLD_OF_2 and not regroup(rank, 2, second_port):
            break
        for config in configs:
            for case in CONFIGS[config]:
                pipe = pipes[CASES[case][0]]
                pipe.enable_parallelism(*config)
                start = time.perf_counter()
                heads_seen.append((config, case))
                out[config, case] = generate(pipe, case)
                out["seconds"][config, case] = time.perf_counter() - start
                pipe.disable_parallelism()
    return out


def generate_odd_size(pipe):
    # 32x48 pixels, 9 frames: 3 latent frames of 2x3 tokens = 18, not divisible by 4
    pipe(PROMPT, height=32, width=48, num_frames=9, num_inference_steps=1, output_type="latent")


@contextlib.contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as every rank (the same kernels' summation orders)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def parallel_runs(
    reference_checkpoint,
    reference_nabla_checkpoint,
    reference_i2v_checkpoint,
    reference_t2i_checkpoint,
    reference_i2i_checkpoint,
):
    """(the ranks' results, the single-process results per case, the NABLA block maps seen, seconds taken)."""
    folders = {
        "t2v": str(reference_checkpoint[0]),
        "nabla": str(reference_nabla_checkpoint[0]),
        "i2v": str(reference_i2v_checkpoint[0]),
        "t2i": str(reference_t2i_checkpoint[0]),
        "i2i": str(reference_i2i_checkpoint[0]),
    }
    start = time.perf_counter()
    processes = start_processes(worker, 4, folders, free_port(), timeout=240)
    try:
        expected, block_maps = {}, []
        text = tokenizers_of(reference_checkpoint[1])  # diffusers' pipeline: the same tokenizers
        with one_thread(), recording(block_maps):
            pipes = {kind: load(kind, folder, text) for kind, folder in folders.items()}
            for case, (kind, _) in CASES.items():
                expected[case] = generate(pipes[kind], case)
        results = processes.results()
    finally:
        processes.stop()
    return results, expected, block_maps, time.perf_counter() - start


def spy_on_block_maps(record: list, shapes_only: bool = True):
    """Record the NABLA block maps the attention choke point computes (their shapes, or themselves): a test-side spy
    on its helper; returns the original to restore."""
    original = backends.nabla_block_mask

    def spy(query, key, window_mask, threshold):
        block_map = original(query, key, window_mask, threshold)
        record.append(tuple(block_map.shape) if shapes_only else block_map)
        return block_map

    backends.nabla_block_mask = spy
    return original


@contextlib.contextmanager
def recording(block_maps: list):
    original = spy_on_block_maps(block_maps, shapes_only=False)
    try:
        yield
    finally:
        backends.nabla_block_mask = original


def test_errors(parallel_runs):
    rank0 = parallel_runs[0][0]
    assert rank0["heads error"] == (
        "ValueError: ulysses_degree (4) must divide the transformer's attention heads (2); choose a divisor of 2"
    )
    assert rank0["degrees error"] == (
        "ValueError: ulysses_degree (3) x cfg_degree (2) = 6 must equal the world size (4 processes)"
    )
    assert rank0["tokens error"].startswith("ValueError: ulysses_degree (4) must divide the visual token count (18")


def test_nabla_window_leaves_blocks_out(parallel_runs):
    block_maps = parallel_runs[2]
    assert block_maps, "the NABLA case computed no block map"
    assert all(m.shape[-1] == 7 for m in block_maps)  # 7 latent frames of one 8x8-token tile
    assert not all(bool(m.all()) for m in block_maps)


def test_nabla_maps_per_head_on_the_whole_sequence(parallel_runs):
    """Under Ulysses the block map is computed after the exchange: this rank's 4 / ulysses_degree heads, every one of
    the 7 blocks of the whole sequence (each rank a shard of 448 / ulysses_degree tokens)."""
    results = parallel_runs[0]
    for rank, result in enumerate(results):
        maps: dict = {}
        marker = None
        for entry in result["heads seen"]:
            if isinstance(entry[0], tuple):
                marker = entry
            else:
                maps.setdefault(marker, set()).add(entry)
        for config in CONFIGS:
            if config in WORLD_OF_2 and rank >= 2:
                continue
            ulysses = config[0]
            assert maps[config, "t2v-nabla"] == {(1, 4 // ulysses, 7, 7)}, (rank, config)
            assert (config, "t2v") not in maps  # dense: no map


@pytest.mark.parametrize("config", list(CONFIGS), ids=lambda c: f"ulysses{c[0]}-cfg{c[1]}")
def test_parallel_equals_single_process(parallel_runs, config):
    results, expected, _, _ = parallel_runs
    ranks = results if config in WORLD_OF_4 else results[:2]
    bound = CFG_ONLY_BOUND if config[0] == 1 else ULYSSES_BOUND
    for case in CONFIGS[config]:
        got = [r[config, case] for r in ranks]
        want = expected[case]
        if case == "magcache":
            (got, decisions), (want, want_decisions) = zip(*got, strict=True), want
            # each branch decided on its cfg rank exactly as the single process decided it
            union = sorted({d for ds in decisions for d in ds})
            assert union == sorted(want_decisions) and any(skipped for *_, skipped in want_decisions)
        for other in got[1:]:
            assert torch.equal(other, got[0]), f"{case}: ranks differ"
        assert_close(got[0], want, bound)


def test_report(parallel_runs):
    """Not a check: the measured differences and times (pytest -s shows them)."""
    results, expected, _, seconds = parallel_runs
    for config in CONFIGS:
        for case in CONFIGS[config]:
            got, want = results[0][config, case], expected[case]
            if case == "magcache":
                got, want = got[0], want[0]
            scale = float(want.abs().max())
            print(f"{config} {case}: max |diff| = {max_abs_diff(got, want) / scale:.3g} of max |expected|")
    print(f"spawn and runs: {seconds:.1f} s")


# ---------------------------------------------------------------- in this process: a world of one, no world


@contextlib.contextmanager
def world_of_one():
    init_gloo(0, 1, free_port())
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_degree_one_is_the_single_process_path(reference_checkpoint):
    pipe = load("t2v", str(reference_checkpoint[0]), tokenizers_of(reference_checkpoint[1]), four_heads=False)
    kwargs = dict(DENSE, output_type="latent")
    alone = generate(pipe, "t2v")
    with world_of_one():
        mesh = pipe.enable_parallelism()
        assert mesh.config == ParallelConfig(1, 1) and pipe._parallel_handle is None
        seen = []
        original = pipe.make_guidance

        def spy(*args, **kw):
            guidance = original(*args, **kw)
            seen.append((type(guidance), current_mesh()))
            return guidance

        pipe.make_guidance = spy
        parallel = pipe(PROMPT, negative_prompt=NEGATIVE, generator=torch.Generator().manual_seed(42), **kwargs).frames
        del pipe.make_guidance
        pipe.disable_parallelism()
    assert torch.equal(parallel, alone)
    assert seen == [(TwoCallGuidance, mesh)]
    assert not issubclass(seen[0][0], CfgParallelGuidance)


def test_enable_parallelism_needs_torch_distributed(reference_checkpoint):
    pipe = load("t2v", str(reference_checkpoint[0]), tokenizers_of(reference_checkpoint[1]), four_heads=False)
    with pytest.raises(RuntimeError, match="init_process_group"):
        pipe.enable_parallelism()


def test_degrees_must_multiply_to_the_world_size(reference_checkpoint):
    pipe = load("t2v", str(reference_checkpoint[0]), tokenizers_of(reference_checkpoint[1]), four_heads=False)
    with world_of_one(), pytest.raises(ValueError, match=r"ulysses_degree \(2\) x cfg_degree \(1\) = 2 must equal"):
        pipe.enable_parallelism(ulysses_degree=2, cfg_degree=1)
    assert pipe._parallel is None


def test_parallel_config():
    assert ParallelConfig.default_for(4, guidance=True) == ParallelConfig(2, 2)
    assert ParallelConfig.default_for(4, guidance=False) == ParallelConfig(4, 1)
    assert ParallelConfig.default_for(3, guidance=True) == ParallelConfig(3, 1)
    assert ParallelConfig.resolve(8, ulysses_degree=8) == ParallelConfig(8, 1)
    assert ParallelConfig.resolve(8, cfg_degree=2) == ParallelConfig(4, 2)
    with pytest.raises(ValueError, match=r"cfg_degree must be 1 or 2"):
        ParallelConfig(1, 4)
    with pytest.raises(ValueError, match=r"ulysses_degree \(3\) must divide the world size \(8 processes\)"):
        ParallelConfig.resolve(8, ulysses_degree=3)
    with pytest.raises(ValueError, match="positive integer"):
        ParallelConfig(0, 1)
