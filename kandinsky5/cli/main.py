"""The ``kandinsky5`` command: ``generate`` a video or an image, ``decode`` the latents a failed generate kept, list the
official ``models``, ``plan`` the memory of a generation per offload mode, ``calibrate-cache`` (MagCache ratios for a
checkpoint), write a ``tiny-checkpoint`` for offline demos and tests.

Everything a user can get wrong is checked before a model is loaded; a generation that finished is never lost: when
decoding or writing fails, the sampled latents are kept for ``decode``.
Options left out take the model's recommended values (kandinsky5/variants.py), else the reference's.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from kandinsky5.cli.calibrate import add_calibrate_parser, cmd_calibrate_cache
from kandinsky5.cli.lora_options import add_lora_options, apply_lora_options, check_lora_options
from kandinsky5.cli.plan import add_plan_parser, add_quantize_options, cmd_plan
from kandinsky5.cli.serve import add_serve_parser, cmd_serve
from kandinsky5.variants import FPS as DEFAULT_FPS
from kandinsky5.variants import VARIANTS, Task, Variant

SUBCOMMANDS = ("generate", "decode", "models", "plan", "calibrate-cache", "serve", "tiny-checkpoint")
DTYPES = ("auto", "float32", "bfloat16", "float16")
# auto: the fastest mode whose memory plan fits the GPU's free memory (kandinsky5/runtime/memory_plan.py)
OFFLOAD_MODES = ("auto", "none", "model", "blocks", "sequential")
VAE_TILING_MODES = ("auto", "on", "off")
CACHE_MODES = ("none", "magcache")
DEVICE_TYPES = ("cpu", "cuda")
# Loggers that print while libraries import, about those libraries, not the user's run: torchao (which transformers
# imports when it is installed) on optional kernels this build lacks, and torch's pytree on what torchao registers.
IMPORT_NOISE_LOGGERS = ("torchao", "torch.utils._pytree")
# torch.Generator.manual_seed takes 64-bit seeds
MAX_SEED = 2**64 - 1
DEFAULT_QUALITY = 9.0
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
    "expand_prompt": "--expand-prompt",
    "image": "--image",
    "num_images_per_prompt": "--num-images",
}
# what each task makes of its inputs, as errors name the model's kind
TASK_NOUNS = {
    Task.TEXT_TO_VIDEO: "text-to-video",
    Task.IMAGE_TO_VIDEO: "image-to-video",
    Task.TEXT_TO_IMAGE: "text-to-image",
    Task.IMAGE_TO_IMAGE: "image-editing",
}
VIDEO_SUFFIX = ".mp4"
# generate's options that only a video model takes (args attribute -> option), and those only an image model takes
VIDEO_ONLY_OPTIONS = {"frames": "--frames", "seconds": "--seconds", "fps": "--fps", "expand_prompt": "--expand-prompt"}
IMAGE_ONLY_OPTIONS = {"num_images": "--num-images"}


class UsageError(Exception):
    """Bad command-line input: reported as one line, exit status 2."""


class RankUsageError(UsageError):
    """A usage error that, under torchrun, one process may find and another not (the output file, which rank 0
    alone checks and writes; a process's GPU): the processes meet to stop together."""


def frames_for_seconds(seconds: float, fps: int, temporal_compression: int = 4) -> int:
    """The 4k+1 frame count closest to ``seconds`` of video at ``fps`` (5 s at 24 fps -> 121)."""
    if not (math.isfinite(seconds) and seconds > 0):
        raise UsageError(f"--seconds must be a positive number, got {seconds}")
    return temporal_compression * max(round(seconds * fps / temporal_compression), 0) + 1


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse with its errors on one line (no usage block), exit status 2, as every other usage error; subcommand
    parsers are of the same class."""

    def error(self, message: str):
        self.exit(
            2,
            f"kandinsky5: error: {self.prog.removeprefix('kandinsky5').strip() or 'usage'}: {message} "
            f"(see `{self.prog} --help`)\n",
        )


def add_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", required=True, help="output path: .mp4 for a video model; .png, .jpg/.jpeg or .webp for an image model"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def add_device_options(parser: argparse.ArgumentParser, offload_help: str) -> None:
    """Where and in what dtype the networks run, and the VAE's memory options (``generate`` and ``decode``)."""
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default auto)")
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help="auto: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--offload", choices=OFFLOAD_MODES, default="auto", help=offload_help)
    parser.add_argument(
        "--vae-tiling",
        choices=VAE_TILING_MODES,
        default="auto",
        help="spatial tiles in the VAE decode: auto (only when GPU memory is short; default), on, off",
    )
    parser.add_argument(
        "--vae-channels-last", action="store_true", help="run the VAE's convolutions on channels-last activations"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="kandinsky5", description="Kandinsky 5.0 video and image generation")
    sub = parser.add_subparsers(dest="command", required=True)
    add_generate_parser(sub)
    add_decode_parser(sub)
    add_plan_parser(sub)
    add_calibrate_parser(sub)
    add_serve_parser(sub)
    sub.add_parser("models", help="list the official checkpoints, their short names and defaults")

    tiny = sub.add_parser("tiny-checkpoint", help="write a tiny random-weight checkpoint (Diffusers layout)")
    tiny.add_argument("directory", help="where to write it")
    tiny.add_argument("--seed", type=int, default=0)
    # sorted(kandinsky5.tiny.PIPELINE_CLASSES), spelt out: importing kandinsky5.tiny imports torch (tested equal)
    tiny.add_argument(
        "--task",
        choices=["i2i", "i2v", "t2i", "t2v"],
        default="t2v",
        help="text-to-video, image-to-video, text-to-image or image editing (default t2v)",
    )
    tiny.add_argument("--force", action="store_true", help="write into a folder that is not empty")
    return parser


def add_generate_parser(sub) -> None:
    gen = sub.add_parser(
        "generate",
        help="generate a video or an image from a text prompt (and an --image)",
        description="Options left out take the model's recommended values (see `kandinsky5 models`). Video models "
        "write an .mp4; image models (text-to-image, editing) a .png, .jpg/.jpeg or .webp.",
    )
    gen.add_argument("prompt", help="what the video or image shows (for editing: the change to make)")
    add_output_options(gen)
    gen.add_argument(
        "--model",
        required=True,
        help="short name (e.g. lite-sft-5s; see `kandinsky5 models`), hub id "
        "(e.g. kandinskylab/Kandinsky-5.0-T2V-Lite-sft-5s-Diffusers) or a local checkpoint directory",
    )
    gen.add_argument(
        "--image",
        default=None,
        help="a path or http(s) URL: the first frame (image-to-video models) or the image to edit (editing models)",
    )
    gen.add_argument("--negative-prompt", default=None, help="what to avoid (default: the reference's)")
    gen.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's; 50, distilled 16)")
    gen.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="classifier-free guidance scale; 1 disables it (default: 5, nocfg and distilled models 1)",
    )
    add_size_options(gen)
    gen.add_argument(
        "--seed",
        type=int,
        nargs="+",
        default=[0],
        help="random seed (default 0); several seeds make one video (image) each (OUT-seedN.mp4), the prompt "
        "encoded once",
    )
    gen.add_argument(
        "--num-images",
        type=int,
        default=None,
        help="image models: images per seed, sampled together (default 1; several: OUT-0.png, OUT-1.png, ...)",
    )
    gen.add_argument(
        "--quality",
        type=float,
        default=DEFAULT_QUALITY,
        help="quality 0..10 (default 9): the video's (x264 CRF), or a JPEG/WebP's (10 x quality; 10: lossless WebP); "
        "PNG is lossless",
    )
    gen.add_argument(
        "--max-sequence-length",
        type=int,
        default=None,
        help="prompt tokens kept (default: the model's; 512, image editing 1024)",
    )
    gen.add_argument(
        "--expand-prompt",
        action="store_true",
        help="video models: rewrite the prompt into a detailed caption with the model's own Qwen2.5-VL first (as the "
        "original repository does by default); the expanded prompt is printed before generating",
    )
    gen.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    gen.add_argument("--attention-backend", default=None, help="auto, sdpa, cudnn, flash, efficient, math, flex")
    gen.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks (regional)")
    gen.add_argument(
        "--fuse-qkv", action="store_true", help="fuse the attention projections (pipe.fuse_qkv_projections())"
    )
    gen.add_argument(
        "--cache",
        choices=CACHE_MODES,
        default="none",
        help="step caching: magcache reuses the visual blocks' work of steps whose output barely changes "
        "(approximate: the video differs from the exact one; the model's official ratios)",
    )
    gen.add_argument(
        "--cache-threshold", type=float, default=None, help="MagCache's error threshold (default 0.12; more skips more)"
    )
    gen.add_argument(
        "--cache-ratios",
        default=None,
        help="MagCache ratios from `kandinsky5 calibrate-cache` (default: the model's official ones)",
    )
    add_quantize_options(gen)
    add_lora_options(gen)
    add_device_options(
        gen,
        "auto (default): the fastest mode that fits the GPU's free memory (see `kandinsky5 plan`; none on a CPU); "
        "model: components visit the GPU one at a time; blocks: the transformer's blocks and the text encoder's "
        "layers stream to the GPU; sequential: layer by layer (least memory, slowest)",
    )
    add_parallel_options(gen)


