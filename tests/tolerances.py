"""Every numeric tolerance of the test suite, in one place, each derived from floating-point rounding.

Two computations of one quantity that differ only in the order of their float32 operations (another kernel, a
fused matrix multiply, another batch shape, another CPU's vector width) differ by rounding alone. A correctly
rounded float32 operation errs by at most ``EPS / 2`` of its result (``EPS = 2**-23``, float32's machine epsilon);
a sum of ``n`` terms in another blocked or pairwise order by about ``log2(n) * EPS`` of the terms' magnitude. So a
bound here reads

    max |actual - expected| <= units * unit * max |expected|

with ``unit`` the machine epsilon of the format whose rounding causes the difference (``EPS``; ``BF16_EPS`` where
the compared computations round to bfloat16), ``units`` a growth factor derived in the tolerance's ``why``, and the
scale the magnitude of what is compared. Factors are powers of two: the smallest that covers the derivation. No
bound comes from what one machine happened to give; where a comment quotes a measurement, it shows the margin.

One mechanism dominates wherever the two sides' float32 arithmetic in the DiT differs at all: both our model and
diffusers' round the rotated queries and keys to bfloat16 (``apply_rotary``), so a last-bit float32 difference
upstream can move a rotated element across a bfloat16 rounding midpoint, a whole bfloat16 step (``BF16_FLIP``).
Comparisons of computations that run the same kernels on the same shapes (our DiT against the reference's, which
does the same products and sums) never see such a flip and keep the float32 bounds.

``relative_l2`` bounds (``*_RELATIVE_L2``, for the benchmarks' tables) bound ``|actual - expected|_2 /
|expected|_2`` by the same derivations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

EPS = torch.finfo(torch.float32).eps  # 2**-23 ~ 1.19e-7
BF16_EPS = torch.finfo(torch.bfloat16).eps  # 2**-7 ~ 7.8e-3


def _as_float64(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64)
    return torch.from_numpy(np.asarray(x, dtype=np.float64))


def max_abs_diff(actual, expected) -> float:
    """max |actual - expected| of two tensors or arrays of one shape (computed in float64)."""
    a, b = _as_float64(actual), _as_float64(expected)
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    return (a - b).abs().max().item()


def relative_l2(actual, expected) -> float:
    """|actual - expected|_2 / |expected|_2 (computed in float64)."""
    a, b = _as_float64(actual), _as_float64(expected)
    return ((a - b).norm() / b.norm()).item()


@dataclass(frozen=True)
class Tolerance:
    """``max |actual - expected| <= units * unit * max |expected|``; ``why`` derives ``units``."""

    name: str
    units: float
    why: str
    unit: float = EPS

    @property
    def relative(self) -> float:
        """The bound as a fraction of the compared magnitude."""
        return self.units * self.unit

    def bound(self, expected) -> float:
        """The allowed max |difference| for this ``expected``."""
        return self.relative * _as_float64(expected).abs().max().item()


def assert_close(actual, expected, tolerance: Tolerance) -> None:
    """``max |actual - expected| <= tolerance.bound(expected)``, failing with the numbers and the tolerance's name."""
    diff, bound = max_abs_diff(actual, expected), tolerance.bound(expected)
    assert diff <= bound, (
        f"max |difference| {diff:.3g} > {bound:.3g}, the {tolerance.name} bound ({tolerance.units:g} x "
        f"{tolerance.unit:.3g} x max |expected|): {diff / bound:.2f} of it"
    )


# --------------------------------------------------------------------------------------------- attention kernels

