"""``kandinsky5 plan``: the memory a generation needs in each offload mode, from the model's configs alone (no
weight is read, nothing is downloaded), and the mode ``generate --offload auto`` would pick for this GPU's free
memory (or ``--free-gib``). Also the automatic choice itself, for ``generate`` and ``decode`` (``--offload auto``).

See kandinsky5/runtime/memory_plan.py for the model behind the figures and docs/memory.md for the modes.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kandinsky5.runtime.memory_plan import MemoryPlan, PipelineConfigs, PlanInputs

# generate's --vae-tiling values -> PlanInputs.vae_tiling
VAE_TILING_OF_OPTION = {"auto": None, "on": True, "off": False}
# what the plan assumes for --dtype auto: the GPU default (the figures are for a GPU)
PLAN_DEFAULT_DTYPE = "bfloat16"
# stands in for the prompt of the request the plan validates (a prompt's length changes no memory figure: the
# plan counts max_sequence_length tokens)
PLAN_PROMPT = "(memory plan)"


def add_quantize_options(parser) -> None:
    """``--quantize-transformer`` and ``--quantize-text-encoder`` (``generate`` and ``plan``). Their values are
    checked against kandinsky5.runtime.quantization's modes when given (so that building the parser imports no
    torch)."""
    parser.add_argument(
        "--quantize-transformer",
        type=_quantization_mode("TRANSFORMER_MODES"),
        default=None,
        metavar="MODE",
        help="low-bit transformer weights: fp8 (GPUs with FP8 units; bfloat16) or int8 (weight-only)",
    )
    parser.add_argument(
        "--quantize-text-encoder",
        type=_quantization_mode("TEXT_ENCODER_MODES"),
        default=None,
        metavar="MODE",
        help="low-bit Qwen2.5-VL decoder layers: int8 (torchao) or nf4 (bitsandbytes)",
    )


def _quantization_mode(modes: str):
    """An argparse ``type`` accepting the modes ``kandinsky5.runtime.quantization.<modes>`` lists."""
    import argparse

    def mode(value: str) -> str:
        from kandinsky5.runtime import quantization

        allowed = getattr(quantization, modes)
        if value not in allowed:
            raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (choose from {', '.join(allowed)})")
        return value

    return mode


def add_plan_parser(sub) -> None:
    from kandinsky5.cli.main import DTYPES, VAE_TILING_MODES, add_size_options

    plan = sub.add_parser(
        "plan",
        help="estimate the GPU and host memory of a generation in each offload mode (no weights read)",
        description="Builds the model's networks on the meta device from its configs (a local checkpoint's, the hub "
        "cache's, or the built-in ones of an official model) and prints, per offload mode and phase, the estimated "
        "peak GPU memory and the host memory, then the mode `generate --offload auto` would pick.",
    )
    plan.add_argument(
        "--model", required=True, help="short name (see `kandinsky5 models`), hub id or local checkpoint directory"
    )
    add_size_options(plan)
    plan.add_argument("--batch", type=int, default=1, help="videos (images) per transformer call (default 1)")
    plan.add_argument(
        "--guidance", type=float, default=None, help="guidance scale; 1 disables it (default: the model's)"
    )
    plan.add_argument(
        "--batched-guidance",
        action="store_true",
        help="both guidance branches in one transformer call (pipe.batched_guidance)",
    )
    plan.add_argument(
        "--max-sequence-length",
        type=int,
        default=None,
        help="prompt tokens kept (default: the model's; 512, image editing 1024)",
    )
    plan.add_argument("--dtype", default="auto", choices=DTYPES, help="auto: bfloat16 (the GPU default)")
    add_quantize_options(plan)
    plan.add_argument(
        "--vae-tiling", choices=VAE_TILING_MODES, default="auto", help="auto (tiles when short of memory), on, off"
    )
    plan.add_argument(
        "--free-gib",
        type=float,
        default=None,
        help="free GPU memory to choose a mode for, in GiB (default: this machine's GPU's)",
    )
    plan.set_defaults(prompt=PLAN_PROMPT, negative_prompt=None, steps=None, image=None)


# ---------------------------------------------------------------------------------------------------- configs


def cached_checkpoint(repo_id: str) -> Path | None:
    """The hub cache's snapshot of ``repo_id``, or ``None`` (nothing is downloaded)."""
    from kandinsky5.loading.hub import CheckpointNotFoundError, resolve_checkpoint

    try:
        return resolve_checkpoint(repo_id, local_files_only=True)
    except CheckpointNotFoundError:
        return None


