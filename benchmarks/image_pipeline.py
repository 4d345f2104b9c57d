"""The whole text-to-image pipeline (or, with ``--edit``, the image-editing one), ours next to diffusers', on the
same random full-size weights.

    python benchmarks/image_pipeline.py                            # T2I, 1024x1024, 50 steps, guidance 3.5, bf16
    python benchmarks/image_pipeline.py --edit                     # editing a fixed synthetic 1024x1024 picture
    python benchmarks/image_pipeline.py --steps 4 --offload        # model CPU offload on both pipelines
    python benchmarks/image_pipeline.py --smoke [--edit]           # tiny models on the CPU: checks the script

Both pipelines share every weight tensor (Qwen2.5-VL-7B with its vision tower, CLIP-L, the image DiT, FLUX's VAE),
created once with random values; the real tokenizers and Qwen2.5-VL's image processor configuration come from
../shared/reference/tokenizers (or ``KANDINSKY5_REFERENCE_DIR``). The image DiT: model_dim 2560, ff_dim 10240,
50 visual blocks, dense attention, ``visual_cond`` for editing; the VAE: FLUX's ``AutoencoderKL``. Models are loaded
and each pipeline runs a short untimed warm-up before its timed run. Reported per pipeline: end-to-end seconds
(text encoding, and for editing the source image's encodings, + sampling + VAE decode, ``output_type="np"``),
seconds per step (the mean step after the first), fixed seconds (end-to-end - steps x seconds per step), the seconds
after the last step (decode and post-processing), the step's roofline fraction and peak GPU memory; the VAE decode
of the same random latents through each pipeline's VAE (not with ``--offload``); the relative L2 of the two images.
Writes ``benchmarks/results/image-pipeline-<t2i|edit>-<HxW>-<steps>steps[-offload].json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from forward import TEXT_TOKENS, VAE_SPATIAL, build_models  # noqa: E402
from pipeline import REFERENCE_DIR  # noqa: E402

from kandinsky5 import Kandinsky5I2IPipeline, Kandinsky5T2IPipeline  # noqa: E402
from kandinsky5.models.vae2d import AutoencoderKL2D  # noqa: E402
from kandinsky5.runtime import memory_plan  # noqa: E402
from kandinsky5.tiny import TINY_IMAGE_VAE  # noqa: E402

PROMPT = "A cat and a dog baking a cake together in a kitchen."
EDIT_PROMPT = "Make the background a starry night sky."
# the image models' defaults (diffusers' and the original repository's)
SHIFT = 3.0
STEPS = 50
GUIDANCE = 3.5
SIZE = 1024  # diffusers snaps every size to the models' 1024-class resolutions: smoke runs keep it too
WARMUP_STEPS = 2
LATENT_CHANNELS = 16

# The official image checkpoints' DiT and FLUX's VAE: the configs the memory plan builds its estimates from.
IMAGE_DIT = dict(memory_plan.DIT_COMMON, **memory_plan.IMAGE_DIT)
IMAGE_VAE = dict(memory_plan.FLUX_VAE)
# Smoke runs: the tiny text encoders' width; the package's tiny image VAE narrowed further (its decode at 1024x1024,
# the size diffusers insists on, is most of a smoke run's time); the latent size of the separate VAE timing.
SMOKE_VAE = dict(TINY_IMAGE_VAE, block_out_channels=[4, 4, 8, 8])
SMOKE_DECODE_LATENT = 32


def dit_config(name: str, edit: bool) -> dict:
    """The image DiT (the package's tiny one for ``smoke``), with the condition channels for editing."""
    config = (
        dict(common.SMOKE, in_text_dim=common.SMOKE_TEXT_HIDDEN, in_text_dim2=common.SMOKE_TEXT_HIDDEN)
        if name == "smoke"
        else IMAGE_DIT
    )
    return dict(config, visual_cond=edit)


def vae_config(name: str) -> dict:
    return dict(SMOKE_VAE) if name == "smoke" else dict(IMAGE_VAE)


def build_vae_pair(name: str, device: torch.device, dtype: torch.dtype):
    """(ours, diffusers') image VAE, random weights, the very same tensors in both."""
    from diffusers import AutoencoderKL

    config = vae_config(name)
    with torch.device(device):
        reference_vae = AutoencoderKL(**config).to(dtype).eval().requires_grad_(False)
    with torch.device("meta"):
        ours_vae = AutoencoderKL2D.from_config(config)
    ours_vae.load_state_dict(reference_vae.state_dict(), assign=True)
    return ours_vae.eval().requires_grad_(False), reference_vae


def qwen_processor(tokenizer):
    """transformers' ``Qwen2VLProcessor`` with the real image processor configuration and no video processor (which
    needs torchvision, absent here and maybe on the GPU machine): both editing pipelines take it as ``tokenizer``."""
    from transformers import Qwen2VLProcessor

    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil as Processor
    except ImportError:  # older transformers: the PIL/numpy processor is the plain one
        from transformers import Qwen2VLImageProcessor as Processor

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        attributes = ["image_processor", "tokenizer"]

        @classmethod
        def get_attributes(cls):
            return ["image_processor", "tokenizer"]

    image_processor = Processor.from_pretrained(str(REFERENCE_DIR / "tokenizers" / "qwen2_5_vl"))
    return ImageOnlyQwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build_shared_components(name: str, edit: bool, device: torch.device, dtype: torch.dtype) -> dict:
    """Random-weight components, each created once; returns kwargs for both pipelines' constructors. The image
    models' text encoders are the video models' (Qwen2.5-VL-7B, its vision tower too, and CLIP-L)."""
    shared = common.build_text_components(REFERENCE_DIR, name, device, dtype)
    if edit:
        shared["tokenizer"] = qwen_processor(shared["tokenizer"])
    ours_dit, reference_dit = build_models(dit_config(name, edit), device, dtype)
    ours_vae, reference_vae = build_vae_pair(name, device, dtype)
    return {
        "ours": dict(shared, transformer=ours_dit, vae=ours_vae),
        "reference": dict(shared, transformer=reference_dit, vae=reference_vae),
    }


def build_pipelines(components: dict, edit: bool) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler as ReferenceScheduler
    from diffusers import Kandinsky5I2IPipeline as ReferenceI2I
    from diffusers import Kandinsky5T2IPipeline as ReferenceT2I

    from kandinsky5 import FlowMatchEulerDiscreteScheduler

    ours_class, reference_class = (
        (Kandinsky5I2IPipeline, ReferenceI2I) if edit else (Kandinsky5T2IPipeline, ReferenceT2I)
    )
    ours = ours_class(scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT), **components["ours"])
    reference = reference_class(scheduler=ReferenceScheduler(shift=SHIFT), **components["reference"])
    # ours first, as in pipeline.py: a run cut short keeps our figures
    return {"kandinsky5": ours, "diffusers": reference}


