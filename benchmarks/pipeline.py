"""The whole text-to-video pipeline, ours next to diffusers', on the same random full-size weights.

    python benchmarks/pipeline.py --model lite                     # 50 steps, CFG 5, 512x768x121, bf16
    python benchmarks/pipeline.py --model pro --height 768 --width 1024 --steps 2 --offload
    python benchmarks/pipeline.py --smoke                          # tiny models on the CPU: checks the script

Both pipelines share every weight tensor (Qwen2.5-VL-7B, CLIP-L, DiT, VAE), created once with random values;
the real tokenizers come from ../shared/reference/tokenizers. Models are loaded before timing starts, as a user's
second video would find them. Reported per pipeline: end-to-end seconds (text encoding + sampling + VAE decode +
MP4), seconds per step (the mean step after the first), fixed seconds (end-to-end - steps x seconds per step) and
the end-to-end time extrapolated to 50 steps (fixed + 50 x seconds per step: short runs such as ``--steps 4``
stand for the real 50), VAE decode seconds, peak GPU memory; and the relative L2 difference of the frames.
Writes ``benchmarks/results/pipeline-<model>-<HxWxF>-<steps>steps[-offload].json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from forward import TEXT_TOKENS, VAE_SPATIAL, VAE_TEMPORAL, build_models  # noqa: E402

from kandinsky5 import Kandinsky5T2VPipeline, export_to_video  # noqa: E402
from kandinsky5.models.vae import AutoencoderKLHunyuanVideo  # noqa: E402

# The real tokenizers and configs; ../shared/reference beside the checkout, or where KANDINSKY5_REFERENCE_DIR says
# (a GPU machine that receives the repository alone gets a copy inside it).
REFERENCE_DIR = Path(
    os.environ.get("KANDINSKY5_REFERENCE_DIR", Path(__file__).resolve().parents[2] / "shared" / "reference")
)
PROMPT = "A cat and a dog baking a cake together in a kitchen."
SHIFT = 5.0
WARMUP_STEPS = 2
# The step count of the official Lite and Pro sft checkpoints: short runs are also reported extrapolated to it.
REFERENCE_STEPS = 50
SMOKE_VAE = dict(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4)


def vae_config(name: str) -> dict:
    """The official HunyuanVideo VAE config (tiny channels for ``smoke``)."""
    config = json.loads((REFERENCE_DIR / "checkpoint-pro-5s" / "vae" / "config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    if name == "smoke":
        config.update(SMOKE_VAE)
    return config


def build_vae_pair(name: str, device: torch.device, dtype: torch.dtype):
    """(ours, diffusers') HunyuanVideo VAE with the official config (tiny for ``smoke``), random weights, the very
    same tensors in both."""
    from diffusers import AutoencoderKLHunyuanVideo as ReferenceVAE

    config = vae_config(name)
    with torch.device(device):
        reference_vae = ReferenceVAE(**config).to(dtype).eval().requires_grad_(False)
    with torch.device("meta"):
        ours_vae = AutoencoderKLHunyuanVideo.from_config(config)
    ours_vae.load_state_dict(reference_vae.state_dict(), assign=True)
    return ours_vae.eval().requires_grad_(False), reference_vae


def build_our_vae(name: str, device: torch.device, dtype: torch.dtype) -> AutoencoderKLHunyuanVideo:
    """Our VAE alone, PyTorch's default initialisation (no diffusers import: for checks of ours only)."""
    with torch.device(device):
        vae = AutoencoderKLHunyuanVideo.from_config(vae_config(name))
    return vae.to(dtype).eval().requires_grad_(False)


def build_shared_components(name: str, device: torch.device, dtype: torch.dtype) -> dict:
    """Random-weight components, each created once; returns kwargs for both pipelines' constructors."""
    shared = common.build_text_components(REFERENCE_DIR, name, device, dtype)
    smoke_text = dict(in_text_dim=common.SMOKE_TEXT_HIDDEN, in_text_dim2=common.SMOKE_TEXT_HIDDEN)
    dit_config = dict(common.SMOKE, **smoke_text) if name == "smoke" else common.CONFIGS[name]
    ours_dit, reference_dit = build_models(dit_config, device, dtype)
    ours_vae, reference_vae = build_vae_pair(name, device, dtype)
    return {
        "ours": dict(shared, transformer=ours_dit, vae=ours_vae.eval()),
        "reference": dict(shared, transformer=reference_dit, vae=reference_vae),
    }


def build_pipelines(components: dict):
    from diffusers import FlowMatchEulerDiscreteScheduler as ReferenceScheduler
    from diffusers import Kandinsky5T2VPipeline as ReferencePipeline

    from kandinsky5 import FlowMatchEulerDiscreteScheduler

    ours = Kandinsky5T2VPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT), **components["ours"])
    reference = ReferencePipeline(scheduler=ReferenceScheduler(shift=SHIFT), **components["reference"])
    # ours first: a run cut short by a time box (benchmarks/gpu_check.sh) keeps our figures
    return {"kandinsky5": ours, "diffusers": reference}