def pipeline_configs(model: str, variant, checkpoint: Path | None) -> PipelineConfigs:
    """The configs of ``--model``: a local checkpoint's, else the hub cache's, else an official variant's built-in
    ones. A ``UsageError`` when there are none."""
    from kandinsky5.cli.main import UsageError
    from kandinsky5.runtime.memory_plan import PipelineConfigs

    folder = checkpoint if checkpoint is not None else cached_checkpoint(model)
    if folder is not None:
        try:
            return PipelineConfigs.from_checkpoint(folder)
        except (OSError, ValueError) as err:
            if checkpoint is not None or variant is None:
                raise UsageError(f"--model: {err}") from err
    if variant is not None:
        return PipelineConfigs.for_variant(variant)
    raise UsageError(
        f"--model: no configs for {model}: it is no official model and not in the hub cache; download it "
        "(`hf download ...`) or pass its local directory"
    )


def plan_inputs(args, request, dtype) -> PlanInputs:
    """The plan's inputs of a validated request and the memory options of ``args``."""
    from kandinsky5.cli.main import num_images
    from kandinsky5.runtime.memory_plan import PlanInputs

    return PlanInputs(
        height=request.height,
        width=request.width,
        num_frames=request.num_frames,
        # plan's --batch; generate's outputs per call (an image model's --num-images)
        batch=getattr(args, "batch", None) or num_images(args),
        guidance=request.uses_guidance,
        batched_guidance=getattr(args, "batched_guidance", False),
        max_sequence_length=request.max_sequence_length,
        dtype=dtype,
        quantize_transformer=args.quantize_transformer,
        quantize_text_encoder=args.quantize_text_encoder,
        vae_tiling=VAE_TILING_OF_OPTION[args.vae_tiling],
    )


def free_gpu_bytes(device) -> int | None:
    """What a generation on ``device`` can take: free device memory plus what PyTorch's allocator holds unused
    (the VAE's automatic tiling reads the same); ``None`` off CUDA."""
    from kandinsky5.runtime.vae_tiling import device_free_bytes

    return device_free_bytes(device)


# ---------------------------------------------------------------------------------------------------- the command


def cmd_plan(args) -> int:
    import torch

    from kandinsky5.cli.main import UsageError, _resolve_model, _task_and_attention, build_request, frames_for_seconds
    from kandinsky5.pipelines.request import ModelFacts
    from kandinsky5.runtime.memory_plan import choose_mode, format_gib, plan_memory
    from kandinsky5.variants import FPS, Task

    if args.batch < 1:
        raise UsageError(f"--batch must be >= 1, got {args.batch}")
    if args.free_gib is not None and not args.free_gib >= 0:
        raise UsageError(f"--free-gib must be a number of GiB >= 0, got {args.free_gib}")
    args.variant, checkpoint = _resolve_model(args, whole_checkpoint=False)
    task, nabla = _task_and_attention(args.variant, checkpoint)
    configs = None
    if task is None:  # a hub id of no known variant: its configs tell whether it makes images
        configs = pipeline_configs(args.model, args.variant, checkpoint)
        if configs.makes_images:
            task = Task.IMAGE_TO_IMAGE if configs.edits else Task.TEXT_TO_IMAGE
    if task is not None and task.makes_images:
        check_image_plan_options(args, task)
        # sized as the pipeline sizes an image: the defaults, then the nearest trained size (snap_image_size)
        request = build_request(args, ModelFacts(variant=args.variant, task=task), _placeholder_image(args, task))
    else:
        fps = args.fps if args.fps is not None else (args.variant.fps if args.variant else FPS)
        if fps < 1:
            raise UsageError(f"--fps must be >= 1, got {fps}")
        if args.seconds is not None:
            args.frames = frames_for_seconds(args.seconds, fps)
        # the plan is the text-to-video one: an image-to-video model's image encode (one frame) is far below its
        # peaks
        request = build_request(args, ModelFacts(variant=args.variant, nabla=nabla), None)
    if configs is None:
        configs = pipeline_configs(args.model, args.variant, checkpoint)
    dtype = getattr(torch, PLAN_DEFAULT_DTYPE if args.dtype == "auto" else args.dtype)
    try:
        plan = plan_memory(configs, plan_inputs(args, request, dtype))
    except ValueError as err:
        raise UsageError(str(err)) from err
    print("\n".join(format_plan(plan, args.model)))
    free, source = _free_memory(args)
    if free is None:
        print("no GPU here: pass --free-gib to see which mode a GPU with that much free memory gets")
        return 0
    print(f"free GPU memory: {format_gib(free)} ({source}): {choose_mode(plan, free).reason}")
    return 0


