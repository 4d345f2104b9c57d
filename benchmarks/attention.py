"""Attention kernels at the Lite DiT's sizes: dense cuDNN and flash against NABLA's block-sparse flex_attention.

    python benchmarks/attention.py                       # L = 47,616 and 93,696 (Lite 5 s / 10 s, 512x768), GPU
    python benchmarks/attention.py --lengths 47616 --densities 0.1 0.5 --repeats 20
    python benchmarks/attention.py --smoke               # tiny sizes on the CPU: checks the script only

One self-attention call, 1 x L tokens x 28 heads x 64, bfloat16. NABLA runs on random block maps of exact block
density (each query block keeps the same number of key blocks, its own among them): 10, 25, 50 and 100 %. Reported
per size: milliseconds per call and TFLOP/s (4 * L^2 * head_dim * heads * density), speed against dense cuDNN,
the time to build the BlockMask from a block map and to estimate a real NABLA map from q and k (both outside the
kernel time), the first call's compile time, and whether any later call recompiled. A correctness check compares
the flex kernel with SDPA on the expanded token mask at a small size. Prints a table and writes
``benchmarks/results/attention-<gpu>.json`` with the GPU name, torch version and date (not in smoke mode).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

from kandinsky5.attention import attention, attention_backend  # noqa: E402
from kandinsky5.attention.flex import flex_attention_on_block_mask, nabla_flex_block_mask  # noqa: E402
from kandinsky5.attention.nabla import (  # noqa: E402
    FRACTAL_TILE,
    NABLA_BLOCK_SIZE,
    expand_block_mask,
    nabla_block_mask,
    sliding_window_block_mask,
)

# Patched latent token grids (frames, height, width) of the Lite model at 512x768: 121 frames (5 s), 241 (10 s).
TOKEN_GRIDS = {47_616: (31, 32, 48), 93_696: (61, 32, 48)}
HEADS, HEAD_DIM = 28, 64  # Lite
DENSITIES = (0.10, 0.25, 0.50, 1.00)
DENSE_BACKENDS = ("cudnn", "flash")
# NABLA settings of the Lite 10 s checkpoint, for the real map estimate (threshold P, window wT x wH x wW tiles).
NABLA_P = 0.9
NABLA_WINDOW = (11, 3, 3)
# The correctness check: small enough for a dense token mask of every head.
CHECK_GRID = (4, 32, 32)
CHECK_DENSITY = 0.25
# --smoke: small stand-ins for the two grids (chosen with the same --lengths), 2 heads x 16, float32 on the CPU.
SMOKE = dict(grids={47_616: (3, 16, 16), 93_696: (6, 16, 16)}, heads=2, head_dim=16, check_grid=(3, 16, 16))
SMOKE_DENSE_BACKENDS = ("math", "native")


def random_block_map(batch, heads, blocks, density, device, generator) -> torch.Tensor:
    """Boolean ``(batch, heads, blocks, blocks)`` keeping ``round(density * blocks)`` key blocks per query block,
    the diagonal block always among them."""
    keep = max(1, round(density * blocks))
    scores = torch.rand(batch, heads, blocks, blocks, generator=generator, device=device)
    scores.diagonal(dim1=-2, dim2=-1).fill_(2.0)  # above any uniform draw: always kept
    chosen = scores.topk(keep, dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, chosen, True)


def attention_tflops(length: int, heads: int, head_dim: int, density: float, seconds: float) -> float:
    return 4 * length * length * head_dim * heads * density / seconds / 1e12


def timed_ms(fn, device, repeats) -> float:
    seconds, _ = common.timed(fn, device, repeats)
    return 1e3 * seconds


def first_call_seconds(fn, device) -> float:
    common.synchronize(device)
    start = time.perf_counter()
    fn()
    common.synchronize(device)
    return time.perf_counter() - start


def random_qkv(length, heads, head_dim, device, dtype, generator):
    shape = (1, length, heads, head_dim)
    return [torch.randn(shape, generator=generator, device=device).to(dtype) for _ in range(3)]


def bench_length(length, grid, args, device, dtype) -> dict:
    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v = random_qkv(length, args.heads, args.head_dim, device, dtype, generator)
    rows = []
    for name in args.dense_backends:
        with attention_backend(name):
            common.reset_peak_memory(device)
            first = first_call_seconds(lambda: attention(q, k, v), device)
            ms = timed_ms(lambda: attention(q, k, v), device, args.repeats)
        rows.append(
            {
                "kernel": f"dense {name}",
                "density": 1.0,
                "ms": ms,
                "tflops": attention_tflops(length, args.heads, args.head_dim, 1.0, ms / 1e3),
                "first_call_s": first,
                "peak_memory_gib": common.peak_memory_gib(device),
            }
        )

    blocks = length // NABLA_BLOCK_SIZE
    graphs_after_first = None
    for density in args.densities:
        block_map = random_block_map(1, args.heads, blocks, density, device, generator)
        mask_ms = timed_ms(lambda m=block_map: nabla_flex_block_mask(q, k, m), device, args.repeats)
        block_mask = nabla_flex_block_mask(q, k, block_map)
        common.reset_peak_memory(device)
        first = first_call_seconds(lambda m=block_mask: flex_attention_on_block_mask(q, k, v, m), device)
        if graphs_after_first is None:
            graphs_after_first = counters["stats"]["unique_graphs"]
        ms = timed_ms(lambda m=block_mask: flex_attention_on_block_mask(q, k, v, m), device, args.repeats)
        actual = block_map.float().mean().item()
        rows.append(
            {
                "kernel": "nabla flex",
                "density": actual,
                "ms": ms,
                "tflops": attention_tflops(length, args.heads, args.head_dim, actual, ms / 1e3),
                "first_call_s": first,
                "block_mask_ms": mask_ms,
                "peak_memory_gib": common.peak_memory_gib(device),
            }
        )
    recompiles = counters["stats"]["unique_graphs"] - graphs_after_first

    # A real NABLA map from q and k: block-averaged softmax, cumulative threshold, sliding window.
    frames, height, width = grid
    window = sliding_window_block_mask(
        frames, height // FRACTAL_TILE, width // FRACTAL_TILE, *NABLA_WINDOW, device=device
    )[None, None]
    estimate_ms = timed_ms(lambda: nabla_block_mask(q, k, window, NABLA_P), device, args.repeats)
    real_density = nabla_block_mask(q, k, window, NABLA_P).float().mean().item()

    reference = next((r for r in rows if r["kernel"] == f"dense {args.dense_backends[0]}"), None)
    for row in rows:
        row["speedup_vs_" + args.dense_backends[0]] = reference["ms"] / row["ms"] if reference else None
    return {
        "length": length,
        "grid": grid,
        "rows": rows,
        "nabla_map_estimate_ms": estimate_ms,
        "nabla_map_density_random_qk": real_density,
        "recompiles_after_first_flex_call": recompiles,
    }


def correctness_check(grid, args, device, dtype) -> float:
    """Max |flex - SDPA with the expanded token mask| on one random map."""
    length = grid[0] * grid[1] * grid[2]
    generator = torch.Generator(device=device).manual_seed(1)
    q, k, v = random_qkv(length, args.heads, args.head_dim, device, dtype, generator)
    block_map = random_block_map(1, args.heads, length // NABLA_BLOCK_SIZE, CHECK_DENSITY, device, generator)
    got = flex_attention_on_block_mask(q, k, v, nabla_flex_block_mask(q, k, block_map))
    mask = expand_block_mask(block_map)
    expected = torch.nn.functional.scaled_dot_product_attention(
        *(t.transpose(1, 2).float() for t in (q, k, v)), attn_mask=mask
    ).transpose(1, 2)
    return (got.float() - expected).abs().max().item()


def print_table(sizes, reference_name):
    vs = "vs " + reference_name
    print(f"{'L':>7} {'kernel':14} {'density':>7} {'ms':>9} {'TFLOP/s':>8} {vs:>9} {'mask ms':>8} {'1st call s':>10}")
    for size in sizes:
        for row in size["rows"]:
            speed = row.get("speedup_vs_" + reference_name)
            mask = row.get("block_mask_ms")
            print(
                f"{size['length']:>7} {row['kernel']:14} {row['density']:7.1%} {row['ms']:9.2f} {row['tflops']:8.1f} "
                f"{'-' if speed is None else f'{speed:.2f}x':>9} {'-' if mask is None else f'{mask:.2f}':>8} "
                f"{row['first_call_s']:10.2f}"
            )
        print(
            f"{size['length']:>7} NABLA map estimate (P={NABLA_P}, window {NABLA_WINDOW}): "
            f"{size['nabla_map_estimate_ms']:.2f} ms, density {size['nabla_map_density_random_qk']:.1%} on random q/k; "
            f"recompiles after the first flex call: {size['recompiles_after_first_flex_call']}"
        )


def run(argv=None, progress: common.Progress | None = None, save: bool = True) -> dict:
    """Measure, print the table and (unless ``save`` is false or in smoke mode) write the JSON; return the result.
    ``progress`` receives the result so far after each size."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", choices=sorted(TOKEN_GRIDS), default=sorted(TOKEN_GRIDS))
    parser.add_argument("--densities", type=float, nargs="+", default=list(DENSITIES))
    parser.add_argument("--dense-backends", nargs="+", default=list(DENSE_BACKENDS))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes on the CPU (stand-ins for --lengths), float32; saves nothing"
    )
    args = parser.parse_args(argv)

    if args.smoke:
        device, dtype = torch.device("cpu"), torch.float32
        grids = {math.prod(SMOKE["grids"][n]): SMOKE["grids"][n] for n in args.lengths}
        args.heads, args.head_dim, check_grid = SMOKE["heads"], SMOKE["head_dim"], SMOKE["check_grid"]
        args.repeats = 1
        args.dense_backends = list(SMOKE_DENSE_BACKENDS)
    else:
        if not torch.cuda.is_available():
            parser.error("needs a CUDA GPU (use --smoke to check the script on a CPU)")
        device, dtype = torch.device("cuda"), torch.bfloat16
        grids = {length: TOKEN_GRIDS[length] for length in args.lengths}
        args.heads, args.head_dim, check_grid = HEADS, HEAD_DIM, CHECK_GRID

    sizes = []
    result = {
        **common.environment(),
        "benchmark": "attention kernels",
        "heads": args.heads,
        "head_dim": args.head_dim,
        "dtype": str(dtype),
        "repeats": args.repeats,
        "sizes": sizes,
    }
    with torch.no_grad(), common.smoke_stance(args.smoke):
        for length, grid in grids.items():
            sizes.append(bench_length(length, grid, args, device, dtype))
            common.report(progress, result)
        check_error = correctness_check(check_grid, args, device, dtype)
    result["flex_vs_masked_sdpa_max_abs_error"] = check_error

    print(f"attention, 1 x L x {args.heads} heads x {args.head_dim}, {dtype}, {result['device']}")
    print_table(sizes, args.dense_backends[0])
    check_length = check_grid[0] * check_grid[1] * check_grid[2]
    print(f"flex vs SDPA with the expanded mask at L={check_length}: max |difference| {check_error:.2e}")
    if save:
        slug = re.sub(r"[^a-z0-9]+", "-", result["device"].lower()).strip("-")
        common.save_results(f"attention-{slug}", result, args.smoke)
    return result


def main(argv=None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