def generation_arguments(args) -> dict:
    """The call's prompt, size, schedule and seed (the same for every pipeline and run)."""
    return dict(
        prompt=PROMPT,
        height=args.height,
        width=args.width,
        num_frames=args.frames,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        generator=torch.Generator().manual_seed(0),
    )


def run_pipeline(
    pipe, args, device: torch.device, out_dir: Path, label: str, export: bool = True
) -> tuple[dict, object]:
    call = common.timed_call(pipe, generation_arguments(args), device)
    frames, start, step_ends = call.output.frames[0], call.start, call.step_ends
    sampled_and_decoded = call.end
    mp4 = "not asked"
    try:
        if export:
            export_to_video(frames, str(out_dir / f"{label}.mp4"), fps=24)
            mp4 = "written"
    except ImportError as error:  # no PyAV (a GPU machine without its wheel): the rest still counts
        mp4 = f"skipped: {error}"
    end = time.perf_counter()
    row = {
        "end_to_end_seconds": end - start,
        "seconds_per_step": call.seconds_per_step,
        "decode_and_export_seconds": end - step_ends[-1],
        "mp4_seconds": end - sampled_and_decoded,
        "mp4": mp4,
        "peak_memory_gib": common.peak_memory_gib(device),
    }
    if row["seconds_per_step"] is not None:
        # fixed costs (text encoding, latent set-up, VAE decode, MP4) + REFERENCE_STEPS x the time of one step; the
        # mean step excludes the first, which also waits for the text encoders
        row["fixed_seconds"] = row["end_to_end_seconds"] - args.steps * row["seconds_per_step"]
        row[f"end_to_end_seconds_at_{REFERENCE_STEPS}_steps"] = (
            row["fixed_seconds"] + REFERENCE_STEPS * row["seconds_per_step"]
        )
    return row, frames


