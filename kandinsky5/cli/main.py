"""The ``kandinsky5`` command: ``generate`` a video, list the official ``models``, write a ``tiny-checkpoint`` for
offline demos and tests.

Everything a user can get wrong is checked before a model is loaded; a generation that finished is never lost.
Options left out take the model's recommended values (kandinsky5/variants.py), else the reference's.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from kandinsky5.variants import FPS as DEFAULT_FPS
from kandinsky5.variants import VARIANTS, Task, Variant

SUBCOMMANDS = ("generate", "models", "tiny-checkpoint")
DTYPES = ("auto", "float32", "bfloat16", "float16")
OFFLOAD_MODES = ("none", "model", "sequential")
VAE_TILING_MODES = ("auto", "on", "off")
# size-check parameters -> the options that set them
OPTION_OF_PARAMETER = {"height": "--height", "width": "--width", "num_frames": "--frames"}


class UsageError(Exception):
    """Bad command-line input: reported as one line, exit status 2."""


def frames_for_seconds(seconds: float, fps: int, temporal_compression: int = 4) -> int:
    """The 4k+1 frame count closest to ``seconds`` of video at ``fps`` (5 s at 24 fps -> 121)."""
    if seconds <= 0:
        raise UsageError(f"--seconds must be positive, got {seconds}")
    return temporal_compression * max(round(seconds * fps / temporal_compression), 0) + 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kandinsky5", description="Kandinsky 5.0 video generation")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser(
        "generate",
        help="generate a video from a text prompt (and an --image)",
        description="Options left out take the model's recommended values (see `kandinsky5 models`).",
    )
    gen.add_argument("prompt", help="what the video shows")
    gen.add_argument(
        "--model",
        required=True,
        help="short name (e.g. lite-sft-5s; see `kandinsky5 models`), hub id "
        "(e.g. kandinskylab/Kandinsky-5.0-T2V-Lite-sft-5s-Diffusers) or a local checkpoint directory",
    )
    gen.add_argument("--out", required=True, help="output .mp4 path")
    gen.add_argument(
        "--image", default=None, help="first frame: image-to-video (needs an I2V model); a path or http(s) URL"
    )
    gen.add_argument("--negative-prompt", default=None, help="what to avoid (default: the reference's)")
    gen.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's; 50, distilled 16)")
    gen.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="classifier-free guidance scale; 1 disables it (default: 5, nocfg and distilled models 1)",
    )
    gen.add_argument(
        "--height", type=int, default=None, help="pixels, multiple of 16 (default: the model's; Lite 512, Pro 768)"
    )
    gen.add_argument(
        "--width", type=int, default=None, help="pixels, multiple of 16 (default: the model's; Lite 768, Pro 1280)"
    )
    length = gen.add_mutually_exclusive_group()
    length.add_argument("--frames", type=int, default=None, help="number of frames, 4k+1 (default: 121, 10 s 241)")
    length.add_argument("--seconds", type=float, default=None, help="video length in seconds at --fps")
    gen.add_argument("--fps", type=int, default=None, help=f"frames per second of the file (default {DEFAULT_FPS})")
    gen.add_argument(
        "--seed",
        type=int,
        nargs="+",
        default=[0],
        help="random seed (default 0); several seeds make one video each (OUT-seedN.mp4), the prompt encoded once",
    )
    gen.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default auto)")
    gen.add_argument("--dtype", default="auto", choices=DTYPES, help="auto: bfloat16 on GPU, float32 on CPU")
    gen.add_argument("--quality", type=float, default=9.0, help="video quality 0..10 (default 9)")
    gen.add_argument("--max-sequence-length", type=int, default=512, help="prompt tokens kept (default 512)")
    gen.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    gen.add_argument(
        "--offload",
        choices=OFFLOAD_MODES,
        default="none",
        help="model: components visit the GPU one at a time; sequential: layer by layer (least memory, slowest)",
    )
    gen.add_argument("--attention-backend", default=None, help="auto, sdpa, cudnn, flash, efficient, math, flex")
    gen.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks (regional)")
    gen.add_argument(
        "--fuse-qkv", action="store_true", help="fuse the attention projections (pipe.fuse_qkv_projections())"
    )
    gen.add_argument(
        "--vae-tiling",
        choices=VAE_TILING_MODES,
        default="auto",
        help="spatial tiles in the VAE decode: auto (only when GPU memory is short; default), on, off",
    )
    gen.add_argument(
        "--vae-channels-last", action="store_true", help="run the VAE's convolutions on channels-last activations"
    )

    sub.add_parser("models", help="list the official checkpoints, their short names and defaults")

    tiny = sub.add_parser("tiny-checkpoint", help="write a tiny random-weight checkpoint (Diffusers layout)")
    tiny.add_argument("directory", help="where to write it")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--task", choices=["t2v", "i2v"], default="t2v", help="text- or image-to-video (default t2v)")
    return parser


def _validate_generate(args) -> None:
    """Every check that needs no model, so that mistakes cost nothing. Fills in the model's defaults for the
    options left out, and sets ``args.variant`` (or ``None``) and ``args.first_frame`` (the loaded ``--image``)."""
    from kandinsky5.io import check_output_path, load_image
    from kandinsky5.resolutions import SizeError, check_size, closest_trained_size, resolution_class_of
    from kandinsky5.variants import generation_defaults

    try:
        args.out = check_output_path(args.out)
        args.outputs = [check_output_path(path) for path in output_paths(args.out, args.seed)]
    except (ValueError, OSError) as err:
        raise UsageError(str(err)) from err
    args.variant, checkpoint = _resolve_model(args)
    task, nabla = _task_and_attention(args.variant, checkpoint)
    args.first_frame = None
    if args.image is not None:
        if task is Task.TEXT_TO_VIDEO:
            raise UsageError(f"--image needs an image-to-video model; {args.model} is text-to-video")
        try:
            args.first_frame = load_image(args.image)
        except (ValueError, OSError) as err:
            raise UsageError(f"--image: {err}") from err
    elif task is Task.IMAGE_TO_VIDEO:
        raise UsageError(f"{args.model} is an image-to-video model: give the first frame with --image PATH")

    defaults = generation_defaults(args.variant)
    if args.first_frame is not None and args.height is None and args.width is None:
        # the trained size closest to the image's shape, rather than stretching the image to the default size
        trained = (
            args.variant.resolution_class if args.variant else resolution_class_of(defaults.height, defaults.width)
        )
        args.height, args.width = closest_trained_size(args.first_frame.width / args.first_frame.height, trained)
    args.height = defaults.height if args.height is None else args.height
    args.width = defaults.width if args.width is None else args.width
    args.steps = defaults.num_inference_steps if args.steps is None else args.steps
    args.guidance = defaults.guidance_scale if args.guidance is None else args.guidance
    if args.fps is None:
        args.fps = args.variant.fps if args.variant else DEFAULT_FPS
    if args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if args.fps < 1:
        raise UsageError(f"--fps must be >= 1, got {args.fps}")
    if args.seconds is not None:
        args.frames = frames_for_seconds(args.seconds, args.fps)
    elif args.frames is None:
        args.frames = defaults.num_frames
    if args.frames < 1:
        raise UsageError(f"--frames must be >= 1, got {args.frames}")
    try:
        check_size(args.height, args.width, args.frames, nabla=nabla)
    except SizeError as err:
        option = "--seconds" if err.parameter == "num_frames" and args.seconds is not None else None
        raise UsageError(f"{option or OPTION_OF_PARAMETER[err.parameter]}: {err}") from err
    if args.variant is not None:
        args.variant.warn_if_untrained(args.height, args.width)
    if not 0 <= args.quality <= 10:
        raise UsageError(f"--quality must be within 0..10, got {args.quality}")
    if not 1 <= args.max_sequence_length <= 1024:
        raise UsageError(f"--max-sequence-length must be within 1..1024, got {args.max_sequence_length}")


def _resolve_model(args) -> tuple[Variant | None, Path | None]:
    """The variant ``--model`` names and the local checkpoint folder (``None`` for a hub id); a short name
    becomes its hub id."""
    from kandinsky5.loading.hub import is_hub_id
    from kandinsky5.variants import variant_by_name, variant_for_folder

    folder = Path(args.model).expanduser()
    if folder.is_dir():
        return variant_for_folder(folder), folder
    variant = variant_by_name(args.model)
    if variant is not None:
        args.model = variant.repo_id
    elif not is_hub_id(str(args.model)):
        raise UsageError(
            f"model not found: {args.model} is no local directory, hub id or short name (see `kandinsky5 models`)"
        )
    return variant, None


def _task_and_attention(variant: Variant | None, checkpoint: Path | None) -> tuple[Task | None, bool]:
    """Text- or image-to-video (``None``: not known before loading) and whether the transformer uses NABLA, from
    the variant or else the local checkpoint's configs."""
    from kandinsky5.variants import AttentionType, CheckpointFacts

    if variant is not None:
        return variant.task, variant.attention is AttentionType.NABLA
    if checkpoint is None:
        return None, False
    facts = CheckpointFacts.read(checkpoint)
    return facts.task, facts.attention is AttentionType.NABLA