def check_image_plan_options(args, task) -> None:
    """An image model's plan takes no video length: ``--frames``, ``--seconds`` and ``--fps`` refused in one line,
    as ``generate`` refuses them."""
    from kandinsky5.cli.main import VIDEO_ONLY_OPTIONS, UsageError, model_kind

    given = [flag for name, flag in VIDEO_ONLY_OPTIONS.items() if getattr(args, name, None) not in (None, False)]
    if given:
        verb = "is a video option" if len(given) == 1 else "are video options"
        raise UsageError(f"{' and '.join(given)} {verb}; {model_kind(args.model, task)}: it makes still images")


def _placeholder_image(args, task):
    """The editing model's source image as the plan assumes it: of the output size (the default one when neither
    ``--height`` nor ``--width`` is given), so that Qwen's vision tower sees it at half that size. ``None`` for
    text-to-image."""
    if not task.takes_image:
        return None
    from PIL import Image

    from kandinsky5.variants import generation_defaults

    defaults = generation_defaults(args.variant, task)
    return Image.new("RGB", (defaults.width, defaults.height))


def _free_memory(args) -> tuple[int | None, str]:
    import torch

    from kandinsky5.runtime.memory_plan import GIB

    if args.free_gib is not None:
        return int(args.free_gib * GIB), "--free-gib"
    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
        return free_gpu_bytes(device), str(device)
    return None, ""


def format_plan(plan: MemoryPlan, model: str) -> list[str]:
    """The plan as printed: what it is for, the weights, the activations, then per mode and phase the GPU's
    weights, activations and peak, and the host memory (pinned part in block mode)."""
    from kandinsky5.runtime.memory_plan import Phase, format_gib

    i = plan.inputs
    images, edits = plan.configs.makes_images, plan.configs.edits
    auto = "auto" if plan.auto_tiles else "auto (the image VAE tiles only with --vae-tiling on)"
    tiling = {None: auto, True: "on", False: "off"}[i.vae_tiling]
    guidance = ("batched" if i.batched_guidance else "two calls per step") if i.guidance else "off"
    quantized = [f"transformer {i.quantize_transformer}"] if i.quantize_transformer else []
    quantized += [f"text encoder {i.quantize_text_encoder}"] if i.quantize_text_encoder else []
    if images:
        what = "image editing" if edits else "text-to-image"
        size = f"{i.width}x{i.height} {what}: {plan.sampling.tokens:,} visual tokens per image"
    else:
        size = f"{i.width}x{i.height}, {i.num_frames} frames: {plan.sampling.tokens:,} visual tokens per video"
    text = f"text encoding {format_gib(max(plan.text.values()))}"
    if plan.vision:
        text += f" (Qwen's vision tower on the source image at half size: {format_gib(plan.vision)})"
    decoding = f"decoding {format_gib(plan.decode)}"
    if plan.encode:
        decoding += f" (the source image's encode: {format_gib(plan.encode)})"
    lines = [
        f"memory plan of {model} ({plan.configs.source})",
        f"{size}; batch {i.batch}; guidance {guidance}; {str(i.dtype).removeprefix('torch.')}"
        + (f"; quantized: {', '.join(quantized)}" if quantized else "")
        + f"; VAE tiling {tiling}",
        "weights (parameters): "
        + ", ".join(f"{w.label} {format_gib(w.bytes)} ({w.parameters / 1e9:.3f} B)" for w in plan.weights),
        f"activations: {text}, sampling {format_gib(plan.sampling.peak)}"
        f" (feed-forward hidden {format_gib(plan.sampling.hidden)}), {decoding}",
        "",
    ]
    rows = [("mode", "phase", "GPU weights", "activations", "GPU peak", "host", "pinned")]
    tiled = plan.replace(vae_tiling=True) if i.vae_tiling is None and plan.auto_tiles else None
    for mode_plan in plan.modes:
        phases = list(mode_plan.phases)
        if tiled is not None:
            phases.append(tiled.mode(mode_plan.mode).phase(Phase.DECODING))
        for n, phase in enumerate(phases):
            label = f"{phase.phase}" + (" (tiled)" if n == len(mode_plan.phases) else "")
            rows.append(
                (
                    mode_plan.mode.value if n == 0 else "",
                    label,
                    format_gib(phase.gpu_weights),
                    format_gib(phase.gpu_activations),
                    format_gib(phase.gpu),
                    format_gib(phase.host),
                    format_gib(phase.host_pinned) if phase.host_pinned else "-",
                )
            )
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    for row in rows:
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        cells += [cell.rjust(width) for cell, width in zip(row[2:], widths[2:], strict=True)]
        lines.append("  ".join(cells).rstrip())
    lines += [
        "",
        f"loading holds every weight in host memory before placing it: up to {format_gib(plan.weights_bytes)}; "
        "block mode keeps the streamed blocks pinned (page-locked)"
        + ("; block mode brings the editing model's vision tower to the GPU with Qwen" if edits else ""),
    ]
    if images:
        lines.append("image models: estimates from traces of our networks, not yet checked against a GPU measurement")
    return lines


