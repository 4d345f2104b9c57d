"""Peak GPU memory of each phase and seconds per step of the whole T2V pipeline in each offload mode of ours, next to
diffusers' model offload, on the same random full-size weights; and one DiT forward in bf16 against FP8 weights.

    python benchmarks/memory.py --model lite                   # 512x768x121: resident, blocks, model, diffusers
    python benchmarks/memory.py --model pro --modes resident,blocks --warmup-steps 0    # 768x1280x121
    python benchmarks/memory.py --model lite --modes resident,blocks --quantize-transformer fp8
    python benchmarks/memory.py --model pro --modes none --fp8-forward                  # the FP8 forward alone
    python benchmarks/memory.py --smoke                         # tiny models on the CPU: checks the script

Modes (``--modes``, comma-separated, run in the order given; ``none`` for no pipeline rows):

- ``resident``: ``pipe.to("cuda")``, everything on the GPU;
- ``blocks``: ``pipe.enable_block_offload(blocks_on_gpu=1, prefetch=1)``: the DiT's blocks and Qwen's decoder layers
  stream from pinned host memory, the rest is model offload;
- ``model``: ``pipe.enable_model_cpu_offload()``, one whole network on the GPU at a time;
- ``sequential``: ``pipe.enable_sequential_cpu_offload()``, one layer's weights at a time (slow: not by default);
- ``diffusers``: diffusers' ``Kandinsky5T2VPipeline.enable_model_cpu_offload()`` on the very same tensors.

VAE tiling is on in every row (``vae.enable_tiling()``): the issue's targets are for the whole pipeline.
``--quantize-transformer fp8|int8`` calls ``pipe.quantize(transformer=...)`` on ours before any offloading (every row
of ours then runs the quantized DiT; diffusers' keeps bf16).

Per row: the peak allocated and reserved GPU memory of each phase (``torch.cuda.max_memory_allocated`` /
``max_memory_reserved``, reset when a phase's first network has arrived on the GPU, so that a phase's peak holds
what stays on the GPU from earlier phases but not the network that has just left), their maximum (the whole
pipeline's peak), each phase's seconds, seconds per step (the mean step after the first, as in pipeline.py: with
``--steps 2`` the first step warms up and the second is timed), the slowdown per step against ``resident``, and the
frames' relative L2 from the resident row (0 for ours: offloading changes no arithmetic). Where
``kandinsky5.runtime.memory_plan`` is importable, each row carries the plan's estimate (``estimated_peak_gib``,
``kandinsky5 plan``'s figure) beside the measurement. Each row first runs ``--warmup-steps`` steps untimed, without
decoding.

``--fp8-forward``: one DiT forward (``--model``, at the run's size) in bf16 and after
``quantize_transformer(model, "fp8")``: seconds, speed-up, relative L2 of the output, and the speed-up the roofline
allows when only the linear layers run at twice the rate (attention is unchanged by FP8 weights).

Targets (printed beside the figures): Lite 512x768x121 whole pipeline <= 8 GiB in ``blocks`` mode, at <= 10 % slower
per step than ``resident``; Pro 768x1280x121 <= 24 GiB, at <= 15 % slower; FP8 Pro forward >= 1.3x faster with
relative L2 <= 3e-2. Writes ``benchmarks/results/memory-<model>-<HxWxF>-<steps>steps-<modes>[-<quant>][-fp8forward]
.json``, rewritten after each row (a run cut short keeps the rows it finished).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from forward import TEXT_TOKENS, build_models  # noqa: E402
from pipeline import (  # noqa: E402
    build_pipelines,
    build_shared_components,
    generation_arguments,
    run_pipeline,
)

MODES = ("resident", "blocks", "model", "sequential", "diffusers")
DEFAULT_MODES = ("resident", "blocks", "model", "diffusers")
LABELS = {
    "resident": "resident",
    "blocks": "blocks",
    "model": "model",
    "sequential": "sequential",
    "diffusers": "diffusers model",
}
SIZES = {"lite": (512, 768, 121), "pro": (768, 1280, 121)}
TEXT, SAMPLING, DECODING = "text encoding", "sampling", "decoding"
PHASES = (TEXT, SAMPLING, DECODING)
# The networks each phase runs (the pipeline attribute names; both pipelines use the same).
COMPONENT_PHASES = {"text_encoder": TEXT, "text_encoder_2": TEXT, "transformer": SAMPLING, "vae": DECODING}
BLOCK_SETTINGS = dict(blocks_on_gpu=1, prefetch=1)


@dataclass(frozen=True)
class Target:
    size: tuple[int, int, int]
    peak_gib: float
    slowdown: float  # seconds per step in blocks mode / resident's, at most


TARGETS = {"lite": Target((512, 768, 121), 8.0, 1.10), "pro": Target((768, 1280, 121), 24.0, 1.15)}
FP8_SPEEDUP_TARGET = 1.3
FP8_RELATIVE_L2_TARGET = 3e-2


# ---------------------------------------------------------------------------------------------- phases


class PhaseMeter:
    """Per phase of one pipeline call: peak allocated and reserved GPU memory, and seconds.

    A phase begins when one of its networks is first called (a forward pre-hook put ahead of every other hook on the
    network and its direct children, and a wrapper of ``vae.decode``): the previous phase's peaks are read there. The
    peak counters are reset when the phase's network has arrived, at the first forward of one of its direct children
    (a hook after the offload hooks; diffusers' accelerate hooks move a network inside its ``forward`` / ``decode``,
    before any child runs): the network that has just left is not counted, what stays on the GPU is (at the reset
    the peak is what is allocated then)."""

    def __init__(self, pipe, device: torch.device):
        self.device = device
        self.vae = pipe.vae
        self.current: str | None = None
        self.settled = True
        self.started_at = 0.0
        self.phases: dict[str, dict] = {}
        self.order: list[str] = []
        self.handles = []
        for name, phase in COMPONENT_PHASES.items():
            network = getattr(pipe, name)
            for module in (network, *network.children()):
                self.handles.append(module.register_forward_pre_hook(partial(self._enter, phase), prepend=True))
            for module in network.children():
                self.handles.append(module.register_forward_pre_hook(self._settle))
        decode = pipe.vae.decode

        def decode_in_phase(*args, **kwargs):
            self._enter(DECODING)
            return decode(*args, **kwargs)

        pipe.vae.decode = decode_in_phase

    def start(self) -> None:
        """The call begins: text encoding (its first network arrives before anything else is on the GPU)."""
        common.synchronize(self.device)
        common.reset_peak_memory(self.device)
        self.current, self.settled, self.started_at = TEXT, True, time.perf_counter()
        self.order.append(TEXT)

    def finish(self) -> dict[str, dict]:
        self._close()
        self.current = None
        return self.phases

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.vae.__dict__.pop("decode", None)

    def _enter(self, phase: str, *_hook_args) -> None:
        if self.current is None or phase == self.current:
            return
        self._close()
        self.current, self.settled, self.started_at = phase, False, time.perf_counter()
        self.order.append(phase)

    def _settle(self, *_hook_args) -> None:
        if self.current is not None and not self.settled:
            common.reset_peak_memory(self.device)
            self.settled = True

    def _close(self) -> None:
        common.synchronize(self.device)
        seconds = time.perf_counter() - self.started_at
        measured = {
            "peak_allocated_gib": common.peak_memory_gib(self.device),
            "peak_reserved_gib": common.peak_reserved_gib(self.device),
            "seconds": seconds,
        }
        previous = self.phases.get(self.current)
        if previous is None:
            self.phases[self.current] = measured
        else:  # a phase entered again (not in a T2V call): its worst, and its time in all
            for key in ("peak_allocated_gib", "peak_reserved_gib"):
                if measured[key] is not None:
                    previous[key] = max(previous[key], measured[key])
            previous["seconds"] += seconds


# ---------------------------------------------------------------------------------------------- modes


def enable(pipe, mode: str, device: torch.device) -> None:
    if mode == "resident":
        pipe.to(device)
    elif mode == "blocks":
        pipe.enable_block_offload(**BLOCK_SETTINGS, device=device)
    elif mode == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:  # ours' "model" and diffusers'
        pipe.enable_model_cpu_offload(device=device)


def park(pipes: dict, quantized: bool, device: torch.device) -> None:
    """Hooks off, every network on the host, in one copy: ours' DiT and VAE are pointed back at the very tensors
    diffusers' hold (a move to the GPU and back, or block mode's pinning, made copies of their own), except a
    quantized DiT of ours, which has weights of its own. The text encoders are the same modules in both."""
    ours, reference = pipes["kandinsky5"], pipes["diffusers"]
    reference.remove_all_hooks()
    ours.remove_all_hooks()
    for name in ("transformer", "vae"):
        getattr(reference, name).to("cpu")
        if not (name == "transformer" and quantized):
            getattr(ours, name).load_state_dict(getattr(reference, name).state_dict(), assign=True)
    networks = {id(m): m for pipe in pipes.values() for m in (pipe.text_encoder, pipe.text_encoder_2, pipe.transformer)}
    networks[id(ours.vae)] = ours.vae
    for network in networks.values():
        network.to("cpu")  # (buffers outside the state dicts too)
    common.release_memory(device)


def measure_mode(pipes: dict, mode: str, args, device: torch.device, quantized: bool) -> tuple[dict, object]:
    """One row: enable ``mode``, warm up, run the timed generation with the phase meter; park everything again."""
    pipe = pipes["diffusers" if mode == "diffusers" else "kandinsky5"]
    row = {"mode": mode, "pipeline": "diffusers" if mode == "diffusers" else "kandinsky5"}
    if mode == "blocks":
        row["block_settings"] = dict(BLOCK_SETTINGS)
    if mode != "diffusers" and quantized:
        row["quantize_transformer"] = args.quantize_transformer
    common.release_memory(device)
    row["allocated_before_gib"] = common.allocated_gib(device)
    try:
        started = time.perf_counter()
        enable(pipe, mode, device)
        common.synchronize(device)
        row["setup_seconds"] = time.perf_counter() - started
        row["allocated_after_setup_gib"] = common.allocated_gib(device)
        if args.warmup_steps:
            # untimed: kernel selection, allocator growth, lazy initialisation; no decode (the decode's memory and
            # time are the timed run's)
            warmup = argparse.Namespace(**{**vars(args), "steps": args.warmup_steps})
            started = time.perf_counter()
            pipe(**generation_arguments(warmup), output_type="latent")
            common.synchronize(device)
            row["warmup_seconds"] = time.perf_counter() - started
        meter = PhaseMeter(pipe, device)
        try:
            meter.start()
            with tempfile.TemporaryDirectory() as tmp:
                timed, frames = run_pipeline(pipe, args, device, Path(tmp), mode, export=False)
            phases = meter.finish()
        finally:
            meter.remove()
    finally:
        park(pipes, quantized, device)
    timed.pop("peak_memory_gib", None)  # the last phase's only (the meter resets per phase); the phases say it all
    for key in ("mp4", "mp4_seconds", "decode_and_export_seconds"):
        timed.pop(key, None)
    row.update(timed)
    row["phases"] = {phase: phases.get(phase) for phase in PHASES}
    row["phase_order"] = meter.order
    for key in ("peak_allocated_gib", "peak_reserved_gib"):
        values = [p[key] for p in phases.values() if p.get(key) is not None]
        row[key] = max(values) if values else None
    return row, frames


# ---------------------------------------------------------------------------------------------- the plan's estimate


def plan_estimates(pipe, args, dtype: torch.dtype, quantize: str | None) -> dict | None:
    """``kandinsky5 plan``'s per-mode, per-phase GPU estimate (GiB) for this run's networks and size, or None where
    ``kandinsky5.runtime.memory_plan`` is missing or fails (its failure costs the estimate only)."""
    try:
        from kandinsky5.runtime import memory_plan as plan_module
    except ImportError:
        return None
    try:
        configs = plan_module.PipelineConfigs(
            transformer=pipe.transformer.config.to_dict(),
            vae=pipe.vae.config.to_dict(),
            text_encoder=pipe.text_encoder.config.to_dict(),
            text_encoder_2=pipe.text_encoder_2.config.to_dict(),
            source="benchmarks/memory.py (the benchmark's networks)",
        )
        inputs = plan_module.PlanInputs(
            height=args.height,
            width=args.width,
            num_frames=args.frames,
            guidance=args.guidance > 1,
            dtype=dtype,
            quantize_transformer=quantize,
            vae_tiling=True,
            **BLOCK_SETTINGS,
        )
        plan = plan_module.plan_memory(configs, inputs)
        estimates = {}
        for mode in MODES[:4]:
            mode_plan = plan.mode(mode)
            estimates[mode] = {
                "peak_gib": mode_plan.peak_gpu / 2**30,
                "phases": {str(p.phase): p.gpu / 2**30 for p in mode_plan.phases},
            }
        return estimates
    except Exception as error:  # noqa: BLE001 (another engineer's module, still changing)
        print(f"note: no memory-plan estimate ({type(error).__name__}: {error})")
        return None


# ---------------------------------------------------------------------------------------------- the FP8 forward


def fp8_forward(name: str, args, device: torch.device) -> dict:
    """One DiT forward in bf16, then with ``quantize_transformer(model, "fp8")`` (same weights, same inputs)."""
    from kandinsky5.runtime.quantization import quantize_transformer

    dtype = torch.bfloat16  # FP8 quantizes bf16 weights (also in smoke runs)
    config = common.CONFIGS[name]
    model, reference = build_models(config, device, dtype)
    del reference  # ours holds the same tensors
    inputs = common.dit_inputs(config, args.height, args.width, args.frames, device, dtype, TEXT_TOKENS)
    tokens = common.visual_tokens(config, args.height, args.width, args.frames)
    flops = common.transformer_flops(config, tokens, TEXT_TOKENS)
    linear_s = flops["linear"] / (common.DENSE_MATMUL_TFLOPS * 1e12)
    attention_s = common.roofline_seconds(config, flops) - linear_s

    def forward():
        with torch.no_grad():
            return model(*inputs).sample

    def measure() -> tuple[dict, torch.Tensor]:
        common.release_memory(device)
        common.reset_peak_memory(device)
        common.synchronize(device)
        started = time.perf_counter()
        forward()  # the first call: kernel selection (and the FP8 path's)
        common.synchronize(device)
        first = time.perf_counter() - started
        seconds, output = common.timed(forward, device, args.repeats, warmup=0)
        return {
            "seconds_per_forward": seconds,
            "first_call_seconds": first,
            "peak_memory_gib": common.peak_memory_gib(device),
        }, output

    with common.smoke_stance(args.smoke):
        bf16, exact = measure()
        exact = exact.float().cpu()
        quantize_transformer(model, "fp8")
        fp8, approximate = measure()
    return {
        "model": name,
        "size": {"height": args.height, "width": args.width, "frames": args.frames, "visual_tokens": tokens},
        "dtype": str(dtype),
        "repeats": args.repeats,
        "bf16": bf16,
        "fp8": fp8,
        "speedup": bf16["seconds_per_forward"] / fp8["seconds_per_forward"],
        "relative_l2": common.relative_l2(approximate, exact),
        # the roofline's bf16 forward over one whose linear layers run at twice the rate (FP8 units); attention
        # keeps its time, so this bounds what FP8 weights can gain at this size
        "roofline_speedup_bound": (linear_s + attention_s) / (linear_s / 2 + attention_s),
        "roofline_attention_fraction": attention_s / (linear_s + attention_s),
    }


# ---------------------------------------------------------------------------------------------- targets and table


def check_targets(name: str, args, rows: dict, fp8: dict | None) -> dict:
    """Each target with the measured value and whether it is met (None: not measured in this run)."""
    checked = {}

    def check(key: str, value: float | None, limit: float, at_least: bool = False, note: str | None = None) -> None:
        met = None if value is None else (value >= limit if at_least else value <= limit)
        checked[key] = {"value": value, "limit": limit, "met": met, **({"note": note} if note else {})}

    target = TARGETS.get(name)
    if target is not None and "blocks" in rows:
        size, where = (args.height, args.width, args.frames), "x".join(map(str, target.size))
        note = None if size == target.size else f"measured at {'x'.join(map(str, size))}"
        blocks = rows["blocks"]
        check(
            f"{name} {where} blocks mode: whole-pipeline peak GiB <= {target.peak_gib:g}",
            blocks.get("peak_allocated_gib"),
            target.peak_gib,
            note=note,
        )
        check(
            f"{name} {where} blocks mode: s/step vs resident <= {target.slowdown:g}",
            blocks.get("slowdown_vs_resident"),
            target.slowdown,
            note=note,
        )
    if fp8 is not None:
        speedup, l2 = FP8_SPEEDUP_TARGET, FP8_RELATIVE_L2_TARGET
        check(f"{name} FP8 forward: speed-up >= {speedup:g}", fp8["speedup"], speedup, at_least=True)
        check(f"{name} FP8 forward: relative L2 <= {l2:g}", fp8["relative_l2"], l2)
    return checked


def print_table(result: dict) -> None:
    rows = result["results"]
    size = result["size"]
    print(
        f"{result['model']} T2V {size['height']}x{size['width']}x{size['frames']}, {result['steps']} steps "
        + (f"(+{result['warmup_steps']} warm-up)" if result["warmup_steps"] else "(no warm-up run)")
        + f", CFG {result['guidance_scale']}, {result['dtype']}, VAE tiling on"
        + (f", our transformer {result['quantize_transformer']}" if result["quantize_transformer"] else "")
    )
    if rows:
        print("peak allocated GiB per phase (plan's estimate in brackets where available); reserved: the whole call's")
        header = "".join(f" {phase:>16}" for phase in PHASES)
        print(f"{'mode':16}{header} {'peak':>14} {'reserved':>9} {'s/step':>8} {'vs resident':>11}")
    for label, row in rows.items():
        estimate = row.get("estimated_peak_gib") or {}
        cells = []
        for phase in PHASES:
            measured = common.cell(row["phases"].get(phase) or {}, "peak_allocated_gib", ".2f")
            planned = (estimate.get("phases") or {}).get(phase)
            cells.append(f"{measured}" + ("" if planned is None else f" ({planned:.1f})"))
        peak = common.cell(row, "peak_allocated_gib", ".2f")
        if estimate.get("peak_gib") is not None:
            peak += f" ({estimate['peak_gib']:.1f})"
        slowdown = row.get("slowdown_vs_resident")
        versus = "-" if slowdown is None else f"{(slowdown - 1) * 100:+.0f} %"
        print(
            f"{label:16}" + "".join(f" {c:>16}" for c in cells) + f" {peak:>14} "
            f"{common.cell(row, 'peak_reserved_gib', '.2f'):>9} {common.cell(row, 'seconds_per_step', '.3f'):>8} "
            f"{versus:>11}"
        )
    for label, row in rows.items():
        if row.get("frames_relative_l2_vs_resident") is not None:
            print(f"frames relative L2, {label} vs resident: {row['frames_relative_l2_vs_resident']:.1e}")
    fp8 = result.get("fp8_forward")
    if fp8:
        fsize = fp8["size"]
        print(
            f"{fp8['model']} DiT forward {fsize['height']}x{fsize['width']}x{fsize['frames']} "
            f"({fsize['visual_tokens']} tokens): bf16 {fp8['bf16']['seconds_per_forward']:.3f} s, "
            f"fp8 {fp8['fp8']['seconds_per_forward']:.3f} s: {fp8['speedup']:.2f}x (roofline bound "
            f"{fp8['roofline_speedup_bound']:.2f}x, attention {fp8['roofline_attention_fraction']:.0%} of it); "
            f"relative L2 {fp8['relative_l2']:.1e}"
        )
    for key, target in result["targets"].items():
        value = "-" if target["value"] is None else f"{target['value']:.3g}"
        verdict = {True: "met", False: "NOT met", None: "not measured"}[target["met"]]
        print(f"target {key}: {value} ({verdict})" + (f" [{target['note']}]" if target.get("note") else ""))


# ---------------------------------------------------------------------------------------------- the run


def parse_modes(parser, text: str) -> list[str]:
    if text.strip() == "none":
        return []
    modes = [m for m in text.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown or len(set(modes)) != len(modes):
        parser.error(f"--modes: {text!r}: choose distinct ones of {', '.join(MODES)}, or none")
    return modes


def run(argv=None, progress: common.Progress | None = None, save: bool = True) -> dict:
    """Measure, print the table and (unless ``save`` is false or in smoke mode) write the JSON after each row; return
    the result. ``progress`` receives the result so far after each row."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["lite", "pro"], default="lite")
    parser.add_argument("--height", type=int, default=None, help="default: Lite 512, Pro 768")
    parser.add_argument("--width", type=int, default=None, help="default: Lite 768, Pro 1280")
    parser.add_argument("--frames", type=int, default=None, help="default 121")
    parser.add_argument("--smoke", action="store_true", help="tiny models and sizes on the CPU; saves nothing")
    parser.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"of {', '.join(MODES)}; or none")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup-steps", type=int, default=1, help="untimed steps (no decode) before each row")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--quantize-transformer", choices=["fp8", "int8"], default=None)
    parser.add_argument("--fp8-forward", action="store_true", help="one DiT forward in bf16 vs FP8 weights")
    parser.add_argument("--repeats", type=int, default=2, help="timed forwards of --fp8-forward")
    args = parser.parse_args(argv)
    modes = parse_modes(parser, args.modes)
    name, device, dtype = common.choose_run(args, parser, height=32, width=32, frames=5, repeats=1)
    for key, default in zip(("height", "width", "frames"), SIZES[args.model], strict=True):
        if getattr(args, key) is None:
            setattr(args, key, default)
    if args.steps < 2:
        parser.error("--steps must be >= 2 (seconds per step is the mean step after the first)")
    rows: dict[str, dict] = {}
    result = {
        **common.environment(),
        "benchmark": "peak memory per phase and seconds per step by offload mode",
        "model": name,
        "size": {"height": args.height, "width": args.width, "frames": args.frames},
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "guidance_scale": args.guidance,
        "dtype": str(dtype),
        "vae_tiling": True,
        "quantize_transformer": args.quantize_transformer,
        "modes": modes,
        "memory": "peak_allocated_gib: torch.cuda.max_memory_allocated, reset when each phase's first network has "
        "arrived; peak_reserved_gib: max_memory_reserved likewise; estimated_peak_gib: kandinsky5.runtime."
        "memory_plan's figure for the same networks and size",
        "results": rows,
        "targets": {},
    }
    tag = f"memory-{name}-{args.height}x{args.width}x{args.frames}-{args.steps}steps-{'_'.join(modes) or 'none'}"
    tag += (f"-{args.quantize_transformer}" if args.quantize_transformer else "") + (
        "-fp8forward" if args.fp8_forward else ""
    )

    def row_done() -> None:
        resident = rows.get("resident", {}).get("seconds_per_step")
        for row in rows.values():
            if resident and row.get("seconds_per_step"):
                row["slowdown_vs_resident"] = row["seconds_per_step"] / resident
        result["targets"] = check_targets(name, args, rows, result.get("fp8_forward"))
        common.report(progress, result)
        if save:
            common.save_results(tag, result, args.smoke, quiet=True)

    if modes:
        components = build_shared_components(name, device, dtype)
        pipes = build_pipelines(components)
        del components
        for pipe in pipes.values():
            pipe.set_progress_bar_config(disable=True)
            pipe.vae.enable_tiling()
        quantized = args.quantize_transformer is not None
        if quantized:  # on the device it was built on, before any offloading
            pipes["kandinsky5"].quantize(transformer=args.quantize_transformer)
        estimates = plan_estimates(pipes["kandinsky5"], args, dtype, args.quantize_transformer)
        reference_estimates = estimates if not quantized else plan_estimates(pipes["kandinsky5"], args, dtype, None)
        park(pipes, quantized, device)
        resident_frames = None
        for mode in modes:
            print(f"== {LABELS[mode]}", flush=True)
            row, frames = measure_mode(pipes, mode, args, device, quantized)
            plan = reference_estimates if mode == "diffusers" else estimates
            row["estimated_peak_gib"] = (plan or {}).get("model" if mode == "diffusers" else mode)
            if mode == "resident":
                resident_frames = frames
            elif resident_frames is not None:
                row["frames_relative_l2_vs_resident"] = common.relative_l2(
                    torch.from_numpy(frames), torch.from_numpy(resident_frames)
                )
            rows[LABELS[mode]] = row
            del frames
            row_done()
        del pipes
        common.release_memory(device)
    if args.fp8_forward:
        print("== FP8 forward", flush=True)
        result["fp8_forward"] = fp8_forward(name, args, device)
        row_done()
    print_table(result)
    if save and not args.smoke:
        print(f"saved {common.RESULTS_DIR / tag}.json")
    return result


def main(argv=None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