def _check_runtime_options(args, device) -> None:
    """Options whose validity depends on the device, checked before loading."""
    if args.attention_backend is not None:
        from kandinsky5.attention.backends import validate_backend

        try:
            validate_backend(args.attention_backend, device)
        except ValueError as err:
            raise UsageError(f"--attention-backend: {err}") from err
    if args.offload != "none" and device.type == "cpu":
        raise UsageError("--offload moves components between the CPU and a GPU; it needs --device cuda")


def _device_and_dtype(args):
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except RuntimeError as err:
        raise UsageError(f"--device: {err}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but no CUDA GPU is available")
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    return device, dtype


def cmd_generate(args) -> int:
    _validate_generate(args)
    device, dtype = _device_and_dtype(args)
    _check_runtime_options(args, device)

    import torch
    from transformers.utils import logging as transformers_logging

    import kandinsky5
    from kandinsky5.io import export_to_video, save_frames_fallback
    from kandinsky5.pipelines.base import DEFAULT_NEGATIVE_PROMPT
    from kandinsky5.variants import generation_defaults

    transformers_logging.disable_progress_bar()  # one progress bar: ours, for sampling
    image_to_video = args.first_frame is not None
    pipeline_class = kandinsky5.Kandinsky5I2VPipeline if image_to_video else kandinsky5.Kandinsky5T2VPipeline
    start = time.perf_counter()
    pipe = pipeline_class.from_pretrained(args.model, torch_dtype=dtype)
    # layout transforms first: offloading then arms its hooks on the final layers
    if args.fuse_qkv:
        pipe.fuse_qkv_projections()
    if args.vae_channels_last:
        pipe.vae.to(memory_format=torch.channels_last_3d)
    if args.vae_tiling == "on":
        pipe.vae.enable_tiling()
    elif args.vae_tiling == "off":
        pipe.vae.disable_tiling()
    if args.offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif args.offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)
    if args.attention_backend is not None:
        pipe.transformer.set_attention_backend(args.attention_backend)
    if args.compile:
        pipe.transformer.compile()
    pipe.set_progress_bar_config(disable=args.no_progress)
    loaded = time.perf_counter()
    # The prompt (and the negative prompt, when guidance is on) is encoded once for every seed.
    guidance = generation_defaults(pipe.model_variant).guidance_scale if args.guidance is None else args.guidance
    text = embedding_kwargs("prompt", pipe.encode_prompt(args.prompt, max_sequence_length=args.max_sequence_length))
    if guidance > 1.0:
        negative = DEFAULT_NEGATIVE_PROMPT if args.negative_prompt is None else args.negative_prompt
        embeds = pipe.encode_prompt(negative, max_sequence_length=args.max_sequence_length)
        text.update(embedding_kwargs("negative_prompt", embeds))
    condition = (args.first_frame,) if image_to_video else ()
    for seed, out in zip(args.seed, args.outputs, strict=True):
        step_times: list[float] = []

        def on_step_end(_pipe, _step, _timestep, tensors, times=step_times):
            times.append(time.perf_counter())
            return tensors

        video_start = time.perf_counter()
        frames = pipe(
            *condition,
            **text,
            height=args.height,
            width=args.width,
            num_frames=args.frames,
            num_inference_steps=args.steps,
            guidance_scale=guidance,
            generator=torch.Generator("cpu").manual_seed(seed),
            callback_on_step_end=on_step_end,
            output_type="np",
        ).frames[0]
        done = time.perf_counter()
        try:
            export_to_video(frames, str(out), fps=args.fps, quality=args.quality)
        except Exception as err:
            kept = save_frames_fallback(frames, out)
            print(f"kandinsky5: error: writing {out} failed ({err}); the frames were kept in {kept}", file=sys.stderr)
            return 1
        per_step = (step_times[-1] - video_start) / len(step_times) if step_times else float("nan")
        print(
            f"{out}: {args.width}x{args.height}, {len(frames)} frames at {args.fps} fps, seed {seed}, "
            f"{args.steps} steps at {per_step:.2f} s/step, load {loaded - start:.1f} s, "
            f"generate {done - video_start:.1f} s, total {time.perf_counter() - start:.1f} s"
        )
    return 0


