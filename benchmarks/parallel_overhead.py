"""The single-GPU overhead of the parallel code paths at degree 1: one DiT forward, plain and in a world of one.

    python benchmarks/parallel_overhead.py                  # Lite 512x768x121, bf16, on the GPU (NCCL)
    python benchmarks/parallel_overhead.py --repeats 10
    python benchmarks/parallel_overhead.py --smoke          # tiny model on the CPU (gloo): checks the script only

Acceptance (issue 14): a run with ``ulysses_degree`` 1 and ``cfg_degree`` 1 must cost under 1 % more than the
single-process path. Two transformers hold the very same random bf16 weights (float32 islands as from_pretrained
keeps them; the second is built on meta and assigned the first's tensors, so no second copy): the first is never
touched by parallel code (plain); the second belongs to a pipeline that joined a world of one
(``torch.distributed.init_process_group(NCCL on a GPU, gloo on the CPU, world_size=1, rank=0,
store=HashStore())``, then ``pipe.enable_parallelism(1, 1)``) and is called inside ``use_mesh(pipe._parallel)``, as
the pipeline's own call does. The two are timed alternately (plain first in odd rounds, parallel first in even
ones, so that a drift of the clocks falls on both), each forward synchronised and timed alone, after one untimed
first call each; the difference is the median's (``parallel / plain - 1``), with the minimum's beside it. Their
outputs must be equal bit for bit (the same kernels on the same tensors).

It also lists the parallel machinery installed at degree 1, expected empty: a Ulysses stage wrapper
(``pipe._parallel_handle``, any wrapper of the transformer's stages), forward hooks on any module (global ones
included), sharded (FSDP) blocks, a guidance mode other than the single process's (CFG-parallel), the text broadcast
and the shared VAE decode (both only when the world has more than one process).

Exit status 1 when the difference is 1 % or more or anything is installed (the JSON is written first); smoke runs
check only that nothing is installed and the outputs are equal (CPU timings say nothing). Writes
``benchmarks/results/parallel-overhead-<model>-<HxWxF>.json`` with the GPU name, torch version and date.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from kandinsky5 import Kandinsky5T2VPipeline  # noqa: E402
from kandinsky5.models.dit import Kandinsky5Transformer3DModel  # noqa: E402
from kandinsky5.runtime.parallel import use_mesh  # noqa: E402

TEXT_TOKENS = 128  # as forward.py: a typical templated prompt after the prefix crop
MODULATION_STD = 0.02
OVERHEAD_LIMIT = 0.01  # the acceptance: under 1 %
GUIDANCE_SCALE = 5.0  # the Lite default: guidance on, so a CFG-parallel mode would show


def build_model(config: dict, device: torch.device, dtype: torch.dtype) -> Kandinsky5Transformer3DModel:
    """Our DiT with random weights at ``dtype`` (built so directly: a large model never exists in float32), the
    float32 islands as from_pretrained keeps them, randomised (the modulation must not be an identity)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Kandinsky5Transformer3DModel.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if Kandinsky5Transformer3DModel.keeps_fp32(name):
                param.data = (MODULATION_STD * torch.randn(param.shape, generator=generator, device=device)).float()
    return model.eval().requires_grad_(False)


def twin_of(model: Kandinsky5Transformer3DModel) -> Kandinsky5Transformer3DModel:
    """A second module holding ``model``'s very tensors (built on meta, then assigned): no second copy."""
    with torch.device("meta"):
        twin = Kandinsky5Transformer3DModel.from_config(model.config)
    twin.load_state_dict(model.state_dict(), assign=True)
    return twin.eval().requires_grad_(False)


def pipeline_around(transformer: Kandinsky5Transformer3DModel) -> Kandinsky5T2VPipeline:
    """A pipeline holding only ``transformer`` (``enable_parallelism`` needs no other component)."""
    none = dict.fromkeys(("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler"))
    return Kandinsky5T2VPipeline(transformer=transformer, **none)


def join_world_of_one(device: torch.device) -> str:
    """The default process group of one process (no launcher: an in-memory store); returns the backend."""
    if dist.is_initialized():
        raise RuntimeError("a process group exists already: run this script alone, not under torchrun")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, world_size=1, rank=0, store=dist.HashStore())
    return backend


def installed_parallel_machinery(pipe) -> list[str]:
    """What the parallel code installed on ``pipe`` and its transformer, one line each (expected: none at
    degree 1)."""
    from kandinsky5.runtime.parallel.fsdp import is_sharded
    from kandinsky5.sampling.guidance import TwoCallGuidance, make_guidance

    found = []
    transformer, mesh = pipe.transformer, pipe._parallel
    if pipe._parallel_handle is not None:
        found.append("Ulysses stage wrapper (pipe._parallel_handle)")
    for stage, wrappers in transformer._stage_wrappers.items():
        found += [f"stage wrapper on {stage}: {type(w).__name__}" for w in wrappers.values()]
    for name, module in transformer.named_modules():
        for kind in ("_forward_pre_hooks", "_forward_hooks"):
            if getattr(module, kind, None):
                found.append(f"{kind.strip('_')[:-1]} on {name or 'the transformer'}")
    for kind in ("_global_forward_pre_hooks", "_global_forward_hooks"):
        if getattr(torch.nn.modules.module, kind, None):
            found.append(f"global {kind.strip('_')[7:-1]}")
    if is_sharded(transformer):
        found.append("sharded blocks (FSDP)")
    text = object()  # the guidance modes only hold the text at construction
    guidance = make_guidance(lambda *_: None, text, text, GUIDANCE_SCALE, 1, False, mesh)
    if type(guidance) is not TwoCallGuidance:
        found.append(f"guidance: {type(guidance).__name__} instead of TwoCallGuidance")
    if mesh is None:
        found.append("no mesh: enable_parallelism did not run")
    elif mesh.world_size > 1:
        found += ["text encoded on rank 0 and broadcast", "VAE decode tiles shared among the ranks"]
    return found