def source_image(height: int, width: int) -> PIL.Image.Image:
    """A fixed synthetic picture to edit: colour gradients, a disc and a band of stripes (no file, no randomness)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    y, x = y / (height - 1), x / (width - 1)
    red, green, blue = 0.2 + 0.6 * x, 0.3 + 0.5 * y, 0.8 - 0.5 * x * y
    disc = (x - 0.35) ** 2 + (y - 0.45) ** 2 < 0.2**2
    red, green, blue = np.where(disc, 0.95, red), np.where(disc, 0.75, green), np.where(disc, 0.1, blue)
    stripes = (y > 0.78) & (np.floor(x * 16) % 2 == 0)
    red, green, blue = (np.where(stripes, 0.1, c) for c in (red, green, blue))
    pixels = np.stack([red, green, blue], axis=-1)
    return PIL.Image.fromarray((pixels * 255).round().astype(np.uint8))


def generation_arguments(args, image: PIL.Image.Image | None) -> dict:
    """The call's prompt (and source image), size, schedule and seed: the same for every pipeline and run."""
    arguments = dict(
        prompt=EDIT_PROMPT if image is not None else PROMPT,
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        generator=torch.Generator().manual_seed(0),
    )
    return arguments if image is None else dict(arguments, image=image)


def run_pipeline(pipe, args, image, device: torch.device) -> tuple[dict, np.ndarray]:
    call = common.timed_call(pipe, generation_arguments(args, image), device)
    images, start, step_ends, end = call.output.image, call.start, call.step_ends, call.end
    row = {
        "end_to_end_seconds": end - start,
        "seconds_per_step": call.seconds_per_step,
        "decode_seconds": end - step_ends[-1],  # after the last step: VAE decode and post-processing
        "peak_memory_gib": common.peak_memory_gib(device),
    }
    if row["seconds_per_step"] is not None:
        # text encoding (and the source image's encodings), latent set-up, the first step's wait, decode
        row["fixed_seconds"] = row["end_to_end_seconds"] - args.steps * row["seconds_per_step"]
    return row, np.asarray(images)