def add_parallel_options(parser: argparse.ArgumentParser) -> None:
    """Several processes (GPUs) per video, under ``torchrun --nproc-per-node N -m kandinsky5 generate ...``."""
    group = parser.add_argument_group(
        "several GPUs", "launch with `torchrun --nproc-per-node N -m kandinsky5 generate ...`; N = ulysses x cfg"
    )
    group.add_argument(
        "--ulysses-degree",
        type=int,
        default=None,
        help="processes that share each guidance branch's token sequence (Ulysses; default: N / cfg degree)",
    )
    group.add_argument(
        "--cfg-degree",
        type=int,
        default=None,
        help="1 or 2: processes that split the two guidance branches (default 2 when guidance is on and N is even)",
    )
    group.add_argument(
        "--shard-weights",
        action="store_true",
        help="shard the transformer blocks' weights over the processes (FSDP): less memory per GPU, a weight "
        "all-gather per block call",
    )
    group.add_argument(
        "--dist-timeout",
        type=float,
        default=None,
        help="seconds a process waits for the others in a collective (default: $KANDINSKY5_DIST_TIMEOUT, else 1800)",
    )


def add_size_options(parser: argparse.ArgumentParser) -> None:
    """The video's (image's) size and the video's length (``generate`` and ``plan``)."""
    parser.add_argument(
        "--height",
        type=int,
        default=None,
        help="pixels, multiple of 16 (default: the model's; Lite 512, Pro 768, images 1024; an image model snaps "
        "other sizes to its nearest trained one)",
    )
    parser.add_argument(
        "--width", type=int, default=None, help="pixels, multiple of 16 (default: the model's; Lite 768, Pro 1280)"
    )
    length = parser.add_mutually_exclusive_group()
    length.add_argument(
        "--frames", type=int, default=None, help="video models: number of frames, 4k+1 (default: 121, 10 s 241)"
    )
    length.add_argument("--seconds", type=float, default=None, help="video models: length in seconds at --fps")
    parser.add_argument(
        "--fps", type=int, default=None, help=f"video models: frames per second of the file (default {DEFAULT_FPS})"
    )


def add_decode_parser(sub) -> None:
    dec = sub.add_parser(
        "decode",
        help="decode latents kept by a failed `generate` into the video",
        description="When decoding or writing a video fails, `generate` keeps the sampled latents beside the video "
        "(VIDEO.latents.safetensors) and prints this command. Only the model's VAE is loaded; the video is the one "
        "`generate` would have written.",
    )
    dec.add_argument("latents", help="a .latents.safetensors file written by `kandinsky5 generate`")
    add_output_options(dec)
    dec.add_argument(
        "--model",
        required=True,
        help="the model the latents were sampled with: short name, hub id or local checkpoint directory",
    )
    dec.add_argument("--fps", type=int, default=None, help="frames per second (default: the generate run's)")
    dec.add_argument("--quality", type=float, default=None, help="video quality 0..10 (default: the generate run's)")
    add_device_options(
        dec,
        "auto (default): none, unless the VAE and its decode do not fit the GPU's free memory (then sequential); "
        "model (or blocks): the VAE rests on the CPU and visits the GPU to decode; sequential: layer by layer",
    )


def _validate_generate(args, writes: bool = True):
    """Every check that needs no model, so that mistakes cost nothing: the model and its task, the output's kind
    (an image model writes .png/.jpg/.webp, a video model .mp4) and the options only one kind takes, the output
    paths (unless ``writes`` is False: under torchrun rank 0 checks them last, see :func:`check_outputs`), the
    image, the export options, and the :class:`GenerationRequest` the flags describe, built and validated by the
    same code as a pipeline call. Sets ``args.variant`` (or ``None``) and ``args.task``; returns the request."""
    for seed in args.seed:
        if not 0 <= seed <= MAX_SEED:
            raise UsageError(f"--seed must be within 0..{MAX_SEED} (what a torch.Generator takes), got {seed}")
    args.variant, checkpoint = _resolve_model(args)
    facts = _model_facts(args, checkpoint, images=_is_image_path(args.out))
    args.task = facts.task
    check_output_kind(args, facts.task)
    check_task_options(args, facts.task)
    if writes:
        check_outputs(args)
    else:
        try:
            args.out = Path(args.out).expanduser().absolute()
            args.outputs = output_paths(args.out, args.seed)
        except ValueError as err:
            raise UsageError(str(err)) from err
    first_frame = _first_frame(args, facts)
    if not facts.makes_images:
        if args.fps is None:
            args.fps = args.variant.fps if args.variant else DEFAULT_FPS
        if args.fps < 1:
            raise UsageError(f"--fps must be >= 1, got {args.fps}")
    if not 0 <= args.quality <= 10:
        raise UsageError(f"--quality must be within 0..10, got {args.quality}")
    if args.seconds is not None:
        args.frames = frames_for_seconds(args.seconds, args.fps)
    # image-to-video: the trained size closest to the image's shape; editing: the image's size, snapped by the request
    if facts.image_to_video and args.height is None and args.width is None:
        args.height, args.width = size_for_image(first_frame, args.variant)
    request = build_request(args, facts, first_frame)
    args.cache_config = cache_config(args, request)
    return request


def _is_image_path(path) -> bool:
    from kandinsky5.io.image_output import is_image_path

    return is_image_path(path)


def check_output_kind(args, task: Task) -> None:
    """``--out``'s suffix fits what the model makes: .mp4 for a video model, .png/.jpg/.jpeg/.webp for an image
    model (one line naming ``--out`` otherwise)."""
    from kandinsky5.io.image_output import suffixes_text

    suffix = Path(args.out).suffix.lower()
    kind = model_kind(args.model, task)
    if task.makes_images and not _is_image_path(args.out):
        what = "it makes images, not videos" if suffix == VIDEO_SUFFIX else "an image is written as PNG, JPEG or WebP"
        raise UsageError(f"--out {args.out}: {kind}; {what}: give a path ending in {suffixes_text()}")
    if not task.makes_images and suffix != VIDEO_SUFFIX:
        what = "it makes videos, not images" if _is_image_path(args.out) else "a video is written as MP4"
        raise UsageError(f"--out {args.out}: {kind}; {what}: give a path ending in {VIDEO_SUFFIX}")


def model_kind(model: str, task: Task) -> str:
    """``<model> is a text-to-video model``, ``<model> is an image-editing model``, ..."""
    noun = TASK_NOUNS[task]
    return f"{model} is {'an' if noun[0] in 'aeiou' else 'a'} {noun} model"


def check_task_options(args, task: Task) -> None:
    """Options that only a video model (``--frames``, ``--seconds``, ``--fps``, ``--expand-prompt``) or only an
    image model (``--num-images``) takes, refused for the other kind in one line naming them."""
    images = task.makes_images
    options = VIDEO_ONLY_OPTIONS if images else IMAGE_ONLY_OPTIONS
    given = [flag for name, flag in options.items() if _given(getattr(args, name, None))]
    if not given:
        return
    kind = model_kind(args.model, task)
    if images:
        verb = "is a video option" if len(given) == 1 else "are video options"
        raise UsageError(
            f"{' and '.join(given)} {verb}; {kind}: it makes still images (several: --num-images N or --seed A B)"
        )
    raise UsageError(f"{' and '.join(given)} is for image models; {kind} (several videos: --seed A B ...)")


def _given(value) -> bool:
    """An option set to anything but its default ``None`` or ``False`` (a 0 counts)."""
    return value is not None and value is not False


def num_images(args) -> int:
    """Images per seed (``--num-images``; 1 when not given or for a video)."""
    count = getattr(args, "num_images", None)
    return 1 if count is None else count


