"""One DiT forward, ours next to diffusers', on the same random weights in one process.

    python benchmarks/forward.py --model lite              # 512x768x121, bf16, on the GPU
    python benchmarks/forward.py --model pro --repeats 2 --variants eager,fused
    python benchmarks/forward.py --smoke                   # tiny model on the CPU: checks the script only

The weights are created once (bf16, float32 islands as from_pretrained keeps them) and the same tensors are
assigned into both models, so the only difference is the code. Our model runs in each of ``--variants``:

- ``eager``: the model as loaded;
- ``fused``: ``fuse_qkv_projections()`` (one GEMM for query, key and value);
- ``compiled``: ``transformer.compile()`` (regional: the norm-modulate, RoPE and gate-residual float32 math fused
  into a few kernels); its first call, compilation included, is reported apart;
- ``fused+compiled``: both.

``--smoke`` runs every variant on a tiny model on the CPU, compiled ones eagerly (``common.smoke_stance``).

Each speed-up is kept as a default only where this table shows it. Prints a table and writes
``benchmarks/results/forward-<model>-<HxWxF>.json`` with the GPU name, torch version and date.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from kandinsky5.models.dit import Kandinsky5Transformer3DModel  # noqa: E402

VARIANTS = ("eager", "fused", "compiled", "fused+compiled")
VAE_SPATIAL = 8
VAE_TEMPORAL = 4
TEXT_TOKENS = 128  # a typical templated prompt after the prefix crop
MODULATION_STD = 0.02


def build_models(config: dict, device: torch.device, dtype: torch.dtype):
    """diffusers' model with random weights, and ours holding the very same tensors (no second copy)."""
    from diffusers import Kandinsky5Transformer3DModel as Reference

    # Built at its final dtype directly, so a 19B model never exists in float32.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            reference = Reference(**config)
    finally:
        torch.set_default_dtype(previous)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if Kandinsky5Transformer3DModel.keeps_fp32(name):
                # float32 islands, as from_pretrained keeps them; random modulation (the reference zeroes it,
                # which would make every block an identity and the comparison empty)
                param.data = (MODULATION_STD * torch.randn(param.shape, generator=generator, device=device)).float()
    with torch.device("meta"):
        ours = Kandinsky5Transformer3DModel.from_config(config)
    ours.load_state_dict(reference.state_dict(), assign=True)
    return ours.eval().requires_grad_(False), reference.eval().requires_grad_(False)


def fused_copy(model: Kandinsky5Transformer3DModel) -> Kandinsky5Transformer3DModel:
    """A second model with ``model``'s tensors, its attention projections fused (built on meta, then assigned)."""
    with torch.device("meta"):
        fused = Kandinsky5Transformer3DModel.from_config(model.config)
    fused.fuse_qkv_projections()
    fused.load_state_dict(model.state_dict(), assign=True)
    return fused.eval().requires_grad_(False)


def run(argv=None, progress: common.Progress | None = None, save: bool = True) -> dict:
    """Measure, print the table and (unless ``save`` is false or in smoke mode) write the JSON; return the result.
    ``progress`` receives the result so far after each row."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_run_arguments(parser)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)} (default all)"
    )
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    name, device, dtype = common.choose_run(args, parser, height=64, width=64, frames=5, repeats=1)
    config = common.CONFIGS[name]
    ours, reference = build_models(config, device, dtype)

    gen = torch.Generator(device="cpu").manual_seed(0)
    t = (args.frames - 1) // VAE_TEMPORAL + 1
    h, w = args.height // VAE_SPATIAL, args.width // VAE_SPATIAL
    channels = ours.config.visual_input_dim
    x = torch.randn(1, t, h, w, channels, generator=gen).to(device, dtype)
    text = torch.randn(1, TEXT_TOKENS, config["in_text_dim"], generator=gen).to(device, dtype)
    pooled = torch.randn(1, config["in_text_dim2"], generator=gen).to(device, dtype)
    timestep = torch.tensor([950.0], device=device).to(dtype)
    rope_pos = [torch.arange(n, device=device) for n in (t, h // 2, w // 2)]
    text_pos = torch.arange(TEXT_TOKENS, device=device)
    scale = (1, 2, 2)
    visual_tokens = t * (h // 2) * (w // 2)
    flops = common.transformer_flops(config, visual_tokens, TEXT_TOKENS)
    roofline = common.roofline_seconds(config, flops)

    def forward(model):
        with torch.no_grad():
            return model(x, text, timestep, pooled, rope_pos, text_pos, scale).sample

    rows, outputs = {}, {}
    result = {
        **common.environment(),
        "benchmark": "transformer forward",
        "model": name,
        "size": {"height": args.height, "width": args.width, "frames": args.frames, "visual_tokens": visual_tokens},
        "dtype": str(dtype),
        "repeats": args.repeats,
        "variants": variants,
        "flops": flops,
        "roofline_seconds": roofline,
        "results": rows,
    }

    def measure(label, model):
        common.reset_peak_memory(device)
        common.synchronize(device)
        start = time.perf_counter()
        forward(model)  # the first call: kernel selection, and compilation for compiled variants
        common.synchronize(device)
        first_call = time.perf_counter() - start
        seconds, outputs[label] = common.timed(lambda: forward(model), device, args.repeats, warmup=0)
        row = rows[label] = {
            "seconds_per_forward": seconds,
            "first_call_seconds": first_call,
            "peak_memory_gib": common.peak_memory_gib(device),
            "roofline_fraction": roofline / seconds,
        }
        if label != "diffusers":
            row["speedup_vs_diffusers"] = rows["diffusers"]["seconds_per_forward"] / seconds
            row["relative_l2_vs_diffusers"] = common.relative_l2(outputs[label], outputs["diffusers"])
        common.report(progress, result)

    with common.smoke_stance(args.smoke):
        measure("diffusers", reference)
        del reference  # ours holds the same tensors; the reference's modules are no longer needed
        # ``fused`` needs a model of its own (new concatenated tensors); ``compiled`` compiles in place, so eager
        # runs come first.
        ours_fused = fused_copy(ours) if any(v.startswith("fused") for v in variants) else None
        for variant in variants:
            if variant == "eager":
                measure("kandinsky5 eager", ours)
            elif variant == "fused":
                measure("kandinsky5 fused", ours_fused)
        for variant in variants:
            if variant == "compiled":
                measure("kandinsky5 compiled", ours.compile())
            elif variant == "fused+compiled":
                measure("kandinsky5 fused+compiled", ours_fused.compile())
    print(f"{name} forward {args.height}x{args.width}x{args.frames} ({visual_tokens} tokens), {dtype}")
    print(f"{'':26} {'s/forward':>10} {'1st call s':>10} {'peak GiB':>9} {'roofline':>9} {'speed-up':>9} {'rel L2':>9}")
    for label, row in rows.items():
        peak = common.cell(row, "peak_memory_gib", ".1f")
        speedup = common.cell(row, "speedup_vs_diffusers", ".2f", "x")
        l2 = common.cell(row, "relative_l2_vs_diffusers", ".1e")
        print(
            f"{label:26} {row['seconds_per_forward']:10.3f} {row['first_call_seconds']:10.2f} {peak:>9} "
            f"{row['roofline_fraction']:9.2f} {speedup:>9} {l2:>9}"
        )
    if save:
        common.save_results(f"forward-{name}-{args.height}x{args.width}x{args.frames}", result, args.smoke)
    return result


def main(argv=None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