def time_vae_decode(pipes: dict, args, device: torch.device, dtype: torch.dtype) -> dict:
    """VAE decode of the same random latents through each pipeline's VAE (1024x1024: ~0.1-0.3 s, so a warm-up and
    3 repeats on the GPU; in smoke runs one plain decode of small latents)."""
    if args.smoke:
        shape = (1, LATENT_CHANNELS, SMOKE_DECODE_LATENT, SMOKE_DECODE_LATENT)
    else:
        shape = (1, LATENT_CHANNELS, args.height // VAE_SPATIAL, args.width // VAE_SPATIAL)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    repeats, warmup = (1, 0) if args.smoke else (3, 1)
    results = {}
    for label, pipe in pipes.items():
        common.reset_peak_memory(device)
        with torch.no_grad():
            seconds, _ = common.timed(lambda p=pipe: p.vae.decode(latents).sample, device, repeats, warmup)
        results[label] = {"seconds": seconds, "peak_memory_gib": common.peak_memory_gib(device)}
    return results


def run(argv=None, progress: common.Progress | None = None, save: bool = True) -> dict:
    """Measure, print the table and (unless ``save`` is false or in smoke mode) write the JSON; return the result.
    ``progress`` receives the result so far after each pipeline."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edit", action="store_true", help="the image-editing pipeline (a synthetic source image)")
    parser.add_argument("--height", type=int, default=SIZE)
    parser.add_argument("--width", type=int, default=SIZE)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--guidance", type=float, default=GUIDANCE)
    parser.add_argument("--offload", action="store_true", help="enable_model_cpu_offload() on both pipelines")
    parser.add_argument("--only", choices=["both", "kandinsky5", "diffusers"], default="both")
    parser.add_argument(
        "--warmup-steps",
        type=int,
        default=WARMUP_STEPS,
        help="steps of the untimed first run of each pipeline (0: none; the default of smoke runs)",
    )
    parser.add_argument("--skip-vae-timing", action="store_true", help="no separate VAE decode timing")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU; saves nothing")
    parser.add_argument("--json", type=Path, help="also write the result to this file (smoke runs too)")
    parser.set_defaults(model="image")  # common.choose_run's config name outside smoke runs
    args = parser.parse_args(argv)
    name, device, dtype = common.choose_run(args, parser, steps=2, warmup_steps=0)
    task = "edit" if args.edit else "t2i"
    pipes = build_pipelines(build_shared_components(name, args.edit, device, dtype), args.edit)
    if args.only != "both":
        pipes = {args.only: pipes[args.only]}
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
        if args.offload:
            for module in (pipe.text_encoder, pipe.text_encoder_2, pipe.transformer, pipe.vae):
                module.to("cpu")
            pipe.enable_model_cpu_offload(device=device)
    image = source_image(args.height, args.width) if args.edit else None
    # roofline of one step: one DiT forward per guidance branch (text length: the forward benchmark's typical one)
    config = dit_config(name, args.edit)
    _, patch_h, patch_w = config["patch_size"]
    visual_tokens = (args.height // (VAE_SPATIAL * patch_h)) * (args.width // (VAE_SPATIAL * patch_w))
    forwards_per_step = 2 if args.guidance > 1 else 1
    step_roofline = forwards_per_step * common.roofline_seconds(
        config, common.transformer_flops(config, visual_tokens, TEXT_TOKENS)
    )
    rows, images, decode = {}, {}, {}
    result = {
        **common.environment(),
        "benchmark": "image-editing pipeline" if args.edit else "text-to-image pipeline",
        "task": task,
        "model": name,
        "size": {"height": args.height, "width": args.width, "visual_tokens": visual_tokens},
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "guidance_scale": args.guidance,
        "scheduler_shift": SHIFT,
        "offload": args.offload,
        "dtype": str(dtype),
        "results": rows,
        "vae_decode": decode,
    }
    with common.smoke_stance(args.smoke):
        for label, pipe in pipes.items():
            # one short run first: kernel selection, allocator growth and lazy initialisation stay out of the timed
            # run (reported as warm-up seconds)
            warmup_seconds = None
            if args.warmup_steps > 0:
                warmup_args = argparse.Namespace(**{**vars(args), "steps": args.warmup_steps})
                warmup_seconds = run_pipeline(pipe, warmup_args, image, device)[0]["end_to_end_seconds"]
            row, images[label] = run_pipeline(pipe, args, image, device)
            row["warmup_seconds"] = warmup_seconds
            if row["seconds_per_step"]:
                row["step_roofline_fraction"] = step_roofline / row["seconds_per_step"]
            rows[label] = row
            common.report(progress, result)
        if not (args.offload or args.skip_vae_timing):
            decode.update(time_vae_decode(pipes, args, device, dtype))
    if len(images) == 2:
        a, b = (torch.from_numpy(images[k]) for k in ("kandinsky5", "diffusers"))
        result["image_shape"] = list(a.shape)
        result["images_relative_l2_vs_diffusers"] = common.relative_l2(a, b)
        result["image_std"] = b.float().std().item()  # diffusers' image: a picture, not a constant
        result["end_to_end_speedup_vs_diffusers"] = (
            rows["diffusers"]["end_to_end_seconds"] / rows["kandinsky5"]["end_to_end_seconds"]
        )
        if rows["kandinsky5"]["seconds_per_step"]:
            result["step_speedup_vs_diffusers"] = (
                rows["diffusers"]["seconds_per_step"] / rows["kandinsky5"]["seconds_per_step"]
            )
    common.report(progress, result)
    print(
        f"{name} {task.upper()} {args.height}x{args.width}, {args.steps} steps, guidance {args.guidance}, {dtype}"
        + (", model offload" if args.offload else "")
    )
    print(f"{'':12} {'total s':>9} {'s/step':>8} {'fixed s':>8} {'decode s':>9} {'peak GiB':>9} {'roofline':>9}")
    for label, row in rows.items():
        per_step = common.cell(row, "seconds_per_step", ".3f")
        fixed = common.cell(row, "fixed_seconds", ".2f")
        peak = common.cell(row, "peak_memory_gib", ".1f")
        roofline = common.cell(row, "step_roofline_fraction", ".2f")
        print(
            f"{label:12} {row['end_to_end_seconds']:9.2f} {per_step:>8} {fixed:>8} {row['decode_seconds']:9.2f} "
            f"{peak:>9} {roofline:>9}"
        )
    for label, row in decode.items():
        print(f"VAE decode {label}: {row['seconds']:.3f} s")
    if "images_relative_l2_vs_diffusers" in result:
        print(f"images relative L2 vs diffusers: {result['images_relative_l2_vs_diffusers']:.2e}")
    if save:
        suffix = "-offload" if args.offload else ""
        tag = f"image-pipeline-{task}-{args.height}x{args.width}-{args.steps}steps{suffix}"
        common.save_results(tag, result, args.smoke)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv=None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