def output_files(args, base: Path) -> list[Path]:
    """The files of one seed's output ``base``: ``base`` itself, or with ``--num-images N`` (N > 1)
    ``<stem>-0<suffix>`` ... ``<stem>-<N-1><suffix>`` beside it."""
    count = num_images(args)
    if count == 1:
        return [base]
    return [base.with_name(f"{base.stem}-{index}{base.suffix}") for index in range(count)]


def check_outputs(args) -> None:
    """``--out`` (one path per seed, and per image with ``--num-images``) writable, and no existing file unless
    ``--overwrite``; sets ``args.out`` and ``args.outputs`` (one base path per seed, see :func:`output_files`)."""
    try:
        args.out = checked_output_path(args.out)
        args.outputs = output_paths(args.out, args.seed)
        for base in args.outputs:
            for path in output_files(args, base):
                new_output(path, args.overwrite)
    except (ValueError, OSError) as err:
        raise RankUsageError(str(err)) from err


def checked_output_path(path) -> Path:
    """``check_image_output_path`` for an image suffix, ``check_output_path`` for a video's; a ``ValueError``
    naming both kinds' suffixes for any other."""
    from kandinsky5.io import check_image_output_path, check_output_path
    from kandinsky5.io.image_output import suffixes_text

    if _is_image_path(path):
        return check_image_output_path(path)
    if Path(path).suffix.lower() != VIDEO_SUFFIX:
        raise ValueError(
            f"Output path {str(path)!r} must end in {VIDEO_SUFFIX} (a video) or {suffixes_text()} (an image)"
        )
    return check_output_path(path)


def cache_config(args, request):
    """The step cache ``--cache`` asks for (``None``: none), checked before loading: the model must have official
    ratios (those of the request's resolution class, or of the model's own class at a size it was not trained at),
    the threshold must be a finite number >= 0."""
    if args.cache == "none":
        if args.cache_threshold is not None or args.cache_ratios is not None:
            raise UsageError("--cache-threshold and --cache-ratios need --cache magcache")
        return None
    from kandinsky5.resolutions import resolution_class_of
    from kandinsky5.sampling.caches import magcache_config_for

    settings = {}
    if args.cache_threshold is not None:
        if not (math.isfinite(args.cache_threshold) and args.cache_threshold >= 0):
            raise UsageError(f"--cache-threshold must be a finite number >= 0, got {args.cache_threshold}")
        settings["threshold"] = args.cache_threshold
    # the ratios of the size's resolution class where the model was trained at it, else of its own default class
    size_class = resolution_class_of(request.height, request.width)
    trained = args.variant is not None and size_class in args.variant.trained_classes
    if args.cache_ratios is not None:
        from kandinsky5.sampling.caches import MagCacheConfig

        try:
            return MagCacheConfig.from_ratios_file(args.cache_ratios, **settings)
        except (ValueError, OSError) as err:
            raise UsageError(f"--cache-ratios: {one_line(err)}") from err
    try:
        return magcache_config_for(args.variant, size_class.name if trained else None, **settings)
    except ValueError as err:
        raise UsageError(f"--cache magcache: {one_line(err)}") from err


def build_request(args, facts, first_frame):
    """The request of ``generate``'s flags; a bad value is a :class:`UsageError` naming its option."""
    from kandinsky5.pipelines.request import GenerationRequest, RequestError

    images = facts.makes_images
    try:
        return GenerationRequest.build(
            facts,
            prompt=args.prompt,
            negative_prompt=args.negative_prompt,
            height=args.height,
            width=args.width,
            num_frames=1 if images else args.frames,
            num_videos_per_prompt=num_images(args) if images else 1,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            max_sequence_length=args.max_sequence_length,
            expand_prompt=getattr(args, "expand_prompt", False),  # generate only (plan shares this)
            image=first_frame,
            output_type="np",
        )
    except RequestError as err:
        option = OPTION_OF_PARAMETER.get(err.parameter, err.parameter)
        if err.parameter == "num_frames" and args.seconds is not None:
            option = "--seconds"
        raise UsageError(f"{option}: {err}") from err


def _model_facts(args, checkpoint: Path | None, images: bool = False):
    """What validation needs to know of the model, from the variant registry or the checkpoint's configs; and
    ``--image`` given exactly when the model takes one. A model whose task is not known before loading (a hub id
    of no known variant) is taken to make images when ``images`` (the output path says so) and to take an image
    when ``--image`` is given; loading then refuses a checkpoint of another kind."""
    from kandinsky5.pipelines.request import ModelFacts

    task, nabla = _task_and_attention(args.variant, checkpoint)
    if task is None:
        tasks = {
            (False, False): Task.TEXT_TO_VIDEO,
            (False, True): Task.IMAGE_TO_VIDEO,
            (True, False): Task.TEXT_TO_IMAGE,
            (True, True): Task.IMAGE_TO_IMAGE,
        }
        task = tasks[images, args.image is not None]
    if args.image is not None and not task.takes_image:
        wanted = "an image-editing model (e.g. lite-edit-sft)" if task.makes_images else "an image-to-video model"
        raise UsageError(f"--image needs {wanted}; {args.model} is {TASK_NOUNS[task]}")
    if args.image is None and task is Task.IMAGE_TO_VIDEO:
        raise UsageError(f"{args.model} is an image-to-video model: give the first frame with --image PATH")
    if args.image is None and task is Task.IMAGE_TO_IMAGE:
        raise UsageError(f"{args.model} is an image-editing model: give the image to edit with --image PATH")
    return ModelFacts(variant=args.variant, nabla=nabla, task=task)


def _first_frame(args, facts):
    """The ``--image``, opened (``None`` for a model that takes none)."""
    from kandinsky5.io import load_image

    if not facts.task.takes_image:
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


def _resolve_model(args, whole_checkpoint: bool = True) -> tuple[Variant | None, Path | None]:
    """The variant ``--model`` names and the local checkpoint folder (``None`` for a hub id); a short name
    becomes its hub id."""
    from kandinsky5.loading.hub import is_hub_id
    from kandinsky5.variants import CheckpointFacts, variant_by_name, variant_for_folder

    folder = Path(args.model).expanduser()
    if args.model.strip() and folder.is_dir():
        if whole_checkpoint and CheckpointFacts.read(folder).pipeline_class_name is None:
            raise UsageError(
                f"--model: {folder} is no checkpoint folder (no readable model_index.json naming a pipeline)"
            )
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
    """The model's task (text- or image-to-video, text-to-image, image editing; ``None``: not known before
    loading) and whether the transformer uses NABLA, from the variant or else the local checkpoint's configs."""
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
    check_offload_device(args, device)


def check_offload_device(args, device) -> None:
    """``--offload`` (``generate`` and ``decode``) needs a GPU to offload to (``auto`` picks ``none`` on a CPU)."""
    if args.offload not in ("auto", "none") and device.type == "cpu":
        raise UsageError("--offload moves networks between the CPU and a GPU; it needs --device cuda")


def check_quantize_options(args, device, dtype) -> None:
    """``--quantize-transformer`` / ``--quantize-text-encoder``, checked before loading: the device can run the mode
    (FP8 units), its package is installed, and fp8 gets bfloat16 weights."""
    from kandinsky5.runtime.quantization import FP8_WEIGHT_DTYPE, check_quantize_arguments

    for option, transformer, text_encoder in (
        ("--quantize-transformer", args.quantize_transformer, None),
        ("--quantize-text-encoder", None, args.quantize_text_encoder),
    ):
        if transformer is None and text_encoder is None:
            continue
        try:
            check_quantize_arguments(transformer, text_encoder, device)
        except (ValueError, ImportError) as err:
            raise UsageError(f"{option} {transformer or text_encoder}: {one_line_message(err)}") from err
    if args.quantize_transformer == "fp8" and dtype != FP8_WEIGHT_DTYPE:
        raise UsageError(
            f"--quantize-transformer fp8 needs {str(FP8_WEIGHT_DTYPE).removeprefix('torch.')} weights; "
            f"pass --dtype {str(FP8_WEIGHT_DTYPE).removeprefix('torch.')} (got {str(dtype).removeprefix('torch.')})"
        )


def one_line_message(err: BaseException) -> str:
    """``err``'s message on one line."""
    return " ".join(str(err).split())


def _device_and_dtype(args):
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except RuntimeError as err:
        raise UsageError(f"--device: {err}") from err
    if device.type not in DEVICE_TYPES:
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {args.device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but no CUDA GPU is available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s), cuda:0 ...")
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    return device, dtype


def cmd_generate(args) -> int:
    launch = parallel_launch(args)
    if launch is not None:
        return cmd_generate_parallel(args, launch)
    request, device, dtype = prepare_generate(args)
    return run_generate(args, request, device, dtype)