def run(argv=None, progress: common.Progress | None = None, save: bool = True) -> dict:
    """Measure, print the table and (unless ``save`` is false or in smoke mode) write the JSON; return the result
    (``result["passed"]``: the verdict)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_run_arguments(parser)
    parser.add_argument("--repeats", type=int, default=6, help="timed forwards of each kind (alternating)")
    args = parser.parse_args(argv)
    name, device, dtype = common.choose_run(args, parser, height=64, width=64, frames=5, repeats=2)
    config = common.CONFIGS[name]
    plain = build_model(config, device, dtype)
    twin = twin_of(plain)
    inputs = common.dit_inputs(config, args.height, args.width, args.frames, device, dtype, TEXT_TOKENS)
    tokens = common.visual_tokens(config, args.height, args.width, args.frames)

    backend = join_world_of_one(device)
    try:
        pipe = pipeline_around(twin)
        mesh = pipe.enable_parallelism(ulysses_degree=1, cfg_degree=1)
        machinery = installed_parallel_machinery(pipe)

        def forward_plain():
            return plain(*inputs).sample

        def forward_parallel():
            with use_mesh(pipe._parallel):  # as the pipeline's call does
                return pipe.transformer(*inputs).sample

        forwards = {"plain": forward_plain, "degree 1": forward_parallel}
        seconds: dict[str, list[float]] = {label: [] for label in forwards}
        first_call: dict[str, float] = {}
        outputs: dict[str, torch.Tensor] = {}

        def timed_once(label: str) -> float:
            common.synchronize(device)
            start = time.perf_counter()
            outputs[label] = forwards[label]()
            common.synchronize(device)
            return time.perf_counter() - start

        result = {
            **common.environment(),
            "benchmark": "parallel overhead at degree 1",
            "model": name,
            "size": {"height": args.height, "width": args.width, "frames": args.frames, "visual_tokens": tokens},
            "dtype": str(dtype),
            "backend": backend,
            "mesh": {"ulysses_degree": mesh.ulysses_degree, "cfg_degree": mesh.cfg_degree, "world": mesh.world_size},
            "repeats": args.repeats,
            "installed_at_degree_1": machinery,
            "limit": OVERHEAD_LIMIT,
            "seconds": seconds,
        }
        with torch.no_grad(), common.smoke_stance(args.smoke):
            for label in forwards:
                first_call[label] = timed_once(label)  # kernel selection
            for round_ in range(args.repeats):
                order = list(forwards) if round_ % 2 == 0 else list(reversed(forwards))
                for label in order:
                    seconds[label].append(timed_once(label))
                common.report(progress, result)
        mesh_left = pipe._parallel is mesh
        pipe.disable_parallelism()
    finally:
        dist.destroy_process_group()

    median = {label: statistics.median(values) for label, values in seconds.items()}
    fastest = {label: min(values) for label, values in seconds.items()}
    overhead = median["degree 1"] / median["plain"] - 1
    equal = torch.equal(outputs["plain"], outputs["degree 1"])
    passed = not machinery and equal and mesh_left and (args.smoke or overhead < OVERHEAD_LIMIT)
    result.update(
        first_call_seconds=first_call,
        median_seconds=median,
        min_seconds=fastest,
        relative_overhead=overhead,
        relative_overhead_of_min=fastest["degree 1"] / fastest["plain"] - 1,
        outputs_equal=equal,
        passed=passed,
    )
    common.report(progress, result)

    print(f"{name} forward {args.height}x{args.width}x{args.frames} ({tokens} tokens), {dtype}, {backend} world of 1")
    print(f"{'':10} {'median s':>10} {'min s':>10} {'1st call s':>10}")
    for label in forwards:
        print(f"{label:10} {median[label]:10.4f} {fastest[label]:10.4f} {first_call[label]:10.3f}")
    print(
        f"overhead at degree 1: {overhead:+.2%} of the median ({result['relative_overhead_of_min']:+.2%} of the "
        f"minimum), limit {OVERHEAD_LIMIT:.0%}" + (" (smoke: not judged)" if args.smoke else "")
    )
    print(f"installed at degree 1: {', '.join(machinery) or 'none'}; outputs equal bit for bit: {equal}")
    print("PASS" if passed else "FAIL")
    if save:
        common.save_results(f"parallel-overhead-{name}-{args.height}x{args.width}x{args.frames}", result, args.smoke)
    return result


def main(argv=None) -> int:
    return 0 if run(argv)["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
