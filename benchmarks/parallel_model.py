"""A written model of multi-GPU generation: communication per denoising step against compute, and the scaling it
predicts on 2, 4 and 8 H100s over NVLink, for Lite and Pro at 5 s and 10 s. Arithmetic only: no GPU, no model.

    python benchmarks/parallel_model.py                          # the table, and results/parallel_model.json
    python benchmarks/parallel_model.py --all-to-all-efficiency 0.4 --attention-density 0.25

Per denoising step with guidance (two DiT calls: condition and negative prompt), on N = U x C GPUs (Ulysses degree
U, CFG degree C in {1, 2}), per rank, bf16 activations and weights:

- Compute (benchmarks/common.py's FLOP model, at the H100 ceilings of shared/reference/README.md: dense matmul 740
  TFLOP/s, cuDNN attention 484 TFLOP/s at head_dim 64 (Lite), 623 at 128 (Pro)). Each rank makes 2 / C calls. In a
  call Ulysses divides the visual tokens' linear layers by U (each rank holds L / U tokens) and the visual
  self-attention by U (each rank attends over all L tokens for heads / U heads); the text blocks and the
  cross-attention's key/value projections of the text run whole on every rank.
- Ulysses: per visual block, four all-to-alls: q, k, v from sequence shards to head shards, the output back. Each
  rank holds an (L / U) x d tensor of each and sends (U - 1) / U of it:
  ``4 x (L / U) x d x 2 bytes x (U - 1) / U`` sent (and as much received) per block per rank. (Written with the
  rank's own token count L_rank = L / U: ``4 x L_rank x d x bytes x (U - 1) / U``.) Once per call, the stage's output
  is all-gathered: ``L x d x 2 x (U - 1) / U`` received per rank. Nothing overlaps them (the attention waits).
- CFG: once per step the two ranks of a pair exchange their branch's velocity (latent-sized,
  ``T x H/8 x W/8 x 16 x 2`` bytes).
- Sharded weights (FSDP over all N ranks): before each block's forward its weights are all-gathered,
  ``block bytes x (N - 1) / N`` received per rank per block per call; with prefetching the gather of block i + 1
  runs during block i, so only the first block's gather and any excess of a gather over a block's compute is
  exposed.

Link: NVLink 4 on H100 SXM, 18 links x 25 GB/s = ``NVLINK_GBPS`` 450 GB/s per direction per GPU (an NVSwitch node:
every pair at full speed); a collective moving B bytes per rank takes ``B / (450 GB/s x efficiency) + latency``,
with ``ALL_TO_ALL_EFFICIENCY`` and ``ALL_GATHER_EFFICIENCY`` named below (NCCL on an NVSwitch reaches roughly these
fractions of the link at messages of tens of MB, the sizes here). Compute runs at ``COMPUTE_EFFICIENCY`` of the
roofline (1.0: the roofline itself, the pessimistic case for scaling, since slower compute hides communication).

The VAE decode is shared by temporal chunks (kandinsky5/runtime/parallel/vae.py: 11 chunks at 121 frames, 21 at
241), each decoded whole on one GPU (an 80 GB GPU needs no spatial tiles); its time per chunk scales the reference's
measured untiled decode (7.05 s for 121 frames at 512x768 on an H100) by pixels per frame.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from kandinsky5.models.dit import Kandinsky5Transformer3DModel, TransformerConfig  # noqa: E402

NVLINK_GBPS = 450.0  # NVLink 4 (H100 SXM), GB/s per direction per GPU
ALL_TO_ALL_EFFICIENCY = 0.6  # fraction of the link an all-to-all reaches (NCCL, NVSwitch, tens of MB per rank)
ALL_GATHER_EFFICIENCY = 0.8  # the same for an all-gather (ring or NVLS)
COLLECTIVE_LATENCY_S = 25e-6  # fixed cost of one collective (launch and synchronisation)
COMPUTE_EFFICIENCY = 1.0  # fraction of the roofline the DiT reaches (1.0: the roofline)
ACTIVATION_BYTES = 2  # bfloat16
TEXT_TOKENS = 128  # a typical templated prompt after the prefix crop (benchmarks/forward.py)
MODEL_CALLS_PER_STEP = 2  # guidance: condition and negative prompt
STEPS = 50
GPU_COUNTS = (1, 2, 4, 8)
# The reference's measured untiled VAE decode (H100, bf16): 121 frames at 512x768.
DECODE_SECONDS = 7.05
DECODE_FRAMES, DECODE_PIXELS = 121, 512 * 768
# The VAE's temporal chunks (kandinsky5/models/vae.py defaults): a chunk every 3 latent frames.
LATENT_CHUNK_STRIDE = 3
# (model, height, width, frames): Lite in its 512 class, Pro in its 1024 class; 5 s and 10 s at 24 fps.
CASES = (
    ("lite", 512, 768, 121),
    ("lite", 512, 768, 241),
    ("pro", 768, 1280, 121),
    ("pro", 768, 1280, 241),
)


@dataclasses.dataclass(frozen=True)
class Link:
    """The interconnect and collective efficiencies (bytes per second per direction per GPU)."""

    bytes_per_s: float = NVLINK_GBPS * 1e9
    all_to_all_efficiency: float = ALL_TO_ALL_EFFICIENCY
    all_gather_efficiency: float = ALL_GATHER_EFFICIENCY
    latency_s: float = COLLECTIVE_LATENCY_S

    def all_to_all_s(self, bytes_sent: float) -> float:
        return bytes_sent / (self.bytes_per_s * self.all_to_all_efficiency) + self.latency_s

    def all_gather_s(self, bytes_received: float) -> float:
        return bytes_received / (self.bytes_per_s * self.all_gather_efficiency) + self.latency_s


@dataclasses.dataclass(frozen=True)
class ModelFacts:
    """What the model needs to know of a DiT: its config, heads, and the bytes of its weights (bf16, the float32
    islands in float32), per block kind and the rest."""

    config: dict
    heads: int
    visual_block_bytes: int
    text_block_bytes: int
    rest_bytes: int

    @classmethod
    def of(cls, name: str) -> ModelFacts:
        config = common.CONFIGS[name]
        with torch.device("meta"):
            model = Kandinsky5Transformer3DModel(TransformerConfig(**config))

        def stored(prefix: str, module) -> int:
            total = 0
            for param_name, param in module.named_parameters():
                dtype = model.storage_dtype(f"{prefix}{param_name}", torch.bfloat16, param)
                total += param.numel() * dtype.itemsize
            return total

        visual = stored("visual_transformer_blocks.0.", model.visual_transformer_blocks[0])
        text = stored("text_transformer_blocks.0.", model.text_transformer_blocks[0])
        everything = stored("", model)
        blocks = visual * config["num_visual_blocks"] + text * config["num_text_blocks"]
        return cls(config, config["model_dim"] // sum(config["axes_dims"]), visual, text, everything - blocks)

    @property
    def block_bytes(self) -> int:
        return self.visual_block_bytes * self.config["num_visual_blocks"] + (
            self.text_block_bytes * self.config["num_text_blocks"]
        )


def latent_grid(height: int, width: int, frames: int) -> tuple[int, int, int]:
    return (frames - 1) // common.VAE_TEMPORAL + 1, height // common.VAE_SPATIAL, width // common.VAE_SPATIAL


def call_compute_s(facts: ModelFacts, tokens: int, ulysses: int, density: float, efficiency: float) -> float:
    """Seconds of one DiT call's compute on one rank of a Ulysses group of ``ulysses``."""
    config = facts.config
    whole = common.transformer_flops(config, tokens, TEXT_TOKENS)
    replicated = common.transformer_flops(config, 0, TEXT_TOKENS)  # text blocks, cross-attention K/V of the text
    head_dim = sum(config["axes_dims"])
    attention_rate = common.ATTENTION_TFLOPS.get(head_dim, common.ATTENTION_TFLOPS[64]) * 1e12
    matmul_rate = common.DENSE_MATMUL_TFLOPS * 1e12
    linear = replicated["linear"] + (whole["linear"] - replicated["linear"]) / ulysses
    blocks = config["num_visual_blocks"]
    self_attention = blocks * 4 * tokens * tokens * config["model_dim"] * density
    cross_attention = whole["attention"] - replicated["attention"] - blocks * 4 * tokens * tokens * config["model_dim"]
    attention = replicated["attention"] + (self_attention + cross_attention) / ulysses
    return (linear / matmul_rate + attention / attention_rate) / efficiency