def prepare_generate(args, launch=None):
    """Every check of ``generate`` before loading; the request, device and dtype. ``launch``: this process's place
    under torchrun (``None``: a single process)."""
    from kandinsky5.cli.plan import resolve_generate_offload

    request = _validate_generate(args, writes=launch is None)
    device, dtype = _device_and_dtype(args) if launch is None else _parallel_device_and_dtype(args, launch)
    _check_runtime_options(args, device)
    check_quantize_options(args, device, dtype)
    check_lora_options(args)
    if launch is None:
        resolve_generate_offload(args, request, device, dtype)
        return request, device, dtype
    check_parallel_options(args, request, launch)
    if launch.is_main:  # last: what only rank 0 checks (RankUsageError)
        check_outputs(args)
    return request, device, dtype


def run_generate(args, request, device, dtype, parallel: ParallelRun | None = None) -> int:
    """Load, encode the prompt once, generate a video per seed and print the summary (one process, or every rank of
    a parallel run, where rank 0 alone writes and prints)."""
    from kandinsky5.sampling.control import Phase, RunControl

    start = time.perf_counter()  # loading reports nothing (a download shows the hub client's progress)
    with interrupted_during("loading the model"):
        pipe = load_pipeline(args, request, device, dtype, parallel)
    load_s = time.perf_counter() - start
    # The prompt (and the negative prompt, when guidance is on) is encoded once for every seed.
    encoding = PhaseTimes()
    prints = parallel is None or parallel.is_main
    if args.lora_trigger_words:  # the adapters' trigger words before the prompt (not with --no-trigger-words)
        from kandinsky5.pipelines.lora import with_trigger_words

        prompts = [with_trigger_words(p, args.lora_trigger_words) for p in request.prompt]
        request = dataclasses.replace(request, prompt=prompts)
    with interrupted_during("encoding the prompt"), RunControl(on_progress=encoding).phase(Phase.ENCODE_TEXT):
        request = encoded_once(pipe, request, prints, shared=parallel is not None)
    results: list[SeedResult] = []
    try:
        for seed, out in zip(args.seed, args.outputs, strict=True):
            results.append(generate_one(args, pipe, request, seed, out, device, parallel))
    except BaseException as err:
        # a parallel run stopped by a failure says so in one line (the failing rank's), without a summary
        prints = prints and not (parallel is not None and stopped_by_failure(err))
        raise
    finally:  # also when interrupted: what was done, and what was kept
        failed = sum(not result.ok for result in results)
        if prints:
            print(
                f"kandinsky5: {len(results)} of {len(args.seed)} seed(s) run, {failed} failed; "
                + (f"{parallel.describe()}; " if parallel is not None else "")
                + f"load {load_s:.1f} s, text encode {encoding.seconds(Phase.ENCODE_TEXT):.1f} s (once), "
                f"total {time.perf_counter() - start:.1f} s"
            )
            for result in results:
                print(result.line)
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------- several processes


@dataclasses.dataclass(frozen=True)
class ParallelRun:
    """A ``generate`` run under torchrun: this process's ``launch`` (rank, world size) and the degrees."""

    launch: object  # kandinsky5.runtime.parallel.launch.Launch
    config: object  # kandinsky5.runtime.parallel.mesh.ParallelConfig
    shard_weights: bool

    @property
    def is_main(self) -> bool:
        return self.launch.is_main

    def describe(self) -> str:
        shards = ", sharded weights" if self.shard_weights else ""
        return (
            f"{self.launch.world_size} processes (Ulysses {self.config.ulysses_degree} x CFG "
            f"{self.config.cfg_degree}{shards})"
        )


PARALLEL_FLAGS = {"ulysses_degree": "--ulysses-degree", "cfg_degree": "--cfg-degree"}


def parallel_launch(args):
    """This process's place under torchrun (``WORLD_SIZE`` > 1), or ``None``; the parallel options are refused in a
    single process (degrees of 1 aside)."""
    from kandinsky5.runtime.parallel.launch import launch_from_environ

    try:
        launch = launch_from_environ()
    except ValueError as err:
        raise UsageError(f"torchrun environment: {err}") from err
    if launch is None:
        given = [flag for name, flag in PARALLEL_FLAGS.items() if getattr(args, name) not in (None, 1)]
        given += ["--shard-weights"] if args.shard_weights else []
        if given:
            raise UsageError(
                f"{' and '.join(given)} need several processes: launch with "
                "`torchrun --nproc-per-node N -m kandinsky5 generate ...`"
            )
    return launch


def _parallel_device_and_dtype(args, launch):
    """``_device_and_dtype`` under torchrun: each process's own GPU (``LOCAL_RANK``) or the CPU."""
    from kandinsky5.runtime.parallel.launch import rank_device

    try:
        device = rank_device(launch, args.device_asked)
    except ValueError as err:
        raise RankUsageError(str(err)) from err
    args.device = str(device)
    return _device_and_dtype(args)


def parallel_flag_names(message: str) -> str:
    """A :class:`ParallelConfig` message with its parameters named as the command's options."""
    for name, flag in PARALLEL_FLAGS.items():
        message = message.replace(name, flag)
    return message


def check_parallel_options(args, request, launch) -> None:
    """The parallel options under torchrun, checked before loading (every rank finds the same): the degrees
    (``ulysses x cfg`` = the process count; left out: derived from it), their fit to the model (attention heads and
    the video's token count divisible by the Ulysses degree), CFG 2 only with guidance, no offloading (each process
    holds its networks on its GPU), sharded weights neither quantized nor with a step cache split by CFG, the
    collectives' timeout. Sets ``args.parallel_config`` and ``args.collective_timeout``."""
    from kandinsky5.runtime.parallel.launch import collective_timeout
    from kandinsky5.runtime.parallel.mesh import ParallelConfig

    try:
        args.collective_timeout = collective_timeout(args.dist_timeout)
    except ValueError as err:
        raise UsageError(str(err)) from err

    try:
        config = ParallelConfig.resolve(
            launch.world_size, args.ulysses_degree, args.cfg_degree, guidance=request.uses_guidance
        )
    except ValueError as err:
        raise UsageError(f"{parallel_flag_names(str(err))} (torchrun started {launch.world_size})") from err
    if config.cfg_degree > 1 and not request.uses_guidance:
        raise UsageError(
            "--cfg-degree 2 splits the two guidance branches, and this run has no guidance (guidance 1): use "
            f"--ulysses-degree {launch.world_size} --cfg-degree 1"
        )
    check_ulysses_fit(args, request, config.ulysses_degree)
    if args.offload not in ("auto", "none"):
        raise UsageError(
            f"--offload {args.offload} does not combine with several processes: each holds its networks on its GPU "
            "(--shard-weights shares out the transformer's weights)"
        )
    args.offload_asked, args.offload, args.ff_chunk_tokens = args.offload, "none", None
    if args.shard_weights and args.quantize_transformer is not None:
        raise UsageError("--shard-weights and --quantize-transformer do not combine: choose one way to save memory")
    if args.shard_weights and args.cache_config is not None and config.cfg_degree > 1:
        raise UsageError(
            "--shard-weights with --cache magcache needs --cfg-degree 1: each branch's cache skips other blocks, and "
            "every block's weights are gathered by all processes"
        )
    args.parallel_config = config