SAME_KERNEL = Tolerance(
    "SAME_KERNEL",
    2,
    "One SDPA kernel on the same inputs, its mask built another way (another layout of the same booleans): at most "
    "the final roundings of the softmax normaliser and of the output differ, EPS/2 each of max |v|, which bounds "
    "the output (a convex combination of the values): 2 EPS.",
)
ATTENTION_KERNEL = Tolerance(
    "ATTENTION_KERNEL",
    16,
    "Two float32 attention kernels (math, flash-CPU, flex; dense, block-sparse or per frame) on the same inputs: the "
    "softmax and the weighted sum of values in another blocked order. Over n keys that errs by ~log2(n) EPS of the "
    "values' magnitude, which the output (a convex combination of them) is measured by; the tests' n <= 1000 "
    "(log2 < 10): 16 EPS.",
)

# --------------------------------------------------------------------------------------------- networks

FORWARD_REORDER = Tolerance(
    "FORWARD_REORDER",
    16,
    "A float32 forward (tiny DiT, text encoder; or the latents of a sampling loop built from such forwards) against "
    "one doing the same products and sums with the same kernels on the same shapes: equal up to the summation "
    "order a kernel may still choose, which the last attention or linear layer's sums set (ATTENTION_KERNEL's 16 "
    "EPS); earlier layers' roundings pass through the normalisations without growing. No bfloat16 rounding of the "
    "rotated queries and keys can flip here: they are computed alike on both sides (or the difference arises after "
    "the last rotary embedding).",
)
BF16_FLIP = Tolerance(
    "BF16_FLIP",
    2**-5,
    "A float32 DiT forward whose arithmetic differs from the other side's (flex against SDPA, inductor's kernels, "
    "fused projections, another batch shape). Both models round the rotated queries and keys to bfloat16, so a "
    "last-bit difference upstream can move one element by one bfloat16 step, BF16_EPS of it. That element enters "
    "its logits scaled by 1/sqrt(head_dim) = 1/4 (the tiny models' head_dim is 16), and they reach the output "
    "through a softmax over at least 64 keys (one NABLA block) whose random-signed contributions add as "
    "sqrt(64) = 8: BF16_EPS / 32 = 2**-12 of the output's magnitude (2048 EPS), room for a few flips (one flipped "
    "element was measured to move the tiny NABLA model's output by at most 2**-13.4 of it).",
    unit=BF16_EPS,
)
NABLA_FORWARD = BF16_FLIP  # flex_attention on a block mask against SDPA with the expanded mask
INDUCTOR_FORWARD = BF16_FLIP  # inductor's generated float32 kernels against eager

# --------------------------------------------------------------------------------------------- VAE

VAE = Tolerance(
    "VAE",
    128,
    "A float32 decode or encode of the tiny causal 3D VAE against diffusers' (or in another memory layout): the mid "
    "block's attention (ATTENTION_KERNEL) and the 3x3x3 convolutions (27 x channels <= 432 products per output, "
    "log2 ~ 9: 8 EPS each) sum in another order in ~16 convolution layers, whose GroupNorms bring every stage back "
    "to magnitude ~1, so each layer adds its 8 EPS of the output's magnitude: 16 x 8 = 128 EPS.",
)
VAE_CUDA = Tolerance(
    "VAE_CUDA",
    4 * VAE.units,
    "VAE's bound, for cuDNN on a GPU (float32, TF32 off): cuDNN may pick convolution algorithms other than direct "
    "sums (implicit-GEMM variants, Winograd), whose transforms add a few roundings of larger intermediates: 4x.",
)

# --------------------------------------------------------------------------------------------- pipelines