def predict(
    facts: ModelFacts,
    height: int,
    width: int,
    frames: int,
    ulysses: int,
    cfg: int,
    shard_weights: bool,
    link: Link,
    density: float = 1.0,
    efficiency: float = COMPUTE_EFFICIENCY,
) -> dict:
    """Per-step seconds (compute, each communication, the step) on one rank of ``ulysses x cfg`` GPUs, and memory."""
    config = facts.config
    gpus = ulysses * cfg
    tokens = common.visual_tokens(config, height, width, frames)
    d, blocks = config["model_dim"], config["num_visual_blocks"]
    calls = MODEL_CALLS_PER_STEP // cfg
    compute = call_compute_s(facts, tokens, ulysses, density, efficiency)
    # Ulysses: 4 all-to-alls per visual block, then the output's all-gather
    ulysses_bytes = 4 * blocks * (tokens / ulysses) * d * ACTIVATION_BYTES * (ulysses - 1) / ulysses
    ulysses_s = 0.0
    if ulysses > 1:
        per_all_to_all = (tokens / ulysses) * d * ACTIVATION_BYTES * (ulysses - 1) / ulysses
        ulysses_s = 4 * blocks * link.all_to_all_s(per_all_to_all)
        ulysses_s += link.all_gather_s(tokens * d * ACTIVATION_BYTES * (ulysses - 1) / ulysses)
    # FSDP: every block's weights gathered per call, prefetched one block ahead
    fsdp_bytes = facts.block_bytes * (gpus - 1) / gpus if shard_weights else 0.0
    fsdp_exposed = 0.0
    if shard_weights and gpus > 1:
        num_blocks = blocks + config["num_text_blocks"]
        per_block_compute = (compute + ulysses_s) / num_blocks
        gathers = [link.all_gather_s(facts.visual_block_bytes * (gpus - 1) / gpus)] * blocks
        gathers += [link.all_gather_s(facts.text_block_bytes * (gpus - 1) / gpus)] * config["num_text_blocks"]
        fsdp_exposed = gathers[0] + sum(max(0.0, gather - per_block_compute) for gather in gathers[1:])
    # CFG: the pair exchanges its velocities once per step
    latent = math.prod(latent_grid(height, width, frames)) * config["out_visual_dim"] * ACTIVATION_BYTES
    cfg_s = link.all_gather_s(latent) if cfg > 1 else 0.0
    step = calls * (compute + ulysses_s + fsdp_exposed) + cfg_s
    weights = facts.rest_bytes + (facts.block_bytes / gpus if shard_weights else facts.block_bytes)
    return {
        "gpus": gpus,
        "ulysses": ulysses,
        "cfg": cfg,
        "shard_weights": shard_weights,
        "visual_tokens": tokens,
        "calls_per_rank": calls,
        "compute_s": calls * compute,
        "ulysses_s": calls * ulysses_s,
        "ulysses_bytes_per_call": ulysses_bytes,
        "fsdp_exposed_s": calls * fsdp_exposed,
        "fsdp_bytes_per_call": fsdp_bytes,
        "cfg_s": cfg_s,
        "step_s": step,
        "communication_fraction": (step - calls * compute) / step,
        "weights_gib": weights / 2**30,
    }