def check_ulysses_fit(args, request, degree: int) -> None:
    """The Ulysses degree divides the transformer's attention heads and the video's visual tokens (read from the
    model's configs when they are at hand; the pipeline checks again when it loads)."""
    if degree == 1:
        return
    from kandinsky5.cli.plan import pipeline_configs
    from kandinsky5.pipelines.request import noise_latent_shape

    checkpoint = Path(args.model).expanduser()
    try:
        transformer = pipeline_configs(args.model, args.variant, checkpoint if checkpoint.is_dir() else None)
        transformer = transformer.transformer
        heads = transformer["model_dim"] // sum(transformer["axes_dims"])
        _, patch_h, patch_w = transformer.get("patch_size", (1, 2, 2))
    except Exception:  # advisory: the pipeline checks when it loads
        return
    if heads % degree:
        raise UsageError(
            f"--ulysses-degree {degree} must divide the transformer's {heads} attention heads; choose a divisor of "
            f"{heads}"
        )
    _, frames, height, width, _ = noise_latent_shape(1, request.num_frames, request.height, request.width, 16, 4, 8)
    tokens = frames * (height // patch_h) * (width // patch_w)
    if tokens % degree:
        raise UsageError(
            f"--ulysses-degree {degree} must divide the video's {tokens} visual tokens (latent frames x height/16 x "
            "width/16): choose another size, length or degree"
        )


def cmd_generate_parallel(args, launch) -> int:
    """``generate`` in one process of a torchrun launch: every check before loading, the default process group, then
    the run under :func:`~kandinsky5.runtime.parallel.failure.run_guarded` (a failing rank stops every rank with one
    line). A mistake every process finds (the degrees, the model, the size) ends every process at once, rank 0
    printing it; one that a process may find alone (the output file, which rank 0 alone checks; a process's GPU)
    is shared once the processes have met, and ends them all alike."""
    from kandinsky5.runtime.parallel import launch as launching
    from kandinsky5.runtime.parallel.failure import run_guarded

    args.device_asked = args.device  # each rank's own device replaces it

    def say(line: str) -> None:
        if launch.is_main:
            print(f"kandinsky5: error: {line}", file=sys.stderr)

    def job() -> int:
        error = request = device = dtype = None
        try:
            request, device, dtype = prepare_generate(args, launch)
        except RankUsageError as err:
            error = str(err)
        except UsageError as err:  # the same on every rank
            say(str(err))
            return 2
        except (FileNotFoundError, ValueError) as err:  # as main() reports them
            say(str(err))
            return 1
        timeout = getattr(args, "collective_timeout", None) or launching.collective_timeout(launching.DEFAULT_TIMEOUT_S)
        launching.init_distributed(launch, launching.backend_for(args.device_asked), device, timeout)
        failed = launching.first_error(error)
        if failed is not None:
            rank, message = failed
            say(message + (f" (on rank {rank})" if rank else ""))
            launching.shutdown()
            return 2
        parallel = ParallelRun(launch, args.parallel_config, args.shard_weights)
        status = run_generate(args, request, device, dtype, parallel)
        launching.shutdown()
        return status

    return run_guarded(
        job, launch.rank, launch.world_size, describe=describe_failure, report_interrupt=interrupt_report
    )


def stopped_by_failure(err: BaseException) -> bool:
    """Whether a parallel run ends by a failure (its own, or another rank's) rather than by the user's interrupt."""
    from kandinsky5.runtime.parallel.failure import recorded_failure

    return not isinstance(err, KeyboardInterrupt) or recorded_failure() is not None


class StageFailed(RuntimeError):
    """A stage of a parallel run failed on this rank; the message says which, on one line."""


def describe_failure(err: BaseException) -> str:
    """A failure on one line, for the line of the rank that failed."""
    return str(err) if isinstance(err, StageFailed) else one_line(err)


def load_pipeline(args, request, device, dtype, parallel: ParallelRun | None = None):
    """The pipeline of ``--model``, with the options that change its layers, placement and kernels; under torchrun,
    split over the processes (Ulysses, CFG, sharded weights)."""
    import torch

    task = getattr(args, "task", None)  # set by generate's checks; else (serve) the request tells
    if task is None:
        task = Task.IMAGE_TO_VIDEO if request.image is not None else Task.TEXT_TO_VIDEO
    pipe = pipeline_class(task).from_pretrained(args.model, torch_dtype=dtype)
    # layout transforms first: offloading then arms its hooks on the final layers
    if args.fuse_qkv:
        pipe.fuse_qkv_projections()
    if args.quantize_transformer is not None or args.quantize_text_encoder is not None:
        pipe.quantize(transformer=args.quantize_transformer, text_encoder=args.quantize_text_encoder)
    # LoRA after quantization (a separate low-rank branch over quantized weights), before offloading
    args.lora_trigger_words = apply_lora_options(args, pipe)
    if args.vae_channels_last:  # the image models' VAE is 2D
        pipe.vae.to(memory_format=torch.channels_last if task.makes_images else torch.channels_last_3d)
    if args.vae_tiling == "on":
        pipe.vae.enable_tiling()
    elif args.vae_tiling == "off":
        pipe.vae.disable_tiling()
    if args.offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif args.offload == "blocks":
        pipe.enable_block_offload(device=device)
    elif args.offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    elif parallel is not None and parallel.shard_weights:
        # the transformer reaches the GPU as shards (shard_transformer moves them): never whole on one GPU
        for module in (pipe.text_encoder, pipe.text_encoder_2, pipe.vae):
            if module is not None:
                module.to(device)
    else:
        pipe.to(device)
    if getattr(args, "ff_chunk_tokens", None) is not None:
        pipe.transformer.enable_forward_chunking(args.ff_chunk_tokens)
    if parallel is not None:
        # before compiling (the blocks compile with their FSDP hooks) and before the cache (its wrapper outermost,
        # so it decides on the whole sequence, alike on every rank)
        pipe.enable_parallelism(
            ulysses_degree=parallel.config.ulysses_degree,
            cfg_degree=parallel.config.cfg_degree,
            shard_weights=parallel.shard_weights,
        )
    if args.attention_backend is not None:
        pipe.transformer.set_attention_backend(args.attention_backend)
    if args.compile:
        pipe.transformer.compile()
    if args.cache_config is not None:
        pipe.transformer.enable_cache(args.cache_config)
    pipe.set_progress_bar_config(disable=args.no_progress or (parallel is not None and not parallel.is_main))
    return pipe


def pipeline_class(task: Task) -> type:
    """The pipeline class of ``task`` (its ``from_pretrained`` refuses a checkpoint of another task)."""
    import kandinsky5

    return {
        Task.TEXT_TO_VIDEO: kandinsky5.Kandinsky5T2VPipeline,
        Task.IMAGE_TO_VIDEO: kandinsky5.Kandinsky5I2VPipeline,
        Task.TEXT_TO_IMAGE: kandinsky5.Kandinsky5T2IPipeline,
        Task.IMAGE_TO_IMAGE: kandinsky5.Kandinsky5I2IPipeline,
    }[task]


def encoded_once(pipe, request, prints: bool = True, shared: bool = False):
    """``request`` with its prompts (expanded first with ``--expand-prompt``; the expansion printed when
    ``prints``) replaced by their embeddings, so that every seed reuses them. ``shared`` (a run under torchrun):
    rank 0 alone expands, and sends the text to the other ranks."""
    prompt = request.prompt
    if request.expand_prompt:
        if shared:
            import torch.distributed as dist

            sent = [pipe.expand_prompt(prompt) if dist.get_rank() == 0 else None]
            dist.broadcast_object_list(sent, src=0)
            prompt = sent[0]
        else:
            prompt = pipe.expand_prompt(prompt)
        if prints:
            for text in prompt:
                print(f"kandinsky5: expanded prompt: {text}", flush=True)
    options = {"max_sequence_length": request.max_sequence_length}
    if getattr(pipe, "task", None) is Task.IMAGE_TO_IMAGE:  # the editing model's text encoder sees the image
        options["image"] = request.image
    embeds = embedding_kwargs("prompt", pipe.encode_prompt(prompt, **options))
    if request.uses_guidance:
        negative = pipe.encode_prompt(request.negative_prompts(), **options)
        embeds.update(embedding_kwargs("negative_prompt", negative))
    return dataclasses.replace(request, prompt=None, negative_prompt=None, expand_prompt=False, **embeds)


class PhaseTimes:
    """Seconds spent in each phase of a run, from its progress events (a :class:`RunControl` listener), and the
    times the denoising steps ended."""

    def __init__(self):
        self._started: dict = {}
        self._seconds: dict = {}
        self.step_ends: list[float] = []
        self.last_event = None

    def __call__(self, event) -> None:
        from kandinsky5.sampling.control import Phase

        self.last_event = event
        if event.phase is Phase.DENOISE:
            self.step_ends.append(event.elapsed_s)
        if event.completed == 0:
            self._started[event.phase] = event.elapsed_s
        if event.finished and event.phase in self._started:
            spent = event.elapsed_s - self._started.pop(event.phase)
            self._seconds[event.phase] = self._seconds.get(event.phase, 0.0) + spent

    def seconds(self, phase) -> float:
        """The seconds ``phase`` took (0 if it never finished)."""
        return self._seconds.get(phase, 0.0)

    def ran(self, phase) -> bool:
        return phase in self._seconds

    def current(self) -> str | None:
        """What the run is doing now, for an interrupt's report (``None`` between phases)."""
        from kandinsky5.sampling.control import Phase

        event = self.last_event
        if event is None or (event.finished and event.phase is not Phase.DENOISE):
            return None
        if event.phase is Phase.DENOISE:
            return None if event.finished else f"sampling (step {event.completed + 1} of {event.total})"
        return STAGE_OF_PHASE[event.phase]

    def seconds_per_step(self) -> float:
        steps = len(self.step_ends) - 1  # the first event is the phase's start
        return (self.step_ends[-1] - self.step_ends[0]) / steps if steps > 0 else float("nan")


class PhaseStatus:
    """A line on stderr when decoding or writing starts (the progress bar covers the denoising steps), so the
    seconds after the bar's 100 % are not silent; off with ``--no-progress``."""

    def __init__(self, written: str = "the video"):
        self.said = {"decode": "decoding the latents", "write": f"writing {written}"}

    def __call__(self, event) -> None:
        if event.completed == 0 and event.phase in self.said:
            print(f"kandinsky5: {self.said[event.phase]} ...", file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class SeedResult:
    """How one seed of ``generate`` went: ``line`` is its summary line."""

    seed: int
    ok: bool
    line: str


# Longest error text a one-line report quotes (CUDA's out-of-memory messages run to several hundred characters).
MAX_REASON_CHARS = 240


def one_line(err: BaseException) -> str:
    """``err`` as ``Type: message`` on one line, shortened to ``MAX_REASON_CHARS``."""
    reason = " ".join(f"{type(err).__name__}: {err}".split()).removesuffix(":")
    return reason if len(reason) <= MAX_REASON_CHARS else reason[: MAX_REASON_CHARS - 3] + "..."


def decode_frames(decode_latents, latents):
    """The first video of ``latents`` decoded as the pipeline's ``output_type="np"`` gives it: ``(frames, H, W, 3)``
    float32 in [0, 1]. ``decode_latents`` is a pipeline's (``Kandinsky5PipelineBase.decode_latents``)."""
    import torch

    from kandinsky5.pipelines.output import postprocess_video

    with torch.no_grad():
        return postprocess_video(decode_latents(latents), "np")[0]


def decode_images(decode_latents, latents):
    """Every image of one-frame ``latents`` decoded as the image pipelines' ``output_type="np"`` gives them:
    ``(images, H, W, 3)`` float32 in [0, 1]. ``decode_latents`` is an image pipeline's."""
    import torch

    from kandinsky5.pipelines.output import postprocess_image

    with torch.no_grad():
        return postprocess_image(decode_latents(latents), "np")


def makes_images(args) -> bool:
    """Whether ``generate``'s model makes images (``args.task``, set by its checks)."""
    task = getattr(args, "task", None)
    return task is not None and task.makes_images


def sampled_latents(output):
    """The latents of an ``output_type="latent"`` call: a video pipeline's ``.frames``, an image pipeline's
    ``.image``."""
    image = getattr(output, "image", None)
    return output.frames if image is None else image


def generate_one(args, pipe, request, seed: int, out: Path, device, parallel: ParallelRun | None = None) -> SeedResult:
    """One video of ``request`` from ``seed``, written to ``out``; or for an image model its ``--num-images``
    images, sampled together, written to :func:`output_files` of ``out``.

    Sampling and decoding are separate steps, so that the sampled latents outlive a failed decode or write: they are
    then kept beside ``out`` (kandinsky5/cli/latents.py; one file per image not written), and one line on stderr says
    what failed and how to decode them later (``kandinsky5 decode``). A failed write also keeps the frames as a
    ``.npy`` file. A failure is returned (the next seed runs); a cancellation or interrupt is raised again once the
    latents are safe.

    In a parallel run (``parallel``) every rank samples and decodes (the VAE's tiles shared among them) and rank 0
    alone writes, keeps and prints; a failed sampling or decode raises :class:`StageFailed` (the ranks cannot go on
    out of step: the run stops, see ``cmd_generate_parallel``), a failed write is rank 0's alone and is returned.
    """
    import torch

    from kandinsky5.io import export_to_video, save_image
    from kandinsky5.runtime.offload import release_cached_memory
    from kandinsky5.runtime.parallel.failure import fault_injection
    from kandinsky5.sampling.control import GenerationCancelled, Phase, RunControl

    images = makes_images(args)
    outs = output_files(args, out) if images else [out]
    named = ", ".join(str(path) for path in outs)
    main = parallel is None or parallel.is_main
    times = PhaseTimes()
    control = RunControl(on_progress=times)
    if not args.no_progress and main:
        control.add_listener(PhaseStatus(("the images" if len(outs) > 1 else "the image") if images else "the video"))
    fault = fault_injection(0 if parallel is None else parallel.launch.rank)
    if fault is not None:
        control.add_listener(fault)
    seeded = dataclasses.replace(
        request, generator=torch.Generator("cpu").manual_seed(seed), output_type="latent", return_dict=True
    )
    try:
        # the latents after the pipeline's finalize_latents: what its own decode would receive
        with interrupted_during(times.current):
            latents = sampled_latents(pipe.generate(seeded, control))
    except GenerationCancelled:
        raise
    except Exception as err:
        release_cached_memory(device)
        if parallel is not None:
            raise StageFailed(f"seed {seed}: sampling failed ({one_line(err)})") from err
        print(f"kandinsky5: error: seed {seed}: sampling failed ({one_line(err)}); nothing to keep", file=sys.stderr)
        return SeedResult(seed, False, f"{named}: FAILED, seed {seed}: sampling ({type(err).__name__}); nothing kept")
    stage, frames, written = Phase.DECODE, None, 0
    decode = pipe.decode_latents  # in a parallel run the ranks share the tiles
    try:
        with interrupted_during(times.current):
            with control.phase(Phase.DECODE):
                frames = decode_images(decode, latents) if images else decode_frames(decode, latents)
            pipe.maybe_free_model_hooks()
            stage = Phase.WRITE
            if not main:
                return SeedResult(seed, True, "")
            with control.phase(Phase.WRITE):
                if images:
                    for image, path in zip(frames, outs, strict=True):
                        save_image(image, path, quality=args.quality)
                        written += 1
                else:
                    export_to_video(frames, str(out), fps=args.fps, quality=args.quality)
    except KeyboardInterrupt as err:
        # the interrupt's one line (main) says what was kept: the latents, quickly (not the frames)
        pipe.maybe_free_model_hooks()
        if main:
            err.kept = keep_unwritten(args, request, seed, outs[written:], latents[written:], None, err)
        raise
    except Exception as err:
        pipe.maybe_free_model_hooks()
        release_cached_memory(device)
        if parallel is not None and stage is Phase.DECODE:
            raise decode_failed(args, request, seed, outs, latents, err, main) from err
        unwritten = None if frames is None else frames[written:]
        kept = keep_unwritten(args, request, seed, outs[written:], latents[written:], unwritten, err)
        what = "decoding" if stage is Phase.DECODE else f"writing {outs[written]}"
        print(f"kandinsky5: error: seed {seed}: {what} failed ({one_line(err)}); {kept}", file=sys.stderr)
        if isinstance(err, GenerationCancelled):
            raise
        return SeedResult(seed, False, f"{named}: FAILED, seed {seed}: {stage} ({type(err).__name__}); {kept}")
    count, height, width, _ = frames.shape
    image = times.seconds(Phase.ENCODE_IMAGE)
    if images:
        what = f"{count} images, " if count > 1 else ""
    else:
        what = f"{count} frames at {args.fps} fps, "
    line = (
        f"{named}: ok, seed {seed}, {width}x{height}, {what}"
        f"{request.num_inference_steps} steps at {times.seconds_per_step():.2f} s/step; "
        + (f"image encode {image:.1f} s, " if times.ran(Phase.ENCODE_IMAGE) else "")
        + f"sampling {times.seconds(Phase.DENOISE):.1f} s, decode {times.seconds(Phase.DECODE):.1f} s, "
        f"write {times.seconds(Phase.WRITE):.1f} s"
    )
    cache = getattr(pipe.transformer, "cache", None)
    if cache is not None:
        line += f"; cache skipped {cache.skipped_calls} of {cache.total_calls} model calls"
    return SeedResult(seed, True, line)


def decode_failed(args, request, seed: int, outs: list[Path], latents, err: BaseException, main: bool) -> StageFailed:
    """The error of a parallel decode that failed on this rank (or on another, whose collective this one was in):
    rank 0 first keeps the latents (every rank holds them) and says where, on the failure's line when the failure
    is its own, else on a line of its own (the failing rank reports the failure)."""
    message = f"seed {seed}: decoding failed ({one_line(err)})"
    if not main:
        return StageFailed(message)
    from kandinsky5.runtime.parallel.failure import recorded_failure

    kept = keep_unwritten(args, request, seed, outs, latents, None, err)
    other = recorded_failure()
    if other is not None and other[0] != 0:
        print(f"kandinsky5: seed {seed}: {kept}", file=sys.stderr)
    return StageFailed(f"{message}; {kept}")


def keep_unwritten(args, request, seed: int, outs: list[Path], latents, frames, err: BaseException) -> str:
    """:func:`keep_after_failure` for each output not written: the video (``latents`` of one video), or each image
    (``latents`` and ``frames`` hold one row per image of ``outs``), each kept beside its own path."""
    if len(outs) == 1:
        return keep_after_failure(args, request, seed, outs[0], latents[:1], None if frames is None else frames, err)
    said = []
    for index, out in enumerate(outs):
        image_frames = None if frames is None else frames[index : index + 1]
        said.append(keep_after_failure(args, request, seed, out, latents[index : index + 1], image_frames, err))
    return "; ".join(said)


def keep_after_failure(args, request, seed: int, out: Path, latents, frames, err: BaseException) -> str:
    """Save what a failed decode or write leaves (the latents; the frames too when they were decoded) and say
    where, with the command that decodes the latents later."""
    import torch

    from kandinsky5.cli.latents import save_latents
    from kandinsky5.io import save_frames_fallback

    said = []
    if frames is not None:
        try:
            said.append(f"the frames are kept in {save_frames_fallback(frames, out)}")
        except Exception as frames_err:
            said.append(f"the frames could not be kept ({one_line(frames_err)})")
    metadata = dict(
        fps=args.fps,
        quality=args.quality,
        model=args.model,
        seed=seed,
        prompt=args.prompt,
        image=args.image,
        height=request.height,
        width=request.width,
        num_frames=request.num_frames,
        video=out,
    )
    try:
        path = save_latents(latents, out, metadata)
    except Exception as save_err:
        said.append(f"the sampled latents could not be kept ({one_line(save_err)})")
        return "; ".join(said)
    out_of_memory = isinstance(err, torch.OutOfMemoryError)
    said.append(
        f"the sampled latents are kept in {path}; decode them with: {decode_command(args, path, out, out_of_memory)}"
    )
    return "; ".join(said)


def decode_command(args, latents: Path, out: Path, out_of_memory: bool = False) -> str:
    """The ``kandinsky5 decode`` command line that turns kept latents into the video ``generate`` meant to write,
    with the options of this run that matter to decoding (forced VAE tiling after an out-of-memory error)."""
    import shlex

    model = Path(args.model).expanduser()
    parts = ["kandinsky5", "decode", str(latents), "--model", str(model.absolute() if model.is_dir() else args.model)]
    parts += ["--out", str(out)]
    if args.device != "auto":
        parts += ["--device", args.device]
    if args.dtype != "auto":
        parts += ["--dtype", args.dtype]
    offload = getattr(args, "offload_asked", args.offload)  # as given: decode's auto decides for the VAE alone
    if offload != "auto":
        parts += ["--offload", offload]
    tiling = "on" if out_of_memory else args.vae_tiling
    if tiling != "auto":
        parts += ["--vae-tiling", tiling]
    if args.vae_channels_last:
        parts.append("--vae-channels-last")
    return shlex.join(parts)


def embedding_kwargs(prefix: str, embeds) -> dict:
    """``encode_prompt``'s three tensors as the pipeline's precomputed-embedding arguments."""
    names = ("embeds_qwen", "embeds_clip", "cu_seqlens")
    return {f"{prefix}_{name}": tensor for name, tensor in zip(names, embeds, strict=True)}


def new_output(path, overwrite: bool) -> Path:
    """``path`` checked writable (:func:`checked_output_path`: a video's or an image's, by its suffix), and not an
    existing file unless ``overwrite``."""
    path = checked_output_path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
    return path


def output_paths(out: Path, seeds: list[int]) -> list[Path]:
    """One path per seed: ``out`` itself for one seed, else ``<stem>-seed<N><suffix>`` beside it."""
    if len(seeds) == 1:
        return [out]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seed: repeated seeds {seeds}")
    return [out.with_name(f"{out.stem}-seed{seed}{out.suffix}") for seed in seeds]


def _validate_decode(args):
    """Every check of ``decode`` that loads no model: the latents file (ours, with latents of one video or one
    image), the output path, the export options, the device and the checkpoint's VAE folder (its config fits the
    latents; a 2D VAE, an image model's, decodes one-frame latents into an image: .png/.jpg/.jpeg/.webp, no
    ``--fps``). Sets ``args.fps``/``args.quality`` (default: the generate run's, stored in the file),
    ``args.vae_folder`` and ``args.images``; returns the file's header."""
    from kandinsky5.cli.latents import LatentsFileError, read_header

    try:
        header = read_header(args.latents)
    except LatentsFileError as err:
        raise UsageError(str(err)) from err
    try:
        args.out = new_output(args.out, args.overwrite)
    except (ValueError, OSError) as err:
        raise UsageError(str(err)) from err
    fps_given = args.fps is not None
    if args.fps is None:
        args.fps = int(header.number("fps", DEFAULT_FPS))
    if args.fps < 1:
        raise UsageError(f"--fps must be >= 1, got {args.fps}")
    if args.quality is None:
        args.quality = header.number("quality", DEFAULT_QUALITY)
    if not 0 <= args.quality <= 10:
        raise UsageError(f"--quality must be within 0..10, got {args.quality}")
    args.variant, _ = _resolve_model(args, whole_checkpoint=False)  # decode needs only its vae/ folder
    args.vae_folder = _vae_folder(args, header)
    args.images = _is_image_vae(args.vae_folder)
    if args.images:
        if header.shape[1] != 1:
            raise UsageError(
                f"--model: {args.model} is an image model (2D VAE); {header.path} holds {header.shape[1]} latent "
                "frames, a video's"
            )
        if fps_given:
            raise UsageError(f"--fps is a video option; {args.model} is an image model")
    if args.images != _is_image_path(args.out):
        from kandinsky5.io.image_output import suffixes_text

        wanted = f"an image: give a path ending in {suffixes_text()}" if args.images else "a video: give a .mp4 path"
        raise UsageError(f"--out {args.out}: the latents of {args.model} decode into {wanted}")
    return header


def _is_image_vae(folder: Path) -> bool:
    """Whether the ``vae/`` folder holds an image model's 2D VAE (by its config's class)."""
    from kandinsky5.loading.diffusers_format import CheckpointError
    from kandinsky5.pipelines.loading import vae_class

    try:
        return vae_class(folder).__name__ == "AutoencoderKL2D"
    except CheckpointError as err:
        raise UsageError(f"--model: {err}") from err


def _vae_folder(args, header) -> Path:
    """The ``vae/`` folder of ``--model`` (a hub id is fetched to the local cache), checked against the latents."""
    from kandinsky5.loading.diffusers_format import CONFIG_FILE, CheckpointError, component_folder, read_json
    from kandinsky5.loading.hub import resolve_checkpoint

    root = resolve_checkpoint(args.model)
    try:
        folder = component_folder(root, "vae")
        config = read_json(folder / CONFIG_FILE)
    except CheckpointError as err:
        raise UsageError(f"--model: {err}") from err
    channels = config.get("latent_channels")
    if channels is not None and channels != header.shape[-1]:
        raise UsageError(
            f"--model: the VAE of {args.model} takes {channels} latent channels; {header.path} holds {header.shape[-1]}"
        )
    return folder


def load_vae(args, device, dtype):
    """The checkpoint's VAE alone, with ``--vae-channels-last``, ``--vae-tiling`` and ``--offload`` applied as
    ``load_pipeline`` applies them to a pipeline's; and the offload plan (``None`` without offload)."""
    import torch

    from kandinsky5.loading.diffusers_format import load_component
    from kandinsky5.pipelines.loading import vae_class
    from kandinsky5.runtime.offload import ModelCpuOffload, SequentialCpuOffload, offload_execution_device

    vae = load_component(vae_class(args.vae_folder), args.vae_folder, dtype)
    if args.vae_channels_last:  # an image model's VAE is 2D
        vae.to(memory_format=torch.channels_last if getattr(args, "images", False) else torch.channels_last_3d)
    if args.vae_tiling == "on":
        vae.enable_tiling()
    elif args.vae_tiling == "off":
        vae.disable_tiling()
    if args.offload == "none":
        return vae.to(device), None
    # blocks: the VAE has no streamed blocks and moves whole, as under model offload
    plan_class = SequentialCpuOffload if args.offload == "sequential" else ModelCpuOffload
    return vae, plan_class({"vae": vae}, offload_execution_device(plan_class.method, None, device, None))


def cmd_decode(args) -> int:
    """Decode a latents file kept by ``generate`` into the MP4 it would have written: only the VAE is loaded, and
    the latents go through the pipeline's own ``decode_latents`` and ``output_type="np"`` conversion."""
    from kandinsky5.cli.plan import resolve_decode_offload

    header = _validate_decode(args)
    device, dtype = _device_and_dtype(args)
    check_offload_device(args, device)
    resolve_decode_offload(args, header, device, dtype)

    from functools import partial

    import torch

    from kandinsky5.cli.latents import load_latents
    from kandinsky5.io import export_to_video, save_frames_fallback, save_image
    from kandinsky5.pipelines.output import decode_image_latents, decode_latents
    from kandinsky5.sampling.control import Phase, RunControl

    start = time.perf_counter()
    with interrupted_during("loading the VAE"):
        vae, plan = load_vae(args, device, dtype)
    load_s = time.perf_counter() - start
    latents = load_latents(header).to(plan.device if plan is not None else device)
    times = PhaseTimes()
    control = RunControl(on_progress=times)
    # the pipeline's decode, with the VAE alone
    decode = partial(decode_image_latents if args.images else decode_latents, vae)
    try:
        with interrupted_during("decoding"), control.phase(Phase.DECODE):
            frames = decode_images(decode, latents) if args.images else decode_frames(decode, latents)
    except Exception as err:
        hint = " (try --vae-tiling on, or --offload model)" if isinstance(err, torch.OutOfMemoryError) else ""
        print(
            f"kandinsky5: error: decoding {header.path} failed ({one_line(err)}); the latents file is unchanged{hint}",
            file=sys.stderr,
        )
        return 1
    finally:
        if plan is not None:
            plan.free()
    try:
        with control.phase(Phase.WRITE):
            if args.images:
                save_image(frames[0], args.out, quality=args.quality)
            else:
                export_to_video(frames, str(args.out), fps=args.fps, quality=args.quality)
    except Exception as err:
        kept = save_frames_fallback(frames, args.out)
        print(
            f"kandinsky5: error: writing {args.out} failed ({one_line(err)}); the frames are kept in {kept}",
            file=sys.stderr,
        )
        return 1
    frames_count, height, width, _ = frames.shape
    what = "an image" if args.images else f"{frames_count} frames at {args.fps} fps"
    print(
        f"{args.out}: ok, decoded from {header.path}, {width}x{height}, {what}; "
        f"load {load_s:.1f} s, decode {times.seconds(Phase.DECODE):.1f} s, write {times.seconds(Phase.WRITE):.1f} s"
    )
    return 0


def cmd_tiny_checkpoint(args) -> int:
    from kandinsky5.tiny import write_tiny_checkpoint

    folder = Path(args.directory)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{folder} exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not args.force:
        raise UsageError(f"{folder} is not empty; pass --force to write the checkpoint into it")
    folder = write_tiny_checkpoint(folder, seed=args.seed, task=args.task)
    kind = args.task.upper()
    noise = "images" if Task(args.task).makes_images else "videos"
    print(f"{folder}: tiny random-weight Kandinsky 5 {kind} checkpoint (Diffusers layout; it generates noise {noise})")
    return 0


def format_models(variants: tuple[Variant, ...] = VARIANTS) -> list[str]:
    """One line per variant: short name, hub id, task and the defaults ``generate`` uses (an image model: one
    frame, no frame rate; its output an image)."""
    name_width = max(len(v.short_name) for v in variants)
    id_width = max(len(v.repo_id) for v in variants)
    lines = []
    for v in variants:
        d = v.defaults
        output = "frames=1 output=image" if v.makes_images else f"frames={d.num_frames} fps={v.fps} output=video"
        lines.append(
            f"{v.short_name:<{name_width}}  {v.repo_id:<{id_width}}  {v.task}  steps={d.num_inference_steps} "
            f"guidance={d.guidance_scale:.1f} height={d.height} width={d.width} {output} attention={v.attention}"
        )
    return lines


def cmd_models(args) -> int:
    print("\n".join(format_models()))
    return 0


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM during a command (raised by :class:`InterruptSignals`); ``stage`` is what was running
    (set by :func:`interrupted_during` as it unwinds), ``kept`` what was saved on the way out."""

    def __init__(self, signum: int, stage: str | None = None):
        import signal

        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.stage = stage
        self.kept: str | None = None


class InterruptSignals:
    """While in use, SIGINT and SIGTERM raise :class:`Interrupted` in the main thread, so that a SIGTERM unwinds
    like a Ctrl-C (``finally`` blocks run, temporary files are removed); the previous handlers come back after.
    Signals ignored on entry (a background job's SIGINT) stay ignored. ``disarm()`` makes later signals do nothing
    (while the interrupt is reported)."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self):
        self.armed = True
        self._previous: dict = {}

    def __call__(self, signum, frame) -> None:
        if not self.armed:
            return
        raise Interrupted(signum)

    def disarm(self) -> None:
        self.armed = False

    def __enter__(self) -> InterruptSignals:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                signum = getattr(signal, name)
                if signal.getsignal(signum) != signal.SIG_IGN:
                    self._previous[signum] = signal.signal(signum, self)
        return self

    def __exit__(self, *exc_info) -> None:
        import signal

        for signum, handler in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()


# What a run was doing in each phase, as an interrupt's report says it.
STAGE_OF_PHASE = {
    "encode_text": "encoding the prompt",
    "encode_image": "encoding the image",
    "decode": "decoding",
    "write": "writing the video",
}


@contextmanager
def interrupted_during(stage: str | Callable[[], str | None]):
    """An interrupt inside says it stopped during ``stage`` (a text, or a function giving it when the interrupt
    comes), unless an inner block named a stage already."""
    try:
        yield
    except KeyboardInterrupt as err:
        if getattr(err, "stage", None) is None:
            err.stage = stage() if callable(stage) else stage
        raise


def interrupt_report(err: KeyboardInterrupt) -> tuple[str, int]:
    """The line an interrupted command prints and its exit status (128 + the signal: 130 SIGINT, 143 SIGTERM)."""
    import signal

    from kandinsky5.io.atomic import discarded_writes

    signum = getattr(err, "signum", signal.SIGINT)
    discarded = discarded_writes(err)
    stage = getattr(err, "stage", None)
    if discarded:
        where = f" while writing {discarded[-1]}"
    elif stage:
        where = f" during {stage}"
    else:
        where = ""
    line = f"kandinsky5: interrupted by {signal.Signals(signum).name}{where}; no partial file was left"
    kept = getattr(err, "kept", None)
    return line + (f"; {kept}" if kept else ""), 128 + signum


def silence_import_noise() -> None:
    """Keep the command's stderr to its own lines: only errors of :data:`IMPORT_NOISE_LOGGERS` get through."""
    for name in IMPORT_NOISE_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


class WarningLines(logging.Handler):
    """The package's warnings (an untrained size, an image size snapped to a trained one, ...) as
    ``kandinsky5: warning: ...`` lines on the stderr of the moment (what Python's last-resort handler would print
    bare)."""

    def __init__(self):
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(f"kandinsky5: warning: {record.getMessage()}", file=sys.stderr, flush=True)
        except Exception:
            self.handleError(record)


@contextmanager
def warning_lines(command: str):
    """:class:`WarningLines` on the ``kandinsky5`` logger while a command runs (not ``serve``, whose server logs
    its own way), unless the logging is configured already (handlers on the root logger)."""
    logger = logging.getLogger("kandinsky5")
    if command == "serve" or logging.getLogger().handlers or logger.handlers:
        yield
        return
    handler = WarningLines()
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    silence_import_noise()
    handlers = {
        "generate": cmd_generate,
        "decode": cmd_decode,
        "models": cmd_models,
        "plan": cmd_plan,
        "tiny-checkpoint": cmd_tiny_checkpoint,
        "calibrate-cache": cmd_calibrate_cache,
        "serve": cmd_serve,
    }
    # SIGINT and SIGTERM unwind the command (every file is written under a temporary name and renamed when
    # complete, so nothing partial is left) and end it with one line and the status 130 or 143.
    with InterruptSignals() as signals, warning_lines(args.command):
        try:
            return handlers[args.command](args)
        except KeyboardInterrupt as err:
            signals.disarm()
            line, status = interrupt_report(err)
            print(line, file=sys.stderr)
            return status
        except UsageError as err:
            print(f"kandinsky5: error: {err}", file=sys.stderr)
            return 2
        except (FileNotFoundError, ValueError) as err:
            print(f"kandinsky5: error: {err}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
