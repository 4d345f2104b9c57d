"""``kandinsky5 calibrate-cache``: measure a model's MagCache ratios on a prompt list and write the ratios file.

Every option, the prompts file and the output path are checked before the model is loaded (one-line errors, exit
status 2); the generations are exact (no cache) and sampled only (``output_type="latent"``, nothing decoded).
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path

RATIOS_SUFFIX = ".json"
PROMPT_COLUMN = "prompt"


def add_calibrate_parser(sub) -> None:
    from kandinsky5.cli.main import DTYPES

    cal = sub.add_parser(
        "calibrate-cache",
        help="measure a model's MagCache ratios (for generate --cache-ratios / MagCacheConfig.from_ratios_file)",
        description="Runs one exact generation per prompt, records the visual blocks' residual magnitude ratio of "
        "each step per guidance branch, averages them over the prompts and writes them as JSON.",
    )
    cal.add_argument(
        "--model", required=True, help="short name (see `kandinsky5 models`), hub id or local checkpoint directory"
    )
    cal.add_argument(
        "--prompts",
        required=True,
        help="a text file with one prompt per line, or a CSV file with a 'prompt' column (e.g. moviegen_bench.csv)",
    )
    cal.add_argument("--out", required=True, help="output .json path")
    cal.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    cal.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    cal.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's; 50)")
    cal.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    cal.add_argument("--height", type=int, default=None, help="pixels (default: the model's)")
    cal.add_argument("--width", type=int, default=None, help="pixels (default: the model's)")
    cal.add_argument("--frames", type=int, default=None, help="number of frames, 4k+1 (default: the model's)")
    cal.add_argument("--seed", type=int, default=0, help="prompt i is sampled from seed + i (default 0)")
    cal.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default auto)")
    cal.add_argument("--dtype", default="auto", choices=DTYPES, help="auto: bfloat16 on GPU, float32 on CPU")
    cal.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of a file: a CSV file's ``prompt`` column (a ``.csv`` file, or a first line that names that
    column), else one prompt per line; blank lines and surrounding whitespace dropped. ``ValueError`` when the file
    holds none."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"{path} is not a file" if path.exists() else f"{path} does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text") from err
    first = text.split("\n", 1)[0]
    header = next(csv.reader([first]), [])
    if path.suffix.lower() == ".csv" or (PROMPT_COLUMN in header and len(header) > 1):
        reader = csv.DictReader(io.StringIO(text))
        if PROMPT_COLUMN not in (reader.fieldnames or []):
            raise ValueError(f"{path}: a CSV file needs a '{PROMPT_COLUMN}' column")
        prompts = [(row.get(PROMPT_COLUMN) or "").strip() for row in reader]
    else:
        prompts = [line.strip() for line in text.splitlines()]
    prompts = [prompt for prompt in prompts if prompt]
    if not prompts:
        raise ValueError(f"{path} holds no prompt")
    return prompts


def _ratios_output(path: str, overwrite: bool) -> Path:
    """``--out`` checked: a ``.json`` file in an existing, writable folder, not an existing file unless
    ``overwrite``."""
    import os

    target = Path(path).expanduser().absolute()
    if target.suffix.lower() != RATIOS_SUFFIX:
        raise ValueError(f"--out {path!r} must end in {RATIOS_SUFFIX}")
    if target.is_dir():
        raise ValueError(f"--out {path!r} is a directory; give a file name ending in {RATIOS_SUFFIX}")
    if not target.parent.is_dir():
        raise ValueError(f"--out {path!r}: the folder {str(target.parent)!r} does not exist")
    if not os.access(target.parent, os.W_OK):
        raise ValueError(f"--out {path!r}: the folder {str(target.parent)!r} is not writable")
    if target.exists() and not overwrite:
        raise ValueError(f"{target} exists; pass --overwrite to replace it")
    return target


def _validate(args):
    """Every check that loads no model; returns the :class:`GenerationRequest` of the first prompt (defaults
    filled: steps, guidance, size) and sets ``args.prompt_list`` and ``args.out``."""
    from kandinsky5.cli.main import (
        MAX_SEED,
        TASK_NOUNS,
        UsageError,
        _model_facts,
        _resolve_model,
        _task_and_attention,
        build_request,
    )
    from kandinsky5.variants import Task

    if not 0 <= args.seed <= MAX_SEED:
        raise UsageError(f"--seed must be within 0..{MAX_SEED}, got {args.seed}")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be >= 1, got {args.limit}")
    try:
        prompts = read_prompts(args.prompts)
    except (ValueError, OSError) as err:
        raise UsageError(f"--prompts: {err}") from err
    args.prompt_list = prompts[: args.limit]
    try:
        args.out = _ratios_output(args.out, args.overwrite)
    except ValueError as err:
        raise UsageError(str(err)) from err
    if args.seed + len(args.prompt_list) - 1 > MAX_SEED:
        raise UsageError(f"--seed {args.seed} + {len(args.prompt_list)} prompts passes {MAX_SEED}")
    # the generate options these share, so the same request checks apply
    args.image = args.negative_prompt = args.seconds = None
    args.max_sequence_length = 512
    args.variant, checkpoint = _resolve_model(args)
    task, _ = _task_and_attention(args.variant, checkpoint)
    if task not in (None, Task.TEXT_TO_VIDEO):
        raise UsageError(f"--model: {args.model} is {TASK_NOUNS[task]}; calibrate-cache runs text-to-video only")
    facts = _model_facts(args, checkpoint)
    args.prompt = args.prompt_list[0]
    request = build_request(args, facts, None)
    if request.num_inference_steps < 2:
        raise UsageError(f"--steps: calibration needs at least 2 steps, got {request.num_inference_steps}")
    return request


def cmd_calibrate_cache(args) -> int:
    from kandinsky5.cli.main import _device_and_dtype, interrupted_during

    request = _validate(args)
    device, dtype = _device_and_dtype(args)

    import kandinsky5
    from kandinsky5.sampling.caches.calibration import calibrate, save_ratios

    start = time.perf_counter()
    with interrupted_during("loading the model"):
        pipe = kandinsky5.Kandinsky5T2VPipeline.from_pretrained(args.model, torch_dtype=dtype)
        pipe.to(device)
    pipe.set_progress_bar_config(disable=args.no_progress)
    load_s = time.perf_counter() - start
    steps = request.num_inference_steps
    settings = {
        "height": request.height,
        "width": request.width,
        "num_frames": request.num_frames,
        "guidance_scale": request.guidance_scale,
    }
    with interrupted_during("calibration"):
        ratios = calibrate(pipe, args.prompt_list, steps, seed=args.seed, **settings)
    metadata = {
        "model": str(args.model),
        "variant": args.variant.short_name if args.variant else None,
        **settings,
        "dtype": str(dtype).removeprefix("torch."),
        "seed": args.seed,
        "num_prompts": len(args.prompt_list),
        "prompts_file": str(Path(args.prompts).expanduser().absolute()),
    }
    save_ratios(args.out, ratios, metadata)
    branches = " and ".join(ratios)
    print(
        f"kandinsky5: {args.out}: MagCache ratios of {len(args.prompt_list)} prompt(s) at {steps} steps "
        f"({branches}); load {load_s:.1f} s, total {time.perf_counter() - start:.1f} s"
    )
    return 0