def embedding_kwargs(prefix: str, embeds) -> dict:
    """``encode_prompt``'s three tensors as the pipeline's precomputed-embedding arguments."""
    names = ("embeds_qwen", "embeds_clip", "cu_seqlens")
    return {f"{prefix}_{name}": tensor for name, tensor in zip(names, embeds, strict=True)}


def output_paths(out: Path, seeds: list[int]) -> list[Path]:
    """One path per seed: ``out`` itself for one seed, else ``<stem>-seed<N><suffix>`` beside it."""
    if len(seeds) == 1:
        return [out]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seed: repeated seeds {seeds}")
    return [out.with_name(f"{out.stem}-seed{seed}{out.suffix}") for seed in seeds]


def cmd_tiny_checkpoint(args) -> int:
    from kandinsky5.tiny import write_tiny_checkpoint

    folder = write_tiny_checkpoint(Path(args.directory), seed=args.seed, task=args.task)
    kind = args.task.upper()
    print(f"{folder}: tiny random-weight Kandinsky 5 {kind} checkpoint (Diffusers layout; it generates noise videos)")
    return 0


def format_models(variants: tuple[Variant, ...] = VARIANTS) -> list[str]:
    """One line per variant: short name, hub id, task and the defaults ``generate`` uses."""
    name_width = max(len(v.short_name) for v in variants)
    id_width = max(len(v.repo_id) for v in variants)
    lines = []
    for v in variants:
        d = v.defaults
        lines.append(
            f"{v.short_name:<{name_width}}  {v.repo_id:<{id_width}}  {v.task}  steps={d.num_inference_steps} "
            f"guidance={d.guidance_scale:.1f} height={d.height} width={d.width} frames={d.num_frames} fps={v.fps} "
            f"attention={v.attention}"
        )
    return lines


def cmd_models(args) -> int:
    print("\n".join(format_models()))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"generate": cmd_generate, "models": cmd_models, "tiny-checkpoint": cmd_tiny_checkpoint}
    try:
        return handlers[args.command](args)
    except UsageError as err:
        print(f"kandinsky5: error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as err:
        print(f"kandinsky5: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