def decode_seconds(height: int, width: int, frames: int, gpus: int) -> float:
    """The VAE decode shared by temporal chunks over ``gpus`` (see the module's docstring)."""
    latent_frames = latent_grid(height, width, frames)[0]
    chunks = len(range(0, latent_frames, LATENT_CHUNK_STRIDE))
    reference_chunks = len(range(0, latent_grid(512, 768, DECODE_FRAMES)[0], LATENT_CHUNK_STRIDE))
    per_chunk = DECODE_SECONDS / reference_chunks * (height * width) / DECODE_PIXELS
    return math.ceil(chunks / gpus) * per_chunk


def splits(gpus: int, heads: int, tokens: int) -> list[tuple[int, int]]:
    """The (ulysses, cfg) layouts of ``gpus``: CFG 1 or 2, Ulysses dividing the heads and the tokens."""
    out = []
    for cfg in (1, 2):
        if gpus % cfg:
            continue
        ulysses = gpus // cfg
        if heads % ulysses == 0 and tokens % ulysses == 0:
            out.append((ulysses, cfg))
    return out


def run(link: Link, density: float, efficiency: float, steps: int = STEPS) -> dict:
    """Every case, GPU count and layout, with and without sharded weights; the best layout per case and count."""
    rows, best = [], []
    for name, height, width, frames in CASES:
        facts = ModelFacts.of(name)
        tokens = common.visual_tokens(facts.config, height, width, frames)
        single = predict(facts, height, width, frames, 1, 1, False, link, density, efficiency)
        for gpus in GPU_COUNTS:
            options = []
            for ulysses, cfg in splits(gpus, facts.heads, tokens):
                for shard in (False, True) if gpus > 1 else (False,):
                    row = predict(facts, height, width, frames, ulysses, cfg, shard, link, density, efficiency)
                    row.update(
                        model=name,
                        size=f"{height}x{width}",
                        frames=frames,
                        seconds=round((frames - 1) / 24),
                        speedup=single["step_s"] / row["step_s"],
                        decode_s=decode_seconds(height, width, frames, gpus),
                    )
                    row["efficiency"] = row["speedup"] / gpus
                    row["end_to_end_s"] = steps * row["step_s"] + row["decode_s"]
                    rows.append(row)
                    options.append(row)
            unsharded = [row for row in options if not row["shard_weights"]]
            pick = min(unsharded, key=lambda row: row["step_s"])
            sharded = [row for row in options if row["shard_weights"] and row["ulysses"] == pick["ulysses"]]
            best.append(
                dict(
                    pick,
                    sharded_step_s=sharded[0]["step_s"] if sharded else None,
                    sharded_weights_gib=sharded[0]["weights_gib"] if sharded else None,
                )
            )
    return {
        "assumptions": {
            "nvlink_gb_per_s_per_direction": link.bytes_per_s / 1e9,
            "all_to_all_efficiency": link.all_to_all_efficiency,
            "all_gather_efficiency": link.all_gather_efficiency,
            "collective_latency_s": link.latency_s,
            "compute_efficiency": efficiency,
            "attention_density": density,
            "matmul_tflops": common.DENSE_MATMUL_TFLOPS,
            "attention_tflops": common.ATTENTION_TFLOPS,
            "text_tokens": TEXT_TOKENS,
            "steps": steps,
            "guidance_calls_per_step": MODEL_CALLS_PER_STEP,
        },
        "rows": rows,
        "best": best,
    }


