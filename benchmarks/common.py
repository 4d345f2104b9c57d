"""Shared helpers of the benchmark scripts: model configs, timing, environment facts and JSON results."""

from __future__ import annotations

import contextlib
import datetime
import gc
import importlib.metadata
import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from kandinsky5 import tiny

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Transformer configs of the official checkpoints (Pro: shared/reference/checkpoint-pro-5s/transformer/config.json;
# Lite: the published Lite config). Benchmarks run them dense unless asked otherwise.
LITE = dict(
    in_visual_dim=16,
    out_visual_dim=16,
    in_text_dim=3584,
    in_text_dim2=768,
    time_dim=512,
    patch_size=(1, 2, 2),
    model_dim=1792,
    ff_dim=7168,
    num_text_blocks=2,
    num_visual_blocks=32,
    axes_dims=(16, 24, 24),
    visual_cond=True,
)
PRO = dict(
    in_visual_dim=16,
    out_visual_dim=16,
    in_text_dim=3584,
    in_text_dim2=768,
    time_dim=1024,
    patch_size=(1, 2, 2),
    model_dim=4096,
    ff_dim=16384,
    num_text_blocks=4,
    num_visual_blocks=60,
    axes_dims=(32, 48, 48),
    visual_cond=True,
)
# A tiny config for --smoke runs on a CPU (checks the script, measures nothing worth reporting).
SMOKE = dict(tiny.TINY_TRANSFORMER.to_dict(), in_text_dim=64)
CONFIGS = {"lite": LITE, "pro": PRO, "smoke": SMOKE}

# The VAE's compression (HunyuanVideo: 8x in space, 4x in time).
VAE_SPATIAL = 8
VAE_TEMPORAL = 4

# Measured ceilings on an H100 (shared/reference/README.md), for the roofline fraction.
DENSE_MATMUL_TFLOPS = 740.0
ATTENTION_TFLOPS = {64: 484.0, 128: 623.0}  # cuDNN, by head_dim


def transformer_flops(config: dict, visual_tokens: int, text_tokens: int) -> dict[str, float]:
    """FLOPs of one DiT forward: 2 per multiply-add of every linear layer, 4*Lq*Lk*d per attention."""
    d, ff = config["model_dim"], config["ff_dim"]
    blocks, text_blocks = config["num_visual_blocks"], config["num_text_blocks"]
    per_token_visual = 2 * (4 * d * d + 2 * d * d + 2 * d * ff)  # self qkvo, cross q + o, feed-forward
    cross_kv = 2 * text_tokens * 2 * d * d
    linear = blocks * (visual_tokens * per_token_visual + cross_kv)
    linear += text_blocks * text_tokens * 2 * (4 * d * d + 2 * d * ff)
    attention = blocks * (4 * visual_tokens * visual_tokens * d + 4 * visual_tokens * text_tokens * d)
    attention += text_blocks * 4 * text_tokens * text_tokens * d
    return {"linear": float(linear), "attention": float(attention)}


def roofline_seconds(config: dict, flops: dict[str, float]) -> float:
    head_dim = sum(config["axes_dims"])
    attention_rate = ATTENTION_TFLOPS.get(head_dim, ATTENTION_TFLOPS[64]) * 1e12
    return flops["linear"] / (DENSE_MATMUL_TFLOPS * 1e12) + flops["attention"] / attention_rate


def dit_inputs(
    config: dict, height: int, width: int, frames: int, device: torch.device, dtype: torch.dtype, text_tokens: int
) -> tuple:
    """Seeded random inputs of one DiT forward at a video size: ``model(*inputs).sample`` (forward.py's inputs:
    latents with the condition channels, ``text_tokens`` text embeddings, pooled text, timestep 950, RoPE positions,
    scale (1, 2, 2))."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    t, h, w = (frames - 1) // VAE_TEMPORAL + 1, height // VAE_SPATIAL, width // VAE_SPATIAL
    channels = 2 * config["in_visual_dim"] + 1 if config.get("visual_cond") else config["in_visual_dim"]
    x = torch.randn(1, t, h, w, channels, generator=gen).to(device, dtype)
    text = torch.randn(1, text_tokens, config["in_text_dim"], generator=gen).to(device, dtype)
    pooled = torch.randn(1, config["in_text_dim2"], generator=gen).to(device, dtype)
    timestep = torch.tensor([950.0], device=device).to(dtype)
    _, patch_h, patch_w = config["patch_size"]
    rope_pos = [torch.arange(n, device=device) for n in (t, h // patch_h, w // patch_w)]
    return x, text, timestep, pooled, rope_pos, torch.arange(text_tokens, device=device), (1, 2, 2)


def visual_tokens(config: dict, height: int, width: int, frames: int) -> int:
    _, patch_h, patch_w = config["patch_size"]
    latent_frames = (frames - 1) // VAE_TEMPORAL + 1
    return latent_frames * (height // (VAE_SPATIAL * patch_h)) * (width // (VAE_SPATIAL * patch_w))


def environment() -> dict:
    info = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
    }
    try:  # the version alone: importing diffusers costs seconds
        info["diffusers"] = importlib.metadata.version("diffusers")
    except importlib.metadata.PackageNotFoundError:
        pass
    return info


# Called with the result so far after each measured row, so that a run cut short (a time box) still leaves its
# finished rows behind (benchmarks/gpu_check.py writes them to JSON).
Progress = Callable[[dict], None]


def report(progress: Progress | None, result: dict) -> None:
    if progress is not None:
        progress(result)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int, warmup: int = 1) -> tuple[float, object]:
    """Mean seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs, and the last result."""
    result = None
    for _ in range(warmup):
        result = fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        result = fn()
    synchronize(device)
    return (time.perf_counter() - start) / max(repeats, 1), result


def peak_memory_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def peak_reserved_gib(device: torch.device) -> float | None:
    """The caching allocator's peak reserved memory (what the process held from the GPU) since the last reset."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_reserved(device) / 2**30


def allocated_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.memory_allocated(device) / 2**30


def release_memory(device: torch.device) -> None:
    """On a GPU, collect dropped tensors and hand the allocator's cached blocks back, so that the next measurement
    starts from what is really held (nothing to measure on a CPU, where a collection only costs time)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def save_results(name: str, payload: dict, smoke: bool, quiet: bool = False) -> Path | None:
    """Write ``benchmarks/results/<name>.json`` and say where unless ``quiet`` (smoke runs are printed only)."""
    if smoke:
        return None
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    if not quiet:
        print(f"saved {path}")
    return path


def cell(row: dict, key: str, spec: str, suffix: str = "") -> str:
    """``row[key]`` formatted with ``spec`` for a results table, or "-" where it is missing or None."""
    value = row.get(key)
    return "-" if value is None else f"{value:{spec}}{suffix}"


def add_run_arguments(parser, *, height: int = 512, width: int = 768, frames: int = 121) -> None:
    """The options every benchmark shares: model, size, and --smoke."""
    parser.add_argument("--model", choices=["lite", "pro"], default="lite")
    parser.add_argument("--height", type=int, default=height)
    parser.add_argument("--width", type=int, default=width)
    parser.add_argument("--frames", type=int, default=frames)
    parser.add_argument("--smoke", action="store_true", help="tiny models and sizes on the CPU; saves nothing")


def smoke_stance(smoke: bool):
    """In smoke runs, everything compiled runs eagerly (``torch.compiler.set_stance("force_eager")``): the script's
    logic is what a smoke run checks, and compiling on the CPU costs seconds (inductor's numbers are checked by
    tests/test_compile.py and tests/test_nabla.py)."""
    return torch.compiler.set_stance("force_eager") if smoke else contextlib.nullcontext()


def choose_run(args, parser, **smoke_overrides) -> tuple[str, torch.device, torch.dtype]:
    """(config name, device, dtype): the tiny model in float32 on the CPU with ``--smoke`` (``smoke_overrides``
    replace the options left at their defaults, so ``--smoke --steps 4`` keeps 4 steps), else the chosen model in
    bf16 on the GPU."""
    if args.smoke:
        for key, value in smoke_overrides.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
        return "smoke", torch.device("cpu"), torch.float32
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (use --smoke to check the script on a CPU)")
    return args.model, torch.device("cuda"), torch.bfloat16


# the text side of the smoke runs: tiny encoders of this width
SMOKE_TEXT_HIDDEN = 32


def build_text_components(reference_dir: Path, name: str, device: torch.device, dtype: torch.dtype) -> dict:
    """The real tokenizers and random-weight text encoders (``smoke``: tiny ones of width SMOKE_TEXT_HIDDEN;
    else Qwen2.5-VL-7B with its vision tower, and CLIP-L, from the official configs), each created once:
    ``tokenizer``, ``tokenizer_2``, ``text_encoder``, ``text_encoder_2``."""
    from transformers import (
        AutoTokenizer,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTokenizer,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
    )

    tokenizer = AutoTokenizer.from_pretrained(str(reference_dir / "tokenizers" / "qwen2_5_vl"))
    tokenizer_2 = CLIPTokenizer.from_pretrained(str(reference_dir / "tokenizers" / "clip_vit_large_patch14"))
    if name == "smoke":
        from kandinsky5.tiny_text import (
            build_tiny_clip_text_encoder,
            build_tiny_qwen_text_encoder,
            qwen_vision_token_ids,
        )

        vision_ids = qwen_vision_token_ids(tokenizer)
        text_encoder = build_tiny_qwen_text_encoder(
            len(tokenizer), hidden_size=SMOKE_TEXT_HIDDEN, vision_token_ids=vision_ids
        )
        text_encoder_2 = build_tiny_clip_text_encoder(len(tokenizer_2), hidden_size=SMOKE_TEXT_HIDDEN)
    else:
        checkpoint = reference_dir / "checkpoint-pro-5s"
        qwen_config = Qwen2_5_VLConfig.from_pretrained(str(checkpoint / "text_encoder"))
        clip_config = CLIPTextConfig.from_pretrained(str(checkpoint / "text_encoder_2"))
        with torch.device(device):
            text_encoder = Qwen2_5_VLForConditionalGeneration._from_config(qwen_config, dtype=dtype)
            text_encoder_2 = CLIPTextModel._from_config(clip_config, dtype=dtype)
    return dict(
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        text_encoder=text_encoder.to(device, dtype).eval().requires_grad_(False),
        text_encoder_2=text_encoder_2.to(device, dtype).eval().requires_grad_(False),
    )


@dataclass
class TimedCall:
    """A pipeline call's output and clock readings: its start, each denoising step's end, its end."""

    output: object
    start: float
    step_ends: list[float]
    end: float

    @property
    def seconds_per_step(self) -> float | None:
        """The mean step after the first (which also waits for the text encoders); ``None`` with one step."""
        steps = [b - a for a, b in zip(self.step_ends, self.step_ends[1:], strict=False)]
        return sum(steps) / len(steps) if steps else None


def timed_call(pipe, arguments: dict, device: torch.device) -> TimedCall:
    """``pipe(**arguments, output_type="np")`` timed end to end and per step (a step callback synchronizes the device
    and reads the clock), with the device's peak memory reset first."""
    step_ends: list[float] = []

    def on_step_end(_pipe, _i, _t, tensors):
        synchronize(device)
        step_ends.append(time.perf_counter())
        return tensors

    reset_peak_memory(device)
    synchronize(device)
    start = time.perf_counter()
    output = pipe(**arguments, output_type="np", callback_on_step_end=on_step_end)
    synchronize(device)
    return TimedCall(output, start, step_ends, time.perf_counter())
