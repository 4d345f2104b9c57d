"""VAE decode, ours next to diffusers', on the same random full-size weights in one process.

    python benchmarks/vae.py                      # 121 frames at 512x768, bf16, on the GPU
    python benchmarks/vae.py --height 768 --width 1280
    python benchmarks/vae.py --smoke              # tiny VAE on the CPU: checks the script only

Rows: diffusers with spatial tiling off (its default) and on; ours by default (spatial tiles only if memory is
short), with channels-last 3D activations, and with tiling forced on. Each of ours is compared (relative L2) with
the diffusers decode that takes the same path: untiled with untiled, tiled with tiled. Writes
``benchmarks/results/vae-decode-<HxWxF>.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from forward import VAE_SPATIAL, VAE_TEMPORAL  # noqa: E402
from pipeline import build_vae_pair  # noqa: E402

LATENT_CHANNELS = 16


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_run_arguments(parser)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    name, device, dtype = common.choose_run(args, parser, height=64, width=64, frames=25, repeats=1)
    ours, reference = build_vae_pair(name, device, dtype)

    t = (args.frames - 1) // VAE_TEMPORAL + 1
    shape = (1, LATENT_CHANNELS, t, args.height // VAE_SPATIAL, args.width // VAE_SPATIAL)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)

    rows, outputs = {}, {}

    def measure(label, vae, compare_with=None):
        common.reset_peak_memory(device)
        with torch.no_grad():
            seconds, out = common.timed(lambda: vae.decode(latents).sample, device, args.repeats)
        rows[label] = {"seconds": seconds, "peak_memory_gib": common.peak_memory_gib(device)}
        if compare_with is not None:
            rows[label]["compared_with"] = compare_with
            rows[label]["relative_l2"] = common.relative_l2(out, outputs[compare_with])
        outputs[label] = out

    measure("diffusers", reference)
    reference.enable_tiling()
    measure("diffusers tiled", reference)
    measure("kandinsky5", ours, "diffusers")
    rows["kandinsky5"]["tiled"] = ours.tiling_needed(latents)
    # the decode under a forced spatial tiling, as diffusers' enable_tiling()
    ours.enable_tiling()
    measure("kandinsky5 tiled", ours, "diffusers tiled")
    ours.disable_tiling()
    ours.enable_auto_tiling()
    ours.to(memory_format=torch.channels_last_3d)
    measure("kandinsky5 channels-last", ours, "diffusers")

    result = {
        **common.environment(),
        "benchmark": "VAE decode",
        "size": {"height": args.height, "width": args.width, "frames": args.frames},
        "dtype": str(dtype),
        "repeats": args.repeats,
        "results": rows,
    }
    print(f"VAE decode {args.height}x{args.width}x{args.frames}, {dtype}")
    print(f"{'':26} {'s':>8} {'peak GiB':>9} {'rel L2':>9}  compared with")
    for label, row in rows.items():
        peak = "-" if row["peak_memory_gib"] is None else f"{row['peak_memory_gib']:.1f}"
        l2 = f"{row['relative_l2']:.1e}" if "relative_l2" in row else "-"
        print(f"{label:26} {row['seconds']:8.2f} {peak:>9} {l2:>9}  {row.get('compared_with', '')}")
    path = common.save_results(f"vae-decode-{args.height}x{args.width}x{args.frames}", result, args.smoke)
    if path:
        print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
