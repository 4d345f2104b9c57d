"""VAE decode, ours next to diffusers', on the same random full-size weights in one process.

    python benchmarks/vae.py                      # 121 frames at 512x768, bf16, on the GPU
    python benchmarks/vae.py --height 768 --width 1280
    python benchmarks/vae.py --variants diffusers,ours --repeats 1
    python benchmarks/vae.py --smoke              # tiny VAE on the CPU in float32: checks the script only

Rows (``--variants``, default all): diffusers with spatial tiling off (its default; ``diffusers``) and on
(``diffusers-tiled``); ours by default (``ours``: spatial tiles only if memory is short, the row says which path
the automatic policy took), with tiling forced on (``ours-tiled``), and with channels-last 3D activations
(``ours-channels-last``). Columns: mean seconds, peak memory and peak above what was allocated before the row (the
decode's own activations; compare with the automatic policy's estimate), relative L2 against the diffusers decode
taking the same path (untiled with untiled, tiled with tiled) and against diffusers' default (untiled).

Also reported: the automatic tiling estimate next to the free memory it was compared with, and a layout audit of
one short decode in each layout (with ``ours-channels-last``): per operator kind, how many 5D inputs and outputs
were channels-last (an operator that returns the default layout costs the next convolution a conversion copy).
Writes ``benchmarks/results/vae-decode-<HxWxF>.json``.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from forward import VAE_SPATIAL, VAE_TEMPORAL  # noqa: E402
from pipeline import build_vae_pair  # noqa: E402

from kandinsky5.models.vae import CausalFrameAttention, CausalUpsample  # noqa: E402
from kandinsky5.runtime.vae_tiling import AUTO_TILING_HEADROOM  # noqa: E402

LATENT_CHANNELS = 16
GIB = 2**30
# The layout audit decodes this many latent frames (one chunk, no frame-wise tiles): every operator kind runs.
AUDIT_LATENT_FRAMES = 2
AUDITED_MODULES = (nn.Conv3d, nn.GroupNorm, nn.SiLU, CausalUpsample, CausalFrameAttention)
# --variants: name -> row label, in the order they run (diffusers' rows first: ours are compared with them).
VARIANTS = {
    "diffusers": "diffusers",
    "diffusers-tiled": "diffusers tiled",
    "ours": "kandinsky5",
    "ours-tiled": "kandinsky5 tiled",
    "ours-channels-last": "kandinsky5 channels-last",
}


def allocated_gib(device: torch.device) -> float | None:
    return torch.cuda.memory_allocated(device) / GIB if device.type == "cuda" else None


def is_channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()


@torch.no_grad()
def layout_audit(vae: nn.Module, latents: torch.Tensor) -> dict[str, dict[str, int]]:
    """Per operator kind, over one decode of ``latents``: calls, and how many 5D inputs and outputs were
    channels-last (a Conv3d's input is the padded activation)."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: {"calls": 0, "channels_last_in": 0, "channels_last_out": 0})

    def record(module, args, output):
        row = counts[type(module).__name__]
        if args[0].dim() != 5:  # the attention's GroupNorm sees (B, C, tokens)
            return
        row["calls"] += 1
        row["channels_last_in"] += is_channels_last(args[0])
        row["channels_last_out"] += is_channels_last(output)

    handles = [m.register_forward_hook(record) for m in vae.modules() if isinstance(m, AUDITED_MODULES)]
    try:
        vae.decode(latents)
    finally:
        for handle in handles:
            handle.remove()
    return dict(counts)


def run(argv=None, progress: common.Progress | None = None, save: bool = True) -> dict:
    """Measure, print the table and (unless ``save`` is false or in smoke mode) write the JSON; return the result.
    ``progress`` receives the result so far after each row."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_run_arguments(parser)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)} (default all)"
    )
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    # smoke: 3 latent frames of 4x4 (one temporal chunk; tests/test_vae.py compares every decode path)
    name, device, dtype = common.choose_run(args, parser, height=32, width=32, frames=9, repeats=1)
    ours, reference = build_vae_pair(name, device, dtype)

    t = (args.frames - 1) // VAE_TEMPORAL + 1
    shape = (1, LATENT_CHANNELS, t, args.height // VAE_SPATIAL, args.width // VAE_SPATIAL)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)

    rows, outputs = {}, {}
    result = {
        **common.environment(),
        "benchmark": "VAE decode",
        "size": {"height": args.height, "width": args.width, "frames": args.frames},
        "dtype": str(dtype),
        "repeats": args.repeats,
        "variants": variants,
        "results": rows,
    }

    def measure(label, vae, compare_with=None):
        common.reset_peak_memory(device)
        before = allocated_gib(device)
        with torch.no_grad():
            seconds, out = common.timed(lambda: vae.decode(latents).sample, device, args.repeats)
        peak = common.peak_memory_gib(device)
        row = rows[label] = {
            "seconds": seconds,
            "peak_memory_gib": peak,
            "peak_above_start_gib": None if peak is None else peak - before,
        }
        # relative L2 against the diffusers decode taking the same path, and against diffusers' default (untiled),
        # where those rows were measured
        if compare_with is not None:
            row["compared_with"] = compare_with
            if compare_with in outputs:
                row["relative_l2"] = common.relative_l2(out, outputs[compare_with])
            if "diffusers" in outputs:
                row["relative_l2_vs_diffusers"] = common.relative_l2(out, outputs["diffusers"])
        outputs[label] = out
        common.report(progress, result)

    if "diffusers" in variants:
        measure("diffusers", reference)
    if "diffusers-tiled" in variants:
        reference.enable_tiling()
        measure("diffusers tiled", reference)
        reference.disable_tiling()
    del reference

    # ours by default: the automatic policy decides per call
    tiled = ours.tiling_needed(latents)
    free = ours.free_memory(latents.device)
    estimate = ours.untiled_decode_peak_bytes(latents)
    result["auto_tiling"] = auto_tiling = {
        "estimated_peak_gib": estimate / GIB,
        "threshold_gib": estimate * AUTO_TILING_HEADROOM / GIB,
        "free_gib": None if free is None else free / GIB,
        "tiled": tiled,
    }
    if "ours" in variants:
        measure("kandinsky5", ours, "diffusers tiled" if tiled else "diffusers")
        rows["kandinsky5"]["tiled"] = tiled
    if "ours-tiled" in variants:
        # the decode under a forced spatial tiling, as diffusers' enable_tiling()
        ours.enable_tiling()
        measure("kandinsky5 tiled", ours, "diffusers tiled")
        ours.enable_auto_tiling()
    if "ours-channels-last" in variants:
        # the layout audit of one short decode, default layout first (the baseline of the channels-last one)
        result["default_layout"] = layout_audit(ours, latents[:, :, :AUDIT_LATENT_FRAMES])
        ours.to(memory_format=torch.channels_last_3d)
        tiled = ours.tiling_needed(latents)
        measure("kandinsky5 channels-last", ours, "diffusers tiled" if tiled else "diffusers")
        rows["kandinsky5 channels-last"]["tiled"] = tiled
        result["channels_last_layout"] = layout_audit(ours, latents[:, :, :AUDIT_LATENT_FRAMES])
        common.report(progress, result)

    print(f"VAE decode {args.height}x{args.width}x{args.frames}, {dtype}")
    print(f"{'':26} {'s':>8} {'peak GiB':>9} {'rel L2':>9} {'+GiB':>6} {'vs untiled':>10}  compared with")
    for label, row in rows.items():
        peak = common.cell(row, "peak_memory_gib", ".1f")
        above = common.cell(row, "peak_above_start_gib", ".1f")
        l2 = common.cell(row, "relative_l2", ".1e")
        l2_untiled = common.cell(row, "relative_l2_vs_diffusers", ".1e")
        path = "" if "tiled" not in row else (" (auto: tiled)" if row["tiled"] else " (auto: untiled)")
        print(
            f"{label:26} {row['seconds']:8.2f} {peak:>9} {l2:>9} {above:>6} {l2_untiled:>10}  "
            f"{row.get('compared_with', '')}{path}"
        )
    free_text = "unknown (never tiles)" if free is None else f"{auto_tiling['free_gib']:.1f} GiB free"
    print(
        f"auto tiling: estimated untiled peak {auto_tiling['estimated_peak_gib']:.2f} GiB "
        f"(x{AUTO_TILING_HEADROOM} = {auto_tiling['threshold_gib']:.2f}) vs {free_text}"
    )
    for layout in ("default", "channels_last"):
        for kind, count in result.get(f"{layout}_layout", {}).items():
            print(
                f"layout audit, {layout + ' run':18} {kind:20} {count['calls']:4} calls, channels-last in "
                f"{count['channels_last_in']:4}, out {count['channels_last_out']:4}"
            )
    if save:
        common.save_results(f"vae-decode-{args.height}x{args.width}x{args.frames}", result, args.smoke)
    return result


def main(argv=None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