def format_table(result: dict) -> list[str]:
    header = (
        f"{'case':<32} {'GPUs':>4} {'U x C':>6} {'compute':>8} {'ulysses':>8} {'cfg':>6} {'step s':>7} "
        f"{'speed-up':>8} {'eff.':>5} {'comm %':>6} {'+shard s':>8} {'GiB/GPU':>12} {'decode':>7} {'50 steps':>9}"
    )
    lines = [header, "-" * len(header)]
    for row in result["best"]:
        case = f"{row['model']} {row['seconds']} s {row['size']} ({row['visual_tokens']} tok)"
        weights = f"{row['weights_gib']:.1f}"
        if row["sharded_weights_gib"] is not None:
            weights += f"/{row['sharded_weights_gib']:.1f}"
        sharded = "-" if row["sharded_step_s"] is None else f"{row['sharded_step_s']:.3f}"
        lines.append(
            f"{case:<32} {row['gpus']:>4} {row['ulysses']:>2} x {row['cfg']:<1} {row['compute_s']:>8.3f} "
            f"{row['ulysses_s']:>8.3f} {row['cfg_s']:>6.4f} {row['step_s']:>7.3f} {row['speedup']:>8.2f} "
            f"{row['efficiency']:>5.2f} {100 * row['communication_fraction']:>6.1f} {sharded:>8} {weights:>12} "
            f"{row['decode_s']:>7.2f} {row['end_to_end_s']:>9.1f}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nvlink-gbps", type=float, default=NVLINK_GBPS, help="GB/s per direction per GPU")
    parser.add_argument("--all-to-all-efficiency", type=float, default=ALL_TO_ALL_EFFICIENCY)
    parser.add_argument("--all-gather-efficiency", type=float, default=ALL_GATHER_EFFICIENCY)
    parser.add_argument("--latency-us", type=float, default=COLLECTIVE_LATENCY_S * 1e6)
    parser.add_argument("--compute-efficiency", type=float, default=COMPUTE_EFFICIENCY, help="fraction of roofline")
    parser.add_argument(
        "--attention-density", type=float, default=1.0, help="fraction of the self-attention computed (NABLA < 1)"
    )
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR / "parallel_model.json")
    args = parser.parse_args(argv)
    link = Link(args.nvlink_gbps * 1e9, args.all_to_all_efficiency, args.all_gather_efficiency, args.latency_us * 1e-6)
    result = run(link, args.attention_density, args.compute_efficiency, args.steps)
    print("\n".join(format_table(result)))
    print(
        "per rank per denoising step (2 guidance calls); compute at the roofline x compute efficiency; ulysses: the "
        "all-to-alls and the output all-gather; +shard s: the step with sharded weights (FSDP, exposed gathers); "
        "GiB/GPU: DiT weights whole / sharded; decode: VAE, temporal chunks shared; 50 steps: steps + decode"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
