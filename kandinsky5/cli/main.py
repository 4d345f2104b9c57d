"""The ``kandinsky5`` command: ``generate`` a video, write a ``tiny-checkpoint`` for offline demos and tests.

Everything a user can get wrong is checked before a model is loaded; a generation that finished is never lost.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

SUBCOMMANDS = ("generate", "tiny-checkpoint")
DEFAULT_FPS = 24
DTYPES = ("auto", "float32", "bfloat16", "float16")


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

    gen = sub.add_parser("generate", help="generate a video from a text prompt")
    gen.add_argument("prompt", help="what the video shows")
    gen.add_argument(
        "--model",
        required=True,
        help="hub id (e.g. kandinskylab/Kandinsky-5.0-T2V-Lite-sft-5s-Diffusers) or a local checkpoint directory",
    )
    gen.add_argument("--out", required=True, help="output .mp4 path")
    gen.add_argument("--negative-prompt", default=None, help="what to avoid (default: the reference's)")
    gen.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    gen.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale; 1 disables it")
    gen.add_argument("--height", type=int, default=512, help="pixels, multiple of 16 (default 512)")
    gen.add_argument("--width", type=int, default=768, help="pixels, multiple of 16 (default 768)")
    length = gen.add_mutually_exclusive_group()
    length.add_argument("--frames", type=int, default=None, help="number of frames, 4k+1 (default 121)")
    length.add_argument("--seconds", type=float, default=None, help="video length in seconds at --fps")
    gen.add_argument(
        "--fps", type=int, default=DEFAULT_FPS, help=f"frames per second of the file (default {DEFAULT_FPS})"
    )
    gen.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    gen.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default auto)")
    gen.add_argument("--dtype", default="auto", choices=DTYPES, help="auto: bfloat16 on GPU, float32 on CPU")
    gen.add_argument("--quality", type=float, default=9.0, help="video quality 0..10 (default 9)")
    gen.add_argument("--max-sequence-length", type=int, default=512, help="prompt tokens kept (default 512)")
    gen.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    tiny = sub.add_parser("tiny-checkpoint", help="write a tiny random-weight checkpoint (Diffusers layout)")
    tiny.add_argument("directory", help="where to write it")
    tiny.add_argument("--seed", type=int, default=0)
    return parser


def _validate_generate(args) -> None:
    """Every check that needs no model, so that mistakes cost nothing."""
    from kandinsky5.io import check_output_path
    from kandinsky5.pipelines.base import SIZE_MULTIPLE

    try:
        args.out = check_output_path(args.out)
    except (ValueError, OSError) as err:
        raise UsageError(str(err)) from err
    for name in ("height", "width"):
        value = getattr(args, name)
        if value <= 0 or value % SIZE_MULTIPLE:
            raise UsageError(f"--{name} must be a positive multiple of {SIZE_MULTIPLE}, got {value}")
    if args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if args.fps < 1:
        raise UsageError(f"--fps must be >= 1, got {args.fps}")
    if args.seconds is not None:
        args.frames = frames_for_seconds(args.seconds, args.fps)
    elif args.frames is None:
        args.frames = 121
    if args.frames < 1:
        raise UsageError(f"--frames must be >= 1, got {args.frames}")
    if not 0 <= args.quality <= 10:
        raise UsageError(f"--quality must be within 0..10, got {args.quality}")
    if not 1 <= args.max_sequence_length <= 1024:
        raise UsageError(f"--max-sequence-length must be within 1..1024, got {args.max_sequence_length}")
    from kandinsky5.loading.hub import is_hub_id

    if not Path(args.model).expanduser().is_dir() and not is_hub_id(str(args.model)):
        raise UsageError(f"model directory not found: {args.model}")


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

    import torch
    from transformers.utils import logging as transformers_logging

    from kandinsky5 import Kandinsky5T2VPipeline
    from kandinsky5.io import export_to_video, save_frames_fallback

    transformers_logging.disable_progress_bar()  # one progress bar: ours, for sampling
    start = time.perf_counter()
    pipe = Kandinsky5T2VPipeline.from_pretrained(args.model, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=args.no_progress)
    loaded = time.perf_counter()
    step_times: list[float] = []

    def on_step_end(_pipe, _step, _timestep, tensors):
        step_times.append(time.perf_counter())
        return tensors

    sampling_start = time.perf_counter()
    frames = pipe(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        height=args.height,
        width=args.width,
        num_frames=args.frames,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        generator=torch.Generator("cpu").manual_seed(args.seed),
        max_sequence_length=args.max_sequence_length,
        callback_on_step_end=on_step_end,
        output_type="np",
    ).frames[0]
    done = time.perf_counter()
    try:
        export_to_video(frames, str(args.out), fps=args.fps, quality=args.quality)
    except Exception as err:
        kept = save_frames_fallback(frames, args.out)
        print(f"kandinsky5: error: writing {args.out} failed ({err}); the frames were kept in {kept}", file=sys.stderr)
        return 1
    per_step = (step_times[-1] - sampling_start) / len(step_times) if step_times else float("nan")
    total = time.perf_counter() - start
    print(
        f"{args.out}: {args.width}x{args.height}, {len(frames)} frames at {args.fps} fps, "
        f"{args.steps} steps at {per_step:.2f} s/step, load {loaded - start:.1f} s, "
        f"generate {done - sampling_start:.1f} s, total {total:.1f} s"
    )
    return 0


def cmd_tiny_checkpoint(args) -> int:
    from kandinsky5.tiny import write_tiny_checkpoint

    folder = write_tiny_checkpoint(Path(args.directory), seed=args.seed)
    print(f"{folder}: tiny random-weight Kandinsky 5 T2V checkpoint (Diffusers layout; it generates noise videos)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"generate": cmd_generate, "tiny-checkpoint": cmd_tiny_checkpoint}
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