def time_vae_decode(pipes: dict, args, device: torch.device, dtype: torch.dtype) -> dict:
    """VAE decode of the same latents through each pipeline's VAE."""
    t = (args.frames - 1) // 4 + 1
    latents = torch.randn(1, 16, t, args.height // 8, args.width // 8, generator=torch.Generator().manual_seed(1))
    latents = latents.to(device, dtype)
    results = {}
    for label, pipe in pipes.items():
        common.reset_peak_memory(device)
        seconds, _ = common.timed(lambda p=pipe: p.vae.decode(latents).sample, device, repeats=1, warmup=0)
        results[label] = {"seconds": seconds, "peak_memory_gib": common.peak_memory_gib(device)}
    return results


def run(argv=None, progress: common.Progress | None = None, save: bool = True) -> dict:
    """Measure, print the table and (unless ``save`` is false or in smoke mode) write the JSON; return the result.
    ``progress`` receives the result so far after each pipeline."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_run_arguments(parser)
    parser.add_argument("--steps", type=int, default=REFERENCE_STEPS)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--offload", action="store_true", help="enable_model_cpu_offload() on both pipelines")
    parser.add_argument("--only", choices=["both", "kandinsky5", "diffusers"], default="both")
    parser.add_argument("--batched-guidance", action="store_true", help="ours: condition and negative in one call")
    parser.add_argument("--fuse-qkv", action="store_true", help="ours: pipe.fuse_qkv_projections()")
    parser.add_argument("--compile", action="store_true", help="ours: transformer.compile() (regional)")
    parser.add_argument(
        "--warmup-steps", type=int, default=WARMUP_STEPS, help="steps of the untimed first run of each pipeline"
    )
    parser.add_argument(
        "--skip-vae-timing", action="store_true", help="no separate VAE decode timing (benchmarks/vae.py's job)"
    )
    args = parser.parse_args(argv)
    name, device, dtype = common.choose_run(args, parser, height=32, width=32, frames=5, steps=2)
    pipes = build_pipelines(build_shared_components(name, device, dtype))
    if args.only != "both":
        pipes = {args.only: pipes[args.only]}
    if "kandinsky5" in pipes:
        ours = pipes["kandinsky5"]
        ours.batched_guidance = args.batched_guidance
        if args.fuse_qkv:
            ours.fuse_qkv_projections()
        if args.compile:
            ours.transformer.compile()
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
        if args.offload:
            for module in (pipe.text_encoder, pipe.text_encoder_2, pipe.transformer, pipe.vae):
                module.to("cpu")
            pipe.enable_model_cpu_offload(device=device)
    # roofline of one step: one DiT forward per guidance branch (text length: the forward benchmark's typical one)
    config = common.CONFIGS[name]
    _, patch_h, patch_w = config["patch_size"]
    latent_frames = (args.frames - 1) // VAE_TEMPORAL + 1
    visual_tokens = latent_frames * (args.height // (VAE_SPATIAL * patch_h)) * (args.width // (VAE_SPATIAL * patch_w))
    forwards_per_step = 2 if args.guidance > 1 else 1
    step_roofline = forwards_per_step * common.roofline_seconds(
        config, common.transformer_flops(config, visual_tokens, TEXT_TOKENS)
    )
    rows, frames, decode = {}, {}, {}
    result = {
        **common.environment(),
        "benchmark": "text-to-video pipeline",
        "model": name,
        "size": {"height": args.height, "width": args.width, "frames": args.frames},
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "guidance_scale": args.guidance,
        "offload": args.offload,
        "batched_guidance": args.batched_guidance,
        "fuse_qkv": args.fuse_qkv,
        "compile": args.compile,
        "dtype": str(dtype),
        "extrapolation": f"end_to_end_seconds_at_{REFERENCE_STEPS}_steps = fixed_seconds + {REFERENCE_STEPS} x "
        f"seconds_per_step, fixed_seconds = end_to_end_seconds - {args.steps} x seconds_per_step",
        "results": rows,
        "vae_decode": decode,
    }
    with tempfile.TemporaryDirectory() as tmp:
        for label, pipe in pipes.items():
            # one short run first: kernel selection, allocator growth, lazy initialisation and compilation are kept
            # out of the timed run (and reported as warm-up seconds); it writes no MP4 (the encoder needs no warming)
            warmup_args = argparse.Namespace(**{**vars(args), "steps": args.warmup_steps})
            warmup, _ = run_pipeline(pipe, warmup_args, device, Path(tmp), label, export=False)
            row, frames[label] = run_pipeline(pipe, args, device, Path(tmp), label)
            row["warmup_seconds"] = warmup["end_to_end_seconds"]
            if row["seconds_per_step"]:
                row["step_roofline_fraction"] = step_roofline / row["seconds_per_step"]
            rows[label] = row
            common.report(progress, result)
    if not (args.offload or args.skip_vae_timing):
        decode.update(time_vae_decode(pipes, args, device, dtype))
    if len(frames) == 2:
        a, b = (torch.from_numpy(frames[k]) for k in ("kandinsky5", "diffusers"))
        result["frames_relative_l2_vs_diffusers"] = common.relative_l2(a, b)
        result["end_to_end_speedup_vs_diffusers"] = (
            rows["diffusers"]["end_to_end_seconds"] / rows["kandinsky5"]["end_to_end_seconds"]
        )
        if rows["kandinsky5"]["seconds_per_step"]:
            result["step_speedup_vs_diffusers"] = (
                rows["diffusers"]["seconds_per_step"] / rows["kandinsky5"]["seconds_per_step"]
            )
    print(
        f"{name} T2V {args.height}x{args.width}x{args.frames}, {args.steps} steps, CFG {args.guidance}, {dtype}"
        + (", model offload" if args.offload else "")
    )
    at = f"at {REFERENCE_STEPS} steps"
    print(f"{'':12} {'total s':>9} {'s/step':>8} {'fixed s':>8} {at:>12} {'peak GiB':>9} {'roofline':>9}")
    for label, row in rows.items():
        peak = common.cell(row, "peak_memory_gib", ".1f")
        per_step = common.cell(row, "seconds_per_step", ".3f")
        fixed = common.cell(row, "fixed_seconds", ".2f")
        extrapolated = common.cell(row, f"end_to_end_seconds_at_{REFERENCE_STEPS}_steps", ".1f")
        roofline = common.cell(row, "step_roofline_fraction", ".2f")
        print(
            f"{label:12} {row['end_to_end_seconds']:9.2f} {per_step:>8} {fixed:>8} {extrapolated:>12} {peak:>9} "
            f"{roofline:>9}"
        )
    for label, row in decode.items():
        print(f"VAE decode {label}: {row['seconds']:.2f} s")
    if "frames_relative_l2_vs_diffusers" in result:
        print(f"frames relative L2 vs diffusers: {result['frames_relative_l2_vs_diffusers']:.2e}")
    options = {
        "offload": args.offload,
        "batched": args.batched_guidance,
        "fused": args.fuse_qkv,
        "compiled": args.compile,
    }
    suffix = "".join(f"-{option}" for option, on in options.items() if on)
    if save:
        tag = f"pipeline-{name}-{args.height}x{args.width}x{args.frames}-{args.steps}steps{suffix}"
        common.save_results(tag, result, args.smoke)
    return result


def main(argv=None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