PIPELINE = Tolerance(
    "PIPELINE",
    VAE.units,
    "Frames of a whole float32 pipeline against diffusers' where the DiT does the reference's arithmetic (the same "
    "kernels on the same shapes: the latents agree as FORWARD_REORDER): they differ by the VAE decode's summation "
    "order, VAE of the decode's magnitude (~2: its GroupNorms keep every stage ~1); frames are decode / 2 + 1/2 in "
    "[0, 1], so half that difference: VAE of the frames' magnitude 1.",
)
PIPELINE_BF16_FLIP = Tolerance(
    "PIPELINE_BF16_FLIP",
    2 * BF16_FLIP.units,
    "A whole pipeline where the two sides' DiT arithmetic differs (batched against separate guidance calls, a "
    "batch against each prompt alone, flex against SDPA, fused projections, or DiT inputs conditioned on VAE "
    "encodes that differ as VAE): each denoiser call may carry BF16_FLIP of the velocity; the Euler steps sum to "
    "dt = 1, so the latents carry about one call's relative difference, x2 for guidance's two branches, whose "
    "flips are independent; the VAE decode's own difference (VAE) is far below: 2**-11 of the magnitude.",
    unit=BF16_EPS,
)
TEXT_ENCODER = FORWARD_REORDER  # prompt embeddings: the same text encoder arithmetic on both sides

# --------------------------------------------------------------------------------------------- bfloat16

BF16_ATTENTION = Tolerance(
    "BF16_ATTENTION",
    1,
    "bfloat16 attention, two kernels: the same inputs, float32 sums that differ by a few EPS, then each output "
    "rounded to bfloat16 (within half a step) on each side: the two differ by at most one step, BF16_EPS of the "
    "largest output.",
    unit=BF16_EPS,
)
# Relative L2 of bfloat16 runs against the reference: the size of bfloat16 rounding itself (BF16_EPS / 2 ~ 0.4 %
# per rounding, compounded over layers), not a float32 reordering.
BF16_FORWARD_RELATIVE_L2 = 1e-2  # the tiny DiT in bfloat16, ours against the reference on a GPU: the bound
# The tiny random VAE amplifies bfloat16 rounding: either decode is 3.2-3.5 % from the float32 one (test_vae).
BF16_VAE_RELATIVE_L2 = 5e-2

# --------------------------------------------------------------------------------------------- relative L2

# The same derivations on the L2 norm, for tables that report relative L2 (the benchmarks). The rounding differences
# of a reordered float32 computation are spread over all elements, each about the fraction of its own magnitude that
# the max bound derives for the largest: the same fraction bounds the relative L2. A bfloat16 flip instead changes
# only the outputs of the few tokens that attend to the flipped element: over the >= 64 tokens of any benchmark grid
# the L2 norm dilutes it by at least sqrt(64) = 8.
FORWARD_REORDER_RELATIVE_L2 = FORWARD_REORDER.relative  # 16 EPS ~ 1.9e-6
BF16_FLIP_RELATIVE_L2 = BF16_FLIP.relative / 8  # 2**-15 ~ 3.1e-5
INDUCTOR_FORWARD_RELATIVE_L2 = BF16_FLIP_RELATIVE_L2  # compiled (inductor) forward against eager or the reference
VAE_DECODE_RELATIVE_L2 = VAE.relative  # 128 EPS ~ 1.5e-5
PIPELINE_FRAMES_RELATIVE_L2 = PIPELINE.relative  # 128 EPS ~ 1.5e-5, the DiT doing the reference's arithmetic
PIPELINE_BF16_FLIP_RELATIVE_L2 = PIPELINE_BF16_FLIP.relative / 8  # 2**-14 ~ 6.1e-5, fused/compiled/batched DiT

# --------------------------------------------------------------------------------------------- not rounding

# float frames in [0, 1] against their uint8 bytes: half a level, plus the float32 rounding of x * 255 (EPS/2 of
# 255, i.e. EPS/2 back in [0, 1]) and of the division by 255 (EPS/2): 1/510 + EPS.
UINT8_ROUNDING = 0.5 / 255 + EPS
# A lossy codec, not rounding: H.264 at the default quality (CRF 25), yuv420p's halved chroma and the RGB ->
# limited-range YUV round trip lose a little: measured 0.0074 (about 2 of 255 levels) mean absolute difference on
# test_io's gradient with x264 of PyAV 18.1; 0.02 (5 levels) leaves room for other encoder builds while still
# catching swapped channels or shifted frames.
CODEC_MEAN_ABS = 0.02
