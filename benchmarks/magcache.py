"""MagCache against the exact path: our T2V pipeline on the same random full-size weights, with and without the cache.

    python benchmarks/magcache.py                      # Lite sft 5 s ratios, 50 steps, CFG 5, 512x768x121, bf16
    python benchmarks/magcache.py --threshold 0.2      # another threshold
    python benchmarks/magcache.py --smoke              # tiny models on the CPU: checks the script

Reported: model calls skipped of all, the sampling loop's seconds (from the run control's denoising events) with and
without the cache and their ratio (the speed-up of the loop), end-to-end seconds of each run, and the frames'
relative L2 from the exact run. With random weights the frames say nothing about quality; MagCache's skip decisions
depend only on the calibrated ratios and the settings, so the calls skipped and the time saved are those of the real
model. Writes ``benchmarks/results/magcache-<model>-<HxWxF>-<steps>steps.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from pipeline import build_pipelines, build_shared_components, generation_arguments  # noqa: E402

from kandinsky5 import MagCacheConfig, RunControl  # noqa: E402
from kandinsky5.sampling.caches import official_ratios  # noqa: E402
from kandinsky5.sampling.control import Phase  # noqa: E402
from kandinsky5.variants import get_variant  # noqa: E402

RATIOS_OF = "lite-sft-5s"  # the variant whose official ratios the cache uses
STEPS = 50


def timed_generation(pipe, args, device: torch.device) -> tuple[dict, torch.Tensor]:
    """One generation: end-to-end seconds, the sampling loop's seconds, and the frames."""
    denoise_events: list[float] = []
    control = RunControl(on_progress=lambda e: denoise_events.append(e.elapsed_s) if e.phase is Phase.DENOISE else None)
    common.synchronize(device)
    start = time.perf_counter()
    frames = pipe(**generation_arguments(args), output_type="pt", control=control).frames
    common.synchronize(device)
    row = {
        "end_to_end_seconds": time.perf_counter() - start,
        # from the loop's start event to its last step's (the steps queue asynchronously; the decode that follows
        # waits for them, so on a GPU this undercounts the last step's tail a little on both runs alike)
        "sampling_seconds": denoise_events[-1] - denoise_events[0],
    }
    return row, frames


def run(argv=None, progress: common.Progress | None = None, save: bool = True) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_run_arguments(parser)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--threshold", type=float, default=None, help="MagCache threshold (default: the original's)")
    args = parser.parse_args(argv)
    name, device, dtype = common.choose_run(args, parser, height=32, width=32, frames=5, steps=10)
    pipe = build_pipelines(build_shared_components(name, device, dtype))["kandinsky5"]
    pipe.set_progress_bar_config(disable=True)
    settings = {} if args.threshold is None else {"threshold": args.threshold}
    config = MagCacheConfig(ratios=official_ratios(get_variant(RATIOS_OF)), **settings)
    result = {
        **common.environment(),
        "benchmark": "MagCache vs exact, our T2V pipeline",
        "model": name,
        "ratios": RATIOS_OF,
        "threshold": config.threshold,
        "size": {"height": args.height, "width": args.width, "frames": args.frames},
        "steps": args.steps,
        "guidance_scale": args.guidance,
        "dtype": str(dtype),
    }
    timed_generation(pipe, argparse.Namespace(**{**vars(args), "steps": 2}), device)  # warm-up, untimed
    exact, exact_frames = timed_generation(pipe, args, device)
    result["exact"] = exact
    common.report(progress, result)
    cache = pipe.transformer.enable_cache(config)
    cached, cached_frames = timed_generation(pipe, args, device)
    pipe.transformer.disable_cache()
    cached.update(skipped_calls=cache.skipped_calls, total_calls=cache.total_calls)
    result["magcache"] = cached
    result["sampling_speedup"] = exact["sampling_seconds"] / cached["sampling_seconds"]
    result["end_to_end_speedup"] = exact["end_to_end_seconds"] / cached["end_to_end_seconds"]
    result["frames_relative_l2_vs_exact"] = common.relative_l2(cached_frames, exact_frames)
    common.report(progress, result)
    print(f"{name} T2V {args.height}x{args.width}x{args.frames}, {args.steps} steps, CFG {args.guidance}, {dtype}")
    print(
        f"MagCache ({RATIOS_OF} ratios, threshold {config.threshold}): skipped {cache.skipped_calls} of "
        f"{cache.total_calls} model calls"
    )
    print(f"{'':10} {'total s':>9} {'sampling s':>11}")
    for label, row in (("exact", exact), ("magcache", cached)):
        print(f"{label:10} {row['end_to_end_seconds']:9.2f} {row['sampling_seconds']:11.2f}")
    print(
        f"sampling speed-up {result['sampling_speedup']:.2f}x, end-to-end {result['end_to_end_speedup']:.2f}x; "
        f"frames relative L2 vs exact: {result['frames_relative_l2_vs_exact']:.2e}"
    )
    if save:
        common.save_results(
            f"magcache-{name}-{args.height}x{args.width}x{args.frames}-{args.steps}steps", result, args.smoke
        )
    return result


def main(argv=None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