# ---------------------------------------------------------------------------------------------------- --offload auto


def say(line: str) -> None:
    print(f"kandinsky5: {line}", file=sys.stderr, flush=True)


def resolve_generate_offload(args, request, device, dtype) -> None:
    """``generate``'s ``--offload`` made concrete before loading: ``auto`` becomes the mode :func:`choose_mode`
    picks for the device's free memory, said in one line on stderr (on a CPU device: ``none``, silently); and on a
    GPU, the feed-forward chunk the chosen mode needs (``args.ff_chunk_tokens``, ``None``: unchunked). The option as
    given stays in ``args.offload_asked`` (``decode``'s command line repeats it)."""
    from kandinsky5.runtime.memory_plan import MODE_OF_OFFLOAD, choose_mode, feed_forward_chunk_tokens

    args.offload_asked = args.offload
    args.ff_chunk_tokens = None
    if device.type != "cuda":
        if args.offload == "auto":
            args.offload = "none"
        return
    plan, why_not = _generate_plan(args, request, dtype)
    free = free_gpu_bytes(device)
    if plan is None or free is None:
        if args.offload == "auto":
            args.offload = "none"
            say(f"offload: none (no memory plan: {why_not or 'the free GPU memory is unknown'})")
        return
    if args.offload == "auto":
        choice = choose_mode(plan, free)
        args.offload = choice.offload
        args.ff_chunk_tokens = choice.ff_chunk_tokens
        say(choice.reason)
        return
    args.ff_chunk_tokens = feed_forward_chunk_tokens(plan, free, MODE_OF_OFFLOAD[args.offload])
    if args.ff_chunk_tokens is not None:
        say(f"feed-forward in chunks of {args.ff_chunk_tokens} tokens (--offload {args.offload} is short of memory)")


def _generate_plan(args, request, dtype) -> tuple[MemoryPlan | None, str]:
    """The memory plan of ``generate``'s model and request, or ``None`` and why not. The plan only advises: a
    checkpoint whose configs it cannot read or build (a custom text encoder, say) is loaded without one."""
    from kandinsky5.cli.main import UsageError, one_line_message
    from kandinsky5.runtime.memory_plan import plan_memory

    checkpoint = Path(args.model).expanduser()
    try:
        configs = pipeline_configs(args.model, args.variant, checkpoint if checkpoint.is_dir() else None)
        return plan_memory(configs, plan_inputs(args, request, dtype)), ""
    except UsageError as err:
        return None, str(err)
    except Exception as err:  # advisory: never the reason a generation fails
        return None, f"{args.model}'s configs give no plan ({type(err).__name__}: {one_line_message(err)})"


def resolve_decode_offload(args, header, device, dtype) -> None:
    """``decode``'s ``--offload auto``: ``none`` unless the VAE with its decode (tiled when ``--vae-tiling`` allows)
    does not fit the GPU's free memory; then ``sequential`` (the VAE's weights layer by layer; model offload would
    still hold the whole VAE while decoding). One line on stderr on a GPU; ``none`` silently on a CPU."""
    args.offload_asked = args.offload
    if args.offload != "auto":
        return
    free = free_gpu_bytes(device) if device.type == "cuda" else None
    if free is None or getattr(args, "images", False):  # an image's decode: one small 2D VAE call
        args.offload = "none"
        return
    from kandinsky5.loading.diffusers_format import CONFIG_FILE, read_json
    from kandinsky5.runtime.memory_plan import Mode, decode_plan_bytes, fits, format_gib

    config = read_json(args.vae_folder / CONFIG_FILE)
    shape = tuple(header.shape)
    tiling = VAE_TILING_OF_OPTION[args.vae_tiling]
    weights, activations, layer = decode_plan_bytes(config, shape, dtype, tiled=tiling is True)
    if tiling is None and not fits(weights + activations, free):
        weights, activations, layer = decode_plan_bytes(config, shape, dtype, tiled=True)
    if fits(weights + activations, free):
        args.offload = "none"
        say(f"offload: none (the VAE and its decode need {format_gib(weights + activations)}; {format_gib(free)} free)")
        return
    args.offload = "sequential"
    fit = "" if fits(layer + activations, free) else " and may not fit either"
    say(
        f"offload: {Mode.SEQUENTIAL.offload} (the VAE and its decode need {format_gib(weights + activations)}, more "
        f"than {format_gib(free)} free allows; layer by layer needs {format_gib(layer + activations)}{fit})"
    )
