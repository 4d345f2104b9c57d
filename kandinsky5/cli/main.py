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
# request parameters -> the options that set them
OPTION_OF_PARAMETER = {
    "prompt": "PROMPT",
    "negative_prompt": "--negative-prompt",
    "height": "--height",
    "width": "--width",
    "num_frames": "--frames",
    "num_inference_steps": "--steps",
    "guidance_scale": "--guidance",
    "max_sequence_length": "--max-sequence-length",
    "image": "--image",
}


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


def _validate_generate(args):
    """Every check that needs no model, so that mistakes cost nothing: the output paths, the model, the image, the
    export options, and the :class:`GenerationRequest` the flags describe, built and validated by the same code as
    a pipeline call. Sets ``args.variant`` (or ``None``) and returns the request."""
    from kandinsky5.io import check_output_path

    try:
        args.out = check_output_path(args.out)
        args.outputs = [check_output_path(path) for path in output_paths(args.out, args.seed)]
    except (ValueError, OSError) as err:
        raise UsageError(str(err)) from err
    args.variant, checkpoint = _resolve_model(args)
    facts = _model_facts(args, checkpoint)
    first_frame = _first_frame(args, facts)
    if args.fps is None:
        args.fps = args.variant.fps if args.variant else DEFAULT_FPS
    if args.fps < 1:
        raise UsageError(f"--fps must be >= 1, got {args.fps}")
    if not 0 <= args.quality <= 10:
        raise UsageError(f"--quality must be within 0..10, got {args.quality}")
    if args.seconds is not None:
        args.frames = frames_for_seconds(args.seconds, args.fps)
    if first_frame is not None and args.height is None and args.width is None:
        args.height, args.width = size_for_image(first_frame, args.variant)
    return build_request(args, facts, first_frame)


def build_request(args, facts, first_frame):
    """The request of ``generate``'s flags; a bad value is a :class:`UsageError` naming its option."""
    from kandinsky5.pipelines.request import GenerationRequest, RequestError

    try:
        return GenerationRequest.build(
            facts,
            prompt=args.prompt,
            negative_prompt=args.negative_prompt,
            height=args.height,
            width=args.width,
            num_frames=args.frames,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            max_sequence_length=args.max_sequence_length,
            image=first_frame,
            output_type="np",
        )
    except RequestError as err:
        option = OPTION_OF_PARAMETER.get(err.parameter, err.parameter)
        if err.parameter == "num_frames" and args.seconds is not None:
            option = "--seconds"
        raise UsageError(f"{option}: {err}") from err


def _model_facts(args, checkpoint: Path | None):
    """What validation needs to know of the model, from the variant registry or the checkpoint's configs."""
    from kandinsky5.pipelines.request import ModelFacts

    task, nabla = _task_and_attention(args.variant, checkpoint)
    image_to_video = args.image is not None if task is None else task is Task.IMAGE_TO_VIDEO
    if args.image is not None and not image_to_video:
        raise UsageError(f"--image needs an image-to-video model; {args.model} is text-to-video")
    if args.image is None and image_to_video:
        raise UsageError(f"{args.model} is an image-to-video model: give the first frame with --image PATH")
    return ModelFacts(variant=args.variant, nabla=nabla, image_to_video=image_to_video)


def _first_frame(args, facts):
    """The ``--image``, opened (``None`` for text-to-video)."""
    from kandinsky5.io import load_image

    if not facts.image_to_video:
        return None
    try:
        return load_image(args.image)
    except (ValueError, OSError) as err:
        raise UsageError(f"--image: {err}") from err


def size_for_image(image, variant: Variant | None):
    """The trained size closest to the image's shape, rather than stretching it to the default size."""
    from kandinsky5.resolutions import closest_trained_size, resolution_class_of
    from kandinsky5.variants import generation_defaults

    defaults = generation_defaults(variant)
    trained = variant.resolution_class if variant else resolution_class_of(defaults.height, defaults.width)
    return closest_trained_size(image.width / image.height, trained)


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
    request = _validate_generate(args)
    device, dtype = _device_and_dtype(args)
    _check_runtime_options(args, device)

    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # one progress bar: ours, for sampling
    start = time.perf_counter()
    pipe = load_pipeline(args, request, device, dtype)
    loaded = time.perf_counter()
    # The prompt (and the negative prompt, when guidance is on) is encoded once for every seed.
    request = encoded_once(pipe, request)
    for seed, out in zip(args.seed, args.outputs, strict=True):
        code = generate_one(args, pipe, request, seed, out, start, loaded)
        if code:
            return code
    return 0


def load_pipeline(args, request, device, dtype):
    """The pipeline of ``--model``, with the options that change its layers, placement and kernels."""
    import torch

    import kandinsky5

    image_to_video = request.image is not None
    pipeline_class = kandinsky5.Kandinsky5I2VPipeline if image_to_video else kandinsky5.Kandinsky5T2VPipeline
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
    return pipe


def encoded_once(pipe, request):
    """``request`` with its prompts replaced by their embeddings, so that every seed reuses them."""
    import dataclasses

    embeds = embedding_kwargs(
        "prompt", pipe.encode_prompt(request.prompt, max_sequence_length=request.max_sequence_length)
    )
    if request.uses_guidance:
        negative = pipe.encode_prompt(request.negative_prompts(), max_sequence_length=request.max_sequence_length)
        embeds.update(embedding_kwargs("negative_prompt", negative))
    return dataclasses.replace(request, prompt=None, negative_prompt=None, **embeds)


def generate_one(args, pipe, request, seed: int, out: Path, start: float, loaded: float) -> int:
    """One video of ``request`` from ``seed``, written to ``out``; a summary line. A video that cannot be written
    is kept as a ``.npy`` file beside it."""
    import dataclasses

    import torch

    from kandinsky5.io import export_to_video, save_frames_fallback
    from kandinsky5.sampling.control import Phase, RunControl

    step_ends: list[float] = []
    control = RunControl(on_progress=lambda e: step_ends.append(e.elapsed_s) if e.phase is Phase.DENOISE else None)
    seeded = dataclasses.replace(request, generator=torch.Generator("cpu").manual_seed(seed))
    frames = pipe.generate(seeded, control).frames[0]
    generated = control.elapsed_s
    try:
        with control.phase(Phase.WRITE):
            export_to_video(frames, str(out), fps=args.fps, quality=args.quality)
    except Exception as err:
        kept = save_frames_fallback(frames, out)
        print(f"kandinsky5: error: writing {out} failed ({err}); the frames were kept in {kept}", file=sys.stderr)
        return 1
    steps = len(step_ends) - 1  # the first event is the phase's start
    per_step = (step_ends[-1] - step_ends[0]) / steps if steps > 0 else float("nan")
    print(
        f"{out}: {request.width}x{request.height}, {len(frames)} frames at {args.fps} fps, seed {seed}, "
        f"{request.num_inference_steps} steps at {per_step:.2f} s/step, load {loaded - start:.1f} s, "
        f"generate {generated:.1f} s, total {time.perf_counter() - start:.1f} s"
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
