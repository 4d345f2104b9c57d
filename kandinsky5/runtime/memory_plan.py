"""A memory plan that picks itself: the GPU and host memory a generation needs in each offload mode, estimated from
the checkpoint's configs alone (no weight is read), and the fastest mode that fits a GPU's free memory.

Weights are counted exactly: the four networks are built on the ``meta`` device from their configs (our
:class:`~kandinsky5.models.dit.Kandinsky5Transformer3DModel` and
:class:`~kandinsky5.models.vae.AutoencoderKLHunyuanVideo` or the image models'
:class:`~kandinsky5.models.vae2d.AutoencoderKL2D`, transformers' ``Qwen2_5_VLForConditionalGeneration`` and
``CLIPTextModel``), so nothing is allocated, and each parameter is counted at the bytes it is stored in: the
compute dtype, 4 bytes in the DiT's float32 islands (``_keep_in_fp32_modules``), and the low-bit layouts of
:mod:`kandinsky5.runtime.quantization` for the layers it quantizes (its own rules decide which).

Activations follow a written model per phase (the constants below, each with what it counts):

- **text encoding**: Qwen2.5-VL on the template prefix plus ``max_sequence_length`` tokens, every layer's hidden
  state kept (``output_hidden_states``), the MLP's widened tensors, the attention scores; CLIP on its 77 tokens.
- **sampling**: one transformer call on ``L = latent frames x (H / 16) x (W / 16)`` visual tokens per video (times
  two when classifier-free guidance is batched). Inside a visual block the peak is the larger of two stages, counted
  in tensors of ``L x model_dim`` values: the attention stage (the block's input, the modulated input, query, key
  and value, plus the float32 temporaries of the query's RMSNorm and RoPE, or NABLA's block scores), and the
  feed-forward stage (the block's input, the residual, the last sublayer's output, the modulated input, plus the
  hidden activation twice: the input layer's output and GELU's). Feed-forward chunking
  (:mod:`kandinsky5.runtime.chunking`) shrinks only the hidden term, to ``chunk x ff_dim`` per copy.
- **decoding**: the VAE's own estimate (:func:`kandinsky5.runtime.vae_tiling.untiled_decode_peak_bytes`, calibrated
  on the reference's measured 21.5 GiB) for one temporal chunk, or one spatial tile when tiling, plus the decoded
  video kept for blending; or the video's conversion to float frames, when larger.

**Image models** (text-to-image, editing: :attr:`PipelineConfigs.makes_images`, told by the VAE's ``_class_name``
``AutoencoderKL``, FLUX's 2D VAE) run the same phases on one frame: ``L = (H / 16) x (W / 16)`` tokens (4,096 at
1024x1024; editing's condition latents are extra channels of the same tokens), Qwen's template prefix of the image
templates and ``max_sequence_length`` 512 (editing 1024, the source image's tokens included), and the 2D VAE's
decode (:func:`image_decode_activations`; editing also encodes the source image, :func:`image_encode_activations`,
and runs Qwen's vision tower on it at half size, :func:`vision_activations`; in ``blocks`` mode the vision tower is
resident with Qwen's other non-block weights). The 2D VAE does not tile by itself: the plan tiles its decode only
when ``vae_tiling`` is True. These figures are estimates from traces, not yet checked against a GPU measurement.

The counts were taken by tracing our own blocks' live tensors (bfloat16); they reproduce diffusers 0.42.1's
measured peaks (:data:`ANCHORS`, H100, bf16) within a few percent, although diffusers' blocks hold about one more
tensor of ``L x model_dim`` than ours. The anchors are diffusers' figures and our implementation is meant to be no
worse: the test holds the plan to them within :data:`ANCHOR_TOLERANCE`.

Modes (:data:`MODE_TABLE`, fastest first): ``resident`` (everything on the GPU), ``model`` (one whole component on
the GPU at a time: ``enable_model_cpu_offload``), ``blocks`` (model offload in which the transformer's blocks and
Qwen's decoder layers stream through ``blocks_on_gpu + prefetch`` device buffers: ``enable_block_offload``),
``sequential`` (one layer's weights at a time: ``enable_sequential_cpu_offload``). Model offload keeps the whole
DiT on the GPU while it samples, so it is faster than streaming blocks whenever it fits.

:func:`choose_mode` takes the first mode whose every phase fits the free memory with :data:`DEFAULT_MARGIN` to
spare, trying the VAE's automatic tiles and feed-forward chunks (:func:`feed_forward_chunk_tokens`) before giving a
mode up; when none fits it says so and picks ``sequential``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

GIB = 2**30

# ---------------------------------------------------------------------------------------------------- modes, phases


class Mode(StrEnum):
    RESIDENT = "resident"
    MODEL = "model"
    BLOCKS = "blocks"
    SEQUENTIAL = "sequential"

    @property
    def offload(self) -> str:
        """The ``--offload`` value of this mode."""
        return MODE_TABLE[self].offload


class Phase(StrEnum):
    TEXT = "text encoding"
    SAMPLING = "sampling"
    DECODING = "decoding"


class Placement(StrEnum):
    """Where a component's weights are."""

    WHOLE = "whole on the GPU"
    STREAMED = "blocks streamed"  # the non-block part on the GPU, the blocks through a few device buffers
    LAYER = "layer by layer"  # the layers whose forward is running
    HOST = "on the host"


@dataclass(frozen=True)
class ModeRule:
    """How a mode places the components: the running one and the others."""

    offload: str  # the --offload value
    running: Placement
    idle: Placement
    description: str


# The mode table, fastest first: choose_mode takes the first that fits.
MODE_TABLE: dict[Mode, ModeRule] = {
    Mode.RESIDENT: ModeRule("none", Placement.WHOLE, Placement.WHOLE, "everything on the GPU"),
    Mode.MODEL: ModeRule(
        "model", Placement.WHOLE, Placement.HOST, "one whole component on the GPU at a time (model CPU offload)"
    ),
    Mode.BLOCKS: ModeRule(
        "blocks",
        Placement.STREAMED,
        Placement.HOST,
        "the transformer's blocks and Qwen's decoder layers streamed from pinned host memory; CLIP and the VAE whole",
    ),
    Mode.SEQUENTIAL: ModeRule(
        "sequential", Placement.LAYER, Placement.HOST, "one layer's weights at a time (sequential CPU offload)"
    ),
}
MODES: tuple[Mode, ...] = tuple(MODE_TABLE)
MODE_OF_OFFLOAD: dict[str, Mode] = {rule.offload: mode for mode, rule in MODE_TABLE.items()}

# Pipeline component names.
TRANSFORMER, TEXT_ENCODER, TEXT_ENCODER_2, VAE = "transformer", "text_encoder", "text_encoder_2", "vae"
COMPONENTS = (TEXT_ENCODER, TEXT_ENCODER_2, TRANSFORMER, VAE)
COMPONENT_LABELS = {TRANSFORMER: "transformer", TEXT_ENCODER: "text encoder", TEXT_ENCODER_2: "CLIP", VAE: "VAE"}

# The phase table: the components each phase runs, one after another.
PHASE_TABLE: dict[Phase, tuple[str, ...]] = {
    Phase.TEXT: (TEXT_ENCODER, TEXT_ENCODER_2),
    Phase.SAMPLING: (TRANSFORMER,),
    Phase.DECODING: (VAE,),
}

# ---------------------------------------------------------------------------------------------------- constants

# choose_mode's safety margin: a mode fits when its estimated peak times (1 + margin) is within the free memory. It
# covers the estimate's error (the plan is within a few percent of the measured anchors, which are allocated bytes)
# and what the caching allocator reserves beyond the allocated bytes (fragmentation between differently sized
# tensors, typically a few percent).
DEFAULT_MARGIN = 0.10
# The anchors must be reproduced within this fraction.
ANCHOR_TOLERANCE = 0.15

# Stored bytes of a quantized linear layer's weight (kandinsky5.runtime.quantization, measured on its tensors):
# fp8 (torchao Float8Tensor): 1 byte per weight and a float32 scale per output row; int8 (torchao Int8Tensor,
# weight-only): 1 byte per weight, a float32 scale and an int8 zero point per output row; nf4 (bitsandbytes
# Params4bit): half a byte per weight, and per block of NF4_BLOCKSIZE weights an 8-bit absmax (double quantization,
# bitsandbytes' default), whose own float32 scales come one per NF4_NESTED_BLOCKSIZE blocks.
QUANTIZED_WEIGHT_BYTES = {"fp8": 1.0, "int8": 1.0, "nf4": 0.5}
ROW_SCALE_BYTES = {"fp8": 4, "int8": 4 + 1, "nf4": 0}
NF4_ABSMAX_BYTES = 1
NF4_NESTED_BLOCKSIZE = 256
NF4_NESTED_SCALE_BYTES = 4
# bitsandbytes' 4-bit layers cannot stream block by block (block_offload.can_stream): such a component moves whole.
UNSTREAMABLE_QUANTIZATIONS = ("nf4",)

# Text encoding. The video prompt template's prefix with the real Qwen2.5-VL tokenizer (cropped after encoding, but
# encoded): see models/text_encoders.py.
TEMPLATE_PREFIX_TOKENS = 128
# Qwen keeps every layer's output (output_hidden_states=True): num_hidden_layers + 1 hidden states.
# Widened MLP tensors alive at once in a decoder layer: gate projection, up projection, act(gate) * up.
TEXT_MLP_TENSORS = 3
# Hidden-width tensors of a layer besides the kept states: the residual, the normed input, the query, the attention
# output, the sublayer output.
TEXT_LAYER_TENSORS = 5
# Attention scores when the attention falls back to the math path: float32 scores and their softmax.
TEXT_ATTENTION_SCORE_TENSORS = 2
TEXT_SCORE_ITEMSIZE = 4

# Sampling: tensors of (tokens x model_dim) values in the compute dtype alive at each stage's peak of a visual block
# (counted by tracing our blocks' live tensors).
ATTENTION_STAGE_TENSORS = 5  # the block's input (held by its caller), the modulated input, query, key, value
# float32 (tokens x model_dim) temporaries on top of them: the query's RMSNorm in float32 (its float32 copy,
# x * rsqrt(mean x^2), the weighted result); RoPE's float32 pairs and products are as large.
ATTENTION_STAGE_FP32_TENSORS = 3
FP32_ITEMSIZE = 4
# The block's input, the residual after the two attentions, the cross-attention's output (still bound while the
# feed-forward runs), the modulated input of the feed-forward.
FEED_FORWARD_STAGE_TENSORS = 4
# With chunks, the preallocated output they are written into is alive beside the chunk's hidden activation.
FEED_FORWARD_CHUNKED_EXTRA_TENSORS = 1
# NABLA's block map, per (batch row, head, query block, key block): the block scores' softmax, its sorted copy and
# their cumulative sums in the compute dtype, and the sort order (int64).
NABLA_SCORE_TENSORS = 3
NABLA_SORT_INDEX_BYTES = 8
# The RoPE table of the visual tokens: a float32 cosine and sine per (token, head_dim / 2).
ROPE_TABLE_VALUES_PER_PAIR = 2
# Text tokens alive through the visual blocks: the text stream and one cross-attention's key and value.
TEXT_STREAM_TENSORS = 3

# Decoding: the decoded video's conversion to float frames in [0, 1] (postprocess_video): the video, its scaled and
# clamped copies, and the float32 copy (two compute-dtype sizes in bf16).
POSTPROCESS_VIDEO_COPIES = 5

# The image models. Their Qwen template prefixes with the real tokenizer (models/text_encoders.py): text-to-image's,
# and editing's crop (its prefix plus EDIT_CROP_PAST_PREFIX), the most tokens before max_sequence_length's.
T2I_TEMPLATE_PREFIX_TOKENS = 40
EDIT_TEMPLATE_PREFIX_TOKENS = 54
# The class name of the image models' VAE in vae/config.json (diffusers' AutoencoderKL: our AutoencoderKL2D).
IMAGE_VAE_CLASS_NAME = "AutoencoderKL"
# The 2D VAE's peak live tensors, in tensors of (pixels x block_out_channels[0]) values at full resolution, counted
# by tracing our AutoencoderKL2D on the meta device (bf16, 1536 and 1280 bytes per pixel with the FLUX VAE's 128
# channels): decoding peaks in the last resnet stack's first resnet (its 256-channel input, GroupNorm and SiLU
# outputs), encoding in the first down block's resnets.
IMAGE_DECODE_TENSORS = 6
IMAGE_ENCODE_TENSORS = 5
# Convolution workspaces and allocator rounding on top of the live tensors: the video VAE's measured decode peak
# (21.5 GiB, vae_tiling.REFERENCE_DECODE_PEAK_BYTES) over the same trace of our 3D decoder (14.4 GiB). Assumed to
# hold for the 2D VAE until a GPU measures it.
VAE_WORKSPACE_FACTOR = 1.5
# Outputs of a tiled 2D decode alive at once: the decoded tiles and the stitched image, about twice the image.
IMAGE_TILED_KEPT_COPIES = 2
# Qwen's vision tower (editing) on the source image at 1 / EDIT_IMAGE_DOWNSCALE of the output size, per layer:
# hidden-width tensors alive (the residual, the normed input, query, key and value), the MLP's three widened ones,
# attention scores as the math path holds them (float32 scores and softmax); plus the patches it reads.
EDIT_IMAGE_DOWNSCALE = 2
VISION_LAYER_TENSORS = 5


def format_gib(num_bytes: float) -> str:
    """Bytes as GiB, the one format of every figure the plan prints: ``12.3 GiB`` (two decimals below 1 GiB)."""
    gib = num_bytes / GIB
    return f"{gib:.2f} GiB" if gib < 1 else f"{gib:.1f} GiB"


# ---------------------------------------------------------------------------------------------------- configs

# Built-in configs of the official checkpoints' networks, for a model named without local configs. The DiT sizes are
# the published ones (shared/reference/README.md); the text encoders and the VAE are the same in every variant
# (Qwen2.5-VL-7B, CLIP ViT-L/14's text model, HunyuanVideo's VAE: the checkpoint-pro-5s files, which the tests
# compare with these).
DIT_COMMON = dict(
    in_visual_dim=16,
    out_visual_dim=16,
    in_text_dim=3584,
    in_text_dim2=768,
    patch_size=(1, 2, 2),
    visual_cond=True,
)
DIT_SIZES = {
    "lite": dict(
        time_dim=512, model_dim=1792, ff_dim=7168, num_text_blocks=2, num_visual_blocks=32, axes_dims=(16, 24, 24)
    ),
    "pro": dict(
        time_dim=1024, model_dim=4096, ff_dim=16384, num_text_blocks=4, num_visual_blocks=60, axes_dims=(32, 48, 48)
    ),
}
# NABLA settings of the official NABLA checkpoints (Pro's transformer config; Lite 10 s differs only in P, which
# changes no memory).
NABLA_ATTENTION = dict(
    attention_type="nabla",
    attention_causal=False,
    attention_local=False,
    attention_glob=False,
    attention_window=3,
    attention_method="topcdf",
    attention_P=0.8,
    attention_add_sta=True,
    attention_wT=11,
    attention_wW=3,
    attention_wH=3,
)
QWEN2_5_VL_7B = dict(
    model_type="qwen2_5_vl",
    hidden_act="silu",
    hidden_size=3584,
    intermediate_size=18944,
    num_attention_heads=28,
    num_hidden_layers=28,
    num_key_value_heads=4,
    max_position_embeddings=128000,
    rms_norm_eps=1e-06,
    rope_theta=1000000.0,
    tie_word_embeddings=False,
    vocab_size=152064,
    rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
    vision_config=dict(
        depth=32,
        hidden_act="silu",
        hidden_size=1280,
        intermediate_size=3420,
        num_heads=16,
        in_chans=3,
        out_hidden_size=3584,
        patch_size=14,
        spatial_merge_size=2,
        spatial_patch_size=14,
        window_size=112,
        fullatt_block_indexes=[7, 15, 23, 31],
        tokens_per_second=2,
        temporal_patch_size=2,
    ),
)
# The image models' DiT (Lite image: shared/reference/README.md's facts; visual_cond True for editing) and FLUX's
# 2D VAE (diffusers AutoencoderKL config of FLUX.1: the official image checkpoints' vae/config.json).
IMAGE_DIT = dict(
    time_dim=512, model_dim=2560, ff_dim=10240, num_text_blocks=2, num_visual_blocks=50, axes_dims=(32, 48, 48)
)
FLUX_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=16,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    force_upcast=True,
    use_quant_conv=False,
    use_post_quant_conv=False,
    mid_block_add_attention=True,
)
CLIP_VIT_L14_TEXT = dict(
    model_type="clip_text_model",
    hidden_act="quick_gelu",
    hidden_size=768,
    intermediate_size=3072,
    num_attention_heads=12,
    num_hidden_layers=12,
    max_position_embeddings=77,
    projection_dim=768,
    vocab_size=49408,
)


@dataclass(frozen=True)
class PipelineConfigs:
    """The four networks' configs (the ``config.json`` contents of a Diffusers-layout checkpoint) and where they
    came from."""

    transformer: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    text_encoder_2: dict[str, Any]
    source: str

    @classmethod
    def from_checkpoint(cls, folder: str | Path) -> PipelineConfigs:
        """The configs of a checkpoint folder: ``<component>/config.json``. ``FileNotFoundError``/``ValueError``
        naming the file when one is missing or unreadable."""
        folder = Path(folder).expanduser()
        configs = {}
        for name in COMPONENTS:
            path = folder / name / "config.json"
            try:
                configs[name] = json.loads(path.read_text())
            except FileNotFoundError as err:
                raise FileNotFoundError(f"{path} is missing: a memory plan needs every network's config") from err
            except (OSError, ValueError) as err:
                raise ValueError(f"{path} is not a readable JSON config ({err})") from err
        return cls(**configs, source=str(folder))

    @classmethod
    def for_variant(cls, variant) -> PipelineConfigs:
        """Built-in configs of an official :class:`~kandinsky5.variants.Variant` (no file read)."""
        from kandinsky5.models.vae import HunyuanVideoVAEConfig
        from kandinsky5.models.vae2d import AutoencoderKL2DConfig
        from kandinsky5.variants import AttentionType, Task

        if variant.makes_images:
            transformer = dict(DIT_COMMON, **IMAGE_DIT, visual_cond=variant.task is Task.IMAGE_TO_IMAGE)
            vae = {"_class_name": IMAGE_VAE_CLASS_NAME, **AutoencoderKL2DConfig(**FLUX_VAE).to_dict()}
        else:
            transformer = dict(DIT_COMMON, **DIT_SIZES[str(variant.model_size)])
            vae = HunyuanVideoVAEConfig().to_dict()
        if variant.attention is AttentionType.NABLA:
            transformer.update(NABLA_ATTENTION)
        return cls(
            transformer=transformer,
            vae=vae,
            text_encoder=dict(QWEN2_5_VL_7B),
            text_encoder_2=dict(CLIP_VIT_L14_TEXT),
            source=f"the built-in configs of {variant.short_name}",
        )

    @property
    def makes_images(self) -> bool:
        """An image model's configs: the VAE is FLUX's 2D one (``_class_name`` ``AutoencoderKL``)."""
        return is_image_vae(self.vae)

    @property
    def edits(self) -> bool:
        """The image-editing model's: an image model whose transformer takes condition latents (``visual_cond``);
        Qwen's vision tower then runs on the source image."""
        return self.makes_images and bool(self.transformer.get("visual_cond", False))


def is_image_vae(vae_config: dict[str, Any]) -> bool:
    """Whether a ``vae/config.json`` is the image models' 2D VAE (what loading decides by, ``_class_name``; none
    means the video VAE)."""
    return vae_config.get("_class_name") == IMAGE_VAE_CLASS_NAME


def vae_compression(vae_config: dict[str, Any]) -> tuple[int, int]:
    """(spatial, temporal) compression of a VAE config: the 2D VAE halves each side per block after the first and
    keeps frames (an image is one); the video VAE's config says both."""
    if is_image_vae(vae_config):
        return 2 ** (len(vae_config.get("block_out_channels", (64,))) - 1), 1
    return vae_config.get("spatial_compression_ratio", 8), vae_config.get("temporal_compression_ratio", 4)


def _without_private(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _qwen_config(config: dict[str, Any]):
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig.from_dict(_without_private(config))


def _clip_text_config(config: dict[str, Any]):
    """A ``CLIPTextConfig`` from a CLIPTextModel config or a whole CLIPModel's (its ``text_config``)."""
    from transformers import CLIPTextConfig

    text = config.get("text_config", config) if config.get("model_type") == "clip" else config
    return CLIPTextConfig.from_dict({k: v for k, v in _without_private(text).items() if k != "model_type"})


def _text_dims(config) -> Any:
    """The language model's config of a transformers config (``text_config`` where it has one)."""
    return getattr(config, "text_config", None) or config


# ---------------------------------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class BlockGroup:
    """Same-shaped repeated blocks, streamed through one ring of device buffers in ``blocks`` mode."""

    name: str
    count: int
    block_bytes: int


@dataclass(frozen=True)
class ComponentWeights:
    """One network's weights as stored, and the parts each mode places.

    ``unused_bytes``: parts the pipeline never runs (Qwen's language-model head, and its vision tower but for the
    editing model): moved with the component in ``model`` mode, left on the host in ``blocks`` mode.
    ``layer_bytes``: the most weight on the GPU at once in ``sequential`` mode, the own tensors of a chain of nested
    modules whose forwards run together.
    """

    name: str
    parameters: int
    bytes: int
    groups: tuple[BlockGroup, ...] = ()
    unused_bytes: int = 0
    layer_bytes: int = 0
    streamable: bool = False

    @property
    def label(self) -> str:
        return COMPONENT_LABELS.get(self.name, self.name)

    @property
    def blocks_bytes(self) -> int:
        return sum(group.count * group.block_bytes for group in self.groups)

    @property
    def resident_bytes(self) -> int:
        """The part that stays on the GPU while the component runs in ``blocks`` mode."""
        return self.bytes - self.blocks_bytes - self.unused_bytes

    def gpu_bytes(self, placement: Placement, slots: int) -> int:
        """Weights on the GPU under ``placement``; ``slots`` device buffers per block group when streamed."""
        if placement is Placement.WHOLE:
            return self.bytes
        if placement is Placement.STREAMED:
            if not (self.groups and self.streamable):
                return self.bytes
            return self.resident_bytes + slots * sum(group.block_bytes for group in self.groups)
        if placement is Placement.LAYER:
            return self.layer_bytes
        return 0

    def host_bytes(self, placement: Placement) -> int:
        """Weights in host memory under ``placement`` (streamed blocks rest there, pinned, as do unused parts)."""
        if placement is Placement.WHOLE:
            return 0
        if placement is Placement.STREAMED and self.groups and self.streamable:
            return self.bytes - self.resident_bytes
        if placement is Placement.STREAMED:
            return 0
        return self.bytes

    @property
    def pinned_bytes(self) -> int:
        """Host bytes page-locked in block mode: the blocks, when they stream (pinned for as long as the mode is
        on, whichever component runs)."""
        return self.blocks_bytes if self.groups and self.streamable else 0


def _quantized_weight_bytes(shape: torch.Size, mode: str) -> int:
    rows, numel = shape[0], math.prod(shape)
    stored = QUANTIZED_WEIGHT_BYTES[mode] * numel + ROW_SCALE_BYTES[mode] * rows
    if mode == "nf4":
        from kandinsky5.runtime.quantization import NF4_BLOCKSIZE

        blocks = math.ceil(numel / NF4_BLOCKSIZE)
        stored += NF4_ABSMAX_BYTES * blocks + NF4_NESTED_SCALE_BYTES * math.ceil(blocks / NF4_NESTED_BLOCKSIZE)
    return math.ceil(stored)


def _own_bytes(
    model: nn.Module, itemsize, quantized: frozenset[str], mode: str | None
) -> tuple[dict[str, int], dict[str, int]]:
    """``{module name: bytes of its own parameters and buffers}`` and the parameter counts, as stored: quantized
    layers' weights (``quantized`` names, ``mode``) in their low-bit layout, the rest at ``itemsize(name, tensor)``
    bytes per value."""
    own, counts = {}, {}
    for module_name, module in model.named_modules():
        total = count = 0
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            full = f"{module_name}.{name}" if module_name else name
            if mode is not None and name == "weight" and module_name in quantized:
                total += _quantized_weight_bytes(tensor.shape, mode)
            else:
                total += tensor.numel() * itemsize(full, tensor)
            if isinstance(tensor, nn.Parameter):
                count += tensor.numel()
        own[module_name] = total
        counts[module_name] = count
    return own, counts


def _under(names: Iterable[str], prefix: str) -> list[str]:
    return [n for n in names if n == prefix or n.startswith(prefix + ".")]


def _layer_chain_bytes(model: nn.Module, own: dict[str, int], skip: tuple[str, ...]) -> int:
    """The most own-tensor bytes along a chain of nested modules (outside ``skip``): what sequential offload has
    on the device at once."""

    def chain(name: str, module: nn.Module) -> int:
        if any(name == s or name.startswith(s + ".") for s in skip):
            return 0
        children = [chain(f"{name}.{c}" if name else c, m) for c, m in module.named_children()]
        return own[name] + max(children, default=0)

    return chain("", model)


def _component_weights(
    name: str,
    model: nn.Module,
    itemsize,
    quantized: frozenset[str],
    mode: str | None,
    block_lists: list[tuple[str, str]],
    unused: tuple[str, ...] = (),
) -> ComponentWeights:
    own, counts = _own_bytes(model, itemsize, quantized, mode)
    groups = []
    for label, path in block_lists:
        blocks = model.get_submodule(path)
        if len(blocks):
            block_bytes = max(sum(own[n] for n in _under(own, f"{path}.{i}")) for i in range(len(blocks)))
            groups.append(BlockGroup(label, len(blocks), block_bytes))
    return ComponentWeights(
        name=name,
        parameters=sum(counts.values()),
        bytes=sum(own.values()),
        groups=tuple(groups),
        unused_bytes=sum(own[n] for prefix in unused for n in _under(own, prefix)),
        layer_bytes=_layer_chain_bytes(model, own, unused),
        streamable=bool(groups) and mode not in UNSTREAMABLE_QUANTIZATIONS,
    )


def _meta_transformer(config: dict[str, Any]):
    from kandinsky5.models.dit import Kandinsky5Transformer3DModel

    with torch.device("meta"):
        return Kandinsky5Transformer3DModel.from_config(_without_private(config))


def _meta_vae(config: dict[str, Any], dtype: torch.dtype, image: bool = False):
    """The video VAE, or with ``image`` the image models' 2D VAE, on the meta device."""
    if image:
        from kandinsky5.models.vae2d import AutoencoderKL2D as vae_class
    else:
        from kandinsky5.models.vae import AutoencoderKLHunyuanVideo as vae_class

    with torch.device("meta"):
        return vae_class.from_config(_without_private(config)).to(dtype)


def _meta_qwen(config: dict[str, Any]):
    from transformers import Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        return Qwen2_5_VLForConditionalGeneration(_qwen_config(config))


def _meta_clip(config: dict[str, Any]):
    from transformers import CLIPTextModel

    with torch.device("meta"):
        return CLIPTextModel(_clip_text_config(config))


@lru_cache(maxsize=8)
def _quantized_transformer_layers(config_json: str) -> frozenset[str]:
    from kandinsky5.runtime.quantization import transformer_layers

    return frozenset(transformer_layers(_meta_transformer(json.loads(config_json))))


@lru_cache(maxsize=16)
def _transformer_weights(config_json: str, dtype: torch.dtype, mode: str | None) -> ComponentWeights:
    dit = _meta_transformer(json.loads(config_json))
    quantized = _quantized_transformer_layers(config_json) if mode else frozenset()

    def itemsize(name: str, tensor: torch.Tensor) -> int:
        return FP32_ITEMSIZE if dit.keeps_fp32(name) else dtype.itemsize

    blocks = [("text blocks", "text_transformer_blocks"), ("visual blocks", "visual_transformer_blocks")]
    return _component_weights(TRANSFORMER, dit, itemsize, quantized, mode, blocks)


@lru_cache(maxsize=8)
def _text_encoder_weights(
    config_json: str, dtype: torch.dtype, mode: str | None, vision_input: bool = False
) -> ComponentWeights:
    """Qwen's weights; ``vision_input``: the editing model's, whose vision tower runs (resident in block mode)."""
    from kandinsky5.runtime.block_offload import TEXT_ENCODER_UNUSED, TEXT_ENCODER_VISION
    from kandinsky5.runtime.quantization import text_encoder_layers

    qwen = _meta_qwen(json.loads(config_json))
    quantized = frozenset(text_encoder_layers(qwen)) if mode else frozenset()
    layers = next(path for path in ("model.language_model.layers", "model.layers") if _has_submodule(qwen, path))
    unused = tuple(p for p in TEXT_ENCODER_UNUSED if not (vision_input and p == TEXT_ENCODER_VISION))
    return _component_weights(
        TEXT_ENCODER, qwen, _plain_itemsize(dtype), quantized, mode, [("decoder layers", layers)], unused
    )


@lru_cache(maxsize=8)
def _clip_weights(config_json: str, dtype: torch.dtype) -> ComponentWeights:
    clip = _meta_clip(json.loads(config_json))
    return _component_weights(TEXT_ENCODER_2, clip, _plain_itemsize(dtype), frozenset(), None, [])


@lru_cache(maxsize=8)
def _vae_weights(config_json: str, dtype: torch.dtype, image: bool = False) -> ComponentWeights:
    vae = _cached_meta_vae(config_json, dtype, image)
    return _component_weights(VAE, vae, _plain_itemsize(dtype), frozenset(), None, [])


def _plain_itemsize(dtype: torch.dtype):
    """Bytes per value of a network cast to ``dtype``: floating tensors in it, others (integer buffers) as they are."""

    def itemsize(name: str, tensor: torch.Tensor) -> int:
        return dtype.itemsize if tensor.is_floating_point() else tensor.element_size()

    return itemsize


def _json(config: dict[str, Any]) -> str:
    """A config as the weights' cache key (values JSON cannot hold, such as a dtype, as text)."""
    return json.dumps(_without_private(config), sort_keys=True, default=str)


def component_weights(configs: PipelineConfigs, inputs: PlanInputs) -> tuple[ComponentWeights, ...]:
    """Every network's weights as ``inputs`` store them (dtype, quantization), counted on ``meta`` builds (cached)."""
    dtype = inputs.dtype
    return (
        _text_encoder_weights(_json(configs.text_encoder), dtype, inputs.quantize_text_encoder, configs.edits),
        _clip_weights(_json(configs.text_encoder_2), dtype),
        _transformer_weights(_json(configs.transformer), dtype, inputs.quantize_transformer),
        _vae_weights(_json(configs.vae), dtype, configs.makes_images),
    )


def _has_submodule(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


# ---------------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class PlanInputs:
    """What a generation asks for, as far as memory goes.

    ``batch``: videos per transformer call (prompts x videos per prompt). ``guidance``: classifier-free guidance on
    (the negative prompt's model call); ``batched_guidance``: both branches in one call of twice the batch.
    ``vae_tiling``: ``True``/``False`` forced, ``None`` automatic (tiles only when the untiled decode does not fit).
    ``ff_chunk_tokens``: feed-forward chunking (``None``: off). ``blocks_on_gpu``/``prefetch``: block streaming's
    settings (``enable_block_offload``).
    """

    height: int
    width: int
    num_frames: int
    batch: int = 1
    guidance: bool = True
    batched_guidance: bool = False
    max_sequence_length: int = 512
    dtype: torch.dtype = torch.bfloat16
    quantize_transformer: str | None = None
    quantize_text_encoder: str | None = None
    vae_tiling: bool | None = None
    ff_chunk_tokens: int | None = None
    blocks_on_gpu: int = 1
    prefetch: int = 1

    def __post_init__(self):
        for name in ("height", "width", "num_frames", "batch", "max_sequence_length", "blocks_on_gpu"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {self.prefetch}")
        if self.ff_chunk_tokens is not None and self.ff_chunk_tokens < 1:
            raise ValueError(f"ff_chunk_tokens must be a positive integer or None, got {self.ff_chunk_tokens}")
        from kandinsky5.runtime.quantization import TEXT_ENCODER_MODES, TRANSFORMER_MODES

        for name, mode, allowed in (
            ("quantize_transformer", self.quantize_transformer, TRANSFORMER_MODES),
            ("quantize_text_encoder", self.quantize_text_encoder, TEXT_ENCODER_MODES),
        ):
            if mode is not None and mode not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)} or None, got {mode!r}")

    @property
    def slots(self) -> int:
        """Device buffers per streamed block group."""
        return self.blocks_on_gpu + self.prefetch

    @property
    def call_batch(self) -> int:
        """Batch rows of one transformer call."""
        return self.batch * (2 if self.guidance and self.batched_guidance else 1)


# ---------------------------------------------------------------------------------------------------- activations


@dataclass(frozen=True)
class SamplingActivations:
    """Activation bytes of one transformer call (the DiT's model, see the module's docstring)."""

    tokens: int  # visual tokens per video
    batch: int  # rows of the call
    attention_stage: int
    feed_forward_stage: int
    hidden: int  # of the feed-forward stage: the hidden activations (chunked or not)
    persistent: int  # alive through the forward: text tokens, RoPE table, the sampler's latents

    @property
    def peak(self) -> int:
        return self.persistent + max(self.attention_stage, self.feed_forward_stage)


def visual_tokens(transformer: dict[str, Any], vae: dict[str, Any], height: int, width: int, frames: int) -> int:
    """``L``: latent frames x (H / (8 x 2)) x (W / (8 x 2)) for the official VAE and patch size (an image: one
    latent frame)."""
    spatial, temporal = vae_compression(vae)
    pt, ph, pw = transformer.get("patch_size", (1, 2, 2))
    latent_frames = (frames - 1) // temporal + 1
    return (latent_frames // pt) * (height // spatial // ph) * (width // spatial // pw)


def sampling_activations(configs: PipelineConfigs, inputs: PlanInputs) -> SamplingActivations:
    from kandinsky5.models.dit import TransformerConfig

    c = TransformerConfig.from_dict(_without_private(configs.transformer))
    s = inputs.dtype.itemsize
    b = inputs.call_batch
    tokens = visual_tokens(configs.transformer, configs.vae, inputs.height, inputs.width, inputs.num_frames)
    d, f = c.model_dim, c.ff_dim
    row = b * tokens * d * s  # one (batch, tokens, model_dim) tensor
    attention_extra = ATTENTION_STAGE_FP32_TENSORS * b * tokens * d * FP32_ITEMSIZE
    if c.uses_nabla:
        from kandinsky5.attention.nabla import NABLA_BLOCK_SIZE

        blocks = tokens // NABLA_BLOCK_SIZE
        heads = d // c.head_dim
        pair = NABLA_SCORE_TENSORS * s + NABLA_SORT_INDEX_BYTES
        attention_extra = max(attention_extra, b * heads * blocks * blocks * pair)
    attention = ATTENTION_STAGE_TENSORS * row + attention_extra
    chunk = inputs.ff_chunk_tokens
    if chunk is None or chunk >= tokens:
        hidden = _ff_hidden_bytes(b, tokens, f, s)
        feed_forward = FEED_FORWARD_STAGE_TENSORS * row + hidden
    else:
        hidden = _ff_hidden_bytes(b, chunk, f, s)
        feed_forward = (FEED_FORWARD_STAGE_TENSORS + FEED_FORWARD_CHUNKED_EXTRA_TENSORS) * row + hidden
    pixels = tokens * math.prod(c.patch_size)  # latent pixels per video
    sampler_values = c.in_visual_dim + c.visual_input_dim + (c.visual_input_dim - c.in_visual_dim) + c.out_visual_dim
    persistent = (
        TEXT_STREAM_TENSORS * b * inputs.max_sequence_length * d * s
        + tokens * (c.head_dim // 2) * ROPE_TABLE_VALUES_PER_PAIR * FP32_ITEMSIZE
        + inputs.batch * pixels * sampler_values * s
    )
    return SamplingActivations(tokens, b, attention, feed_forward, hidden, persistent)


def _ff_hidden_bytes(batch: int, tokens: int, ff_dim: int, itemsize: int) -> int:
    from kandinsky5.runtime.chunking import HIDDEN_COPIES

    return HIDDEN_COPIES * batch * tokens * ff_dim * itemsize


def text_activations(configs: PipelineConfigs, inputs: PlanInputs) -> dict[str, int]:
    """Activation bytes of each text encoder's call (the prompt's; the negative prompt's is another such call); the
    editing model's Qwen figure includes its vision tower's (:func:`vision_activations`)."""
    qwen = _text_dims(_qwen_config(configs.text_encoder))
    clip = _clip_text_config(configs.text_encoder_2)
    s = inputs.dtype.itemsize
    prefix = TEMPLATE_PREFIX_TOKENS
    if configs.makes_images:
        prefix = EDIT_TEMPLATE_PREFIX_TOKENS if configs.edits else T2I_TEMPLATE_PREFIX_TOKENS
    qwen_tokens = prefix + inputs.max_sequence_length
    qwen_bytes = _text_model_bytes(qwen, qwen_tokens, inputs.batch, s, kept=qwen.num_hidden_layers + 1)
    return {
        TEXT_ENCODER: qwen_bytes + vision_activations(configs, inputs),
        TEXT_ENCODER_2: _text_model_bytes(clip, clip.max_position_embeddings, inputs.batch, s, kept=1),
    }


def vision_patches(vision_config, height: int, width: int) -> int:
    """Patches Qwen's vision tower sees of an editing model's ``height x width`` source image: half its size,
    rounded to whole merged patches (Qwen2-VL's image processor; within its pixel bounds at these sizes)."""
    patch, merge = vision_config.patch_size, vision_config.spatial_merge_size
    unit = patch * merge
    rows, cols = (max(unit, round(side / EDIT_IMAGE_DOWNSCALE / unit) * unit) for side in (height, width))
    return (rows // patch) * (cols // patch)


def vision_activations(configs: PipelineConfigs, inputs: PlanInputs) -> int:
    """Activation bytes of Qwen's vision tower on the editing model's source image (taken to be of the output
    size), one per prompt; 0 for the other models. Small: about 1,300 patches at 1024x1024."""
    if not configs.edits:
        return 0
    vision = _qwen_config(configs.text_encoder).vision_config
    s, b = inputs.dtype.itemsize, inputs.batch
    patches = vision_patches(vision, inputs.height, inputs.width)
    hidden = b * patches * vision.hidden_size * s
    mlp = TEXT_MLP_TENSORS * b * patches * vision.intermediate_size * s
    scores = TEXT_ATTENTION_SCORE_TENSORS * b * vision.num_heads * patches * patches * TEXT_SCORE_ITEMSIZE
    pixels = b * patches * vision.in_channels * vision.temporal_patch_size * vision.patch_size**2 * s
    return pixels + VISION_LAYER_TENSORS * hidden + max(mlp, scores)


def _text_model_bytes(config, tokens: int, batch: int, itemsize: int, kept: int) -> int:
    hidden = batch * tokens * config.hidden_size * itemsize
    mlp = TEXT_MLP_TENSORS * batch * tokens * config.intermediate_size * itemsize
    scores = TEXT_ATTENTION_SCORE_TENSORS * batch * config.num_attention_heads * tokens * tokens * TEXT_SCORE_ITEMSIZE
    return (kept + TEXT_LAYER_TENSORS) * hidden + max(mlp, scores)


def decode_activations(
    vae_config: dict[str, Any],
    latent_frames: int,
    latent_height: int,
    latent_width: int,
    batch: int,
    dtype: torch.dtype,
    tiled: bool,
) -> int:
    """Peak activation bytes of decoding latents of this shape: the VAE's own estimate
    (:func:`~kandinsky5.runtime.vae_tiling.untiled_decode_peak_bytes`) of one temporal chunk, of one spatial tile's
    chunk when ``tiled``, plus the decoded video kept for blending the chunks (``tile_sample_min_num_frames /
    tile_sample_stride_num_frames`` times the video); or the conversion to float frames, when larger."""
    from kandinsky5.runtime.vae_tiling import untiled_decode_peak_bytes

    vae = _cached_meta_vae(_json(vae_config), dtype)
    ratio = vae.spatial_compression_ratio
    height, width = latent_height, latent_width
    if tiled and (height * ratio > vae.tile_sample_min_height or width * ratio > vae.tile_sample_min_width):
        height = min(height, vae.tile_sample_min_height // ratio)
        width = min(width, vae.tile_sample_min_width // ratio)
    z = torch.empty(batch, vae.config.latent_channels, latent_frames, height, width, device="meta", dtype=dtype)
    chunk = untiled_decode_peak_bytes(vae, z)
    frames = (latent_frames - 1) * vae.temporal_compression_ratio + 1
    video = batch * vae.config.out_channels * frames * latent_height * ratio * latent_width * ratio * dtype.itemsize
    framewise = vae.use_framewise_decoding and latent_frames > vae.tile_sample_min_num_frames // (
        vae.temporal_compression_ratio
    )
    kept = video * vae.tile_sample_min_num_frames // vae.tile_sample_stride_num_frames if framewise else video
    return max(chunk + kept, POSTPROCESS_VIDEO_COPIES * video)


@lru_cache(maxsize=8)
def _cached_meta_vae(config_json: str, dtype: torch.dtype, image: bool = False):
    return _meta_vae(json.loads(config_json), dtype, image)


def _image_vae_peak(
    vae_config: dict[str, Any], height: int, width: int, batch: int, dtype: torch.dtype, tiled: bool, tensors: int
) -> tuple[int, int, int]:
    """(the 2D VAE's peak activations on one ``height x width`` image or tile, the tile's height and width)."""
    from kandinsky5.models.vae2d import AutoencoderKL2DConfig

    config = AutoencoderKL2DConfig.from_dict(_without_private(vae_config))
    size = config.sample_size
    tile = size[0] if isinstance(size, (list, tuple)) else size
    if tiled and max(height, width) > tile:
        height, width = min(height, tile), min(width, tile)
    values = tensors * height * width * config.block_out_channels[0]
    return int(batch * values * dtype.itemsize * VAE_WORKSPACE_FACTOR), height, width


def image_decode_activations(
    vae_config: dict[str, Any], latent_height: int, latent_width: int, batch: int, dtype: torch.dtype, tiled: bool
) -> int:
    """Peak activation bytes of the image models' 2D VAE decoding ``batch`` latents of this size:
    :data:`IMAGE_DECODE_TENSORS` full-resolution tensors of ``block_out_channels[0]`` channels, times
    :data:`VAE_WORKSPACE_FACTOR`, of the image or (``tiled``) of one ``sample_size`` tile, whose outputs are kept for
    stitching; or the images' conversion to float, when larger."""
    ratio = 2 ** (len(vae_config.get("block_out_channels", (64,))) - 1)
    height, width = latent_height * ratio, latent_width * ratio
    tensors = IMAGE_DECODE_TENSORS
    peak, tile_height, tile_width = _image_vae_peak(vae_config, height, width, batch, dtype, tiled, tensors)
    out_channels = vae_config.get("out_channels", 3)
    image = batch * out_channels * height * width * dtype.itemsize
    kept = IMAGE_TILED_KEPT_COPIES * image if (tile_height, tile_width) != (height, width) else image
    return max(peak + kept, POSTPROCESS_VIDEO_COPIES * image)


def image_encode_activations(
    vae_config: dict[str, Any], height: int, width: int, batch: int, dtype: torch.dtype, tiled: bool
) -> int:
    """Peak activation bytes of the 2D VAE encoding ``batch`` source images of ``height x width`` pixels (the
    editing model, at the output size): :data:`IMAGE_ENCODE_TENSORS` full-resolution tensors, as the decode."""
    peak, _, _ = _image_vae_peak(vae_config, height, width, batch, dtype, tiled, IMAGE_ENCODE_TENSORS)
    in_channels = vae_config.get("in_channels", 3)
    return peak + batch * in_channels * height * width * dtype.itemsize


# ---------------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class PhaseMemory:
    """One phase in one mode: the GPU's weights and activations at the phase's peak, and the host memory the
    weights take meanwhile (``host_pinned`` of it page-locked)."""

    phase: Phase
    gpu_weights: int
    gpu_activations: int
    host: int
    host_pinned: int = 0
    # the component running at the peak
    component: str = ""

    @property
    def gpu(self) -> int:
        return self.gpu_weights + self.gpu_activations


@dataclass(frozen=True)
class ModePlan:
    mode: Mode
    phases: tuple[PhaseMemory, ...]

    def phase(self, phase: Phase | str) -> PhaseMemory:
        phase = Phase(phase)
        return next(p for p in self.phases if p.phase is phase)

    @property
    def peak_gpu(self) -> int:
        return max(p.gpu for p in self.phases)

    @property
    def peak_phase(self) -> PhaseMemory:
        return max(self.phases, key=lambda p: p.gpu)

    @property
    def peak_host(self) -> int:
        return max(p.host for p in self.phases)


@dataclass(frozen=True)
class MemoryPlan:
    """Every mode's memory for one generation (:func:`plan_memory`)."""

    configs: PipelineConfigs
    inputs: PlanInputs
    weights: tuple[ComponentWeights, ...]
    sampling: SamplingActivations
    text: dict[str, int]
    decode: int
    modes: tuple[ModePlan, ...]
    # the editing model: the source image's VAE encode (the VAE's figure is the larger of it and the decode) and
    # Qwen's vision tower (inside text["text_encoder"])
    encode: int = 0
    vision: int = 0

    def mode(self, mode: Mode | str) -> ModePlan:
        mode = Mode(mode)
        return next(m for m in self.modes if m.mode is mode)

    def component(self, name: str) -> ComponentWeights:
        return next(w for w in self.weights if w.name == name)

    @property
    def tiled(self) -> bool:
        """Whether the plan's decode is tiled (automatic tiling plans the untiled decode; see choose_mode)."""
        return bool(self.inputs.vae_tiling)

    @property
    def auto_tiles(self) -> bool:
        """Whether the VAE tiles by itself when memory is short (``vae_tiling`` None): the video VAE does; the image
        models' 2D VAE tiles only when told."""
        return not self.configs.makes_images

    @property
    def weights_bytes(self) -> int:
        return sum(w.bytes for w in self.weights)

    def replace(self, **changes) -> MemoryPlan:
        """The plan of the same configs with some inputs changed (the weights are cached)."""
        return plan_memory(self.configs, dataclasses.replace(self.inputs, **changes))


def plan_memory(configs: PipelineConfigs, inputs: PlanInputs) -> MemoryPlan:
    """Estimate every mode's GPU and host memory per phase for ``inputs`` on the networks of ``configs``, without
    reading a weight (the networks are built on the ``meta`` device; weights cached per configs, dtype and
    quantization)."""
    if configs.makes_images and inputs.num_frames != 1:
        raise ValueError(f"an image model makes one frame: num_frames must be 1, got {inputs.num_frames}")
    vae = _without_private(configs.vae)
    weights = component_weights(configs, inputs)
    spatial, temporal = vae_compression(configs.vae)
    latent_height, latent_width = inputs.height // spatial, inputs.width // spatial
    tiled = bool(inputs.vae_tiling)
    encode = 0
    if configs.makes_images:
        decode = image_decode_activations(vae, latent_height, latent_width, inputs.batch, inputs.dtype, tiled)
        if configs.edits:
            encode = image_encode_activations(vae, inputs.height, inputs.width, inputs.batch, inputs.dtype, tiled)
    else:
        latent_frames = (inputs.num_frames - 1) // temporal + 1
        decode = decode_activations(
            vae, latent_frames, latent_height, latent_width, inputs.batch, inputs.dtype, tiled=tiled
        )
    sampling = sampling_activations(configs, inputs)
    text = text_activations(configs, inputs)
    activations = {**text, TRANSFORMER: sampling.peak, VAE: max(decode, encode)}
    by_name = {w.name: w for w in weights}
    modes = tuple(
        ModePlan(mode, tuple(_phase_memory(mode, phase, by_name, activations, inputs.slots) for phase in Phase))
        for mode in MODES
    )
    vision = vision_activations(configs, inputs)
    return MemoryPlan(configs, inputs, weights, sampling, text, decode, modes, encode, vision)


def _phase_memory(
    mode: Mode, phase: Phase, weights: dict[str, ComponentWeights], activations: dict[str, int], slots: int
) -> PhaseMemory:
    """The phase's peak: the worst of its components running in turn, the others placed as the mode's idle ones."""
    rule = MODE_TABLE[mode]
    candidates = []
    for running in PHASE_TABLE[phase]:
        gpu = host = 0
        for name, w in weights.items():
            placement = rule.running if name == running else rule.idle
            gpu += w.gpu_bytes(placement, slots)
            host += w.host_bytes(placement)
        streams = rule.running is Placement.STREAMED
        pinned = sum(w.pinned_bytes for w in weights.values()) if streams else 0
        candidates.append(PhaseMemory(phase, gpu, activations[running], host, pinned, running))
    return max(candidates, key=lambda p: p.gpu)


# ---------------------------------------------------------------------------------------------------- choosing


@dataclass(frozen=True)
class ModeChoice:
    """What :func:`choose_mode` picked: the mode, whether it fits, its peak GPU estimate with the settings it relies
    on (``vae_tiling`` True: the decode must tile, which automatic tiling does by itself when memory is short;
    ``ff_chunk_tokens``: feed-forward chunking to enable), and the one-line reason."""

    mode: Mode
    fits: bool
    needed_bytes: int
    free_bytes: int
    vae_tiling: bool | None
    ff_chunk_tokens: int | None
    reason: str

    @property
    def offload(self) -> str:
        return self.mode.offload


def fits(needed_bytes: int, free_bytes: int, margin: float = DEFAULT_MARGIN) -> bool:
    """Whether an estimated peak fits the free memory with ``margin`` (a fraction of the estimate) to spare."""
    return needed_bytes * (1 + margin) <= free_bytes


def feed_forward_chunk_tokens(
    plan: MemoryPlan, free_bytes: int, mode: Mode | str = Mode.RESIDENT, margin: float = DEFAULT_MARGIN
) -> int | None:
    """The feed-forward chunk (tokens) that lets ``mode``'s sampling phase fit ``free_bytes`` with ``margin``, or
    ``None`` when it fits unchunked or when no chunk makes it fit (the attention stage, or the weights, are then
    the limit). The chunk is the largest whose hidden activations fit what the rest of the phase leaves
    (:func:`kandinsky5.runtime.chunking.feed_forward_chunk_tokens`)."""
    from kandinsky5.runtime import chunking

    unchunked = plan if plan.inputs.ff_chunk_tokens is None else plan.replace(ff_chunk_tokens=None)
    sampling = unchunked.mode(mode).phase(Phase.SAMPLING)
    if fits(sampling.gpu, free_bytes, margin):
        return None
    act = unchunked.sampling
    tokens, batch = act.tokens, act.batch
    itemsize = plan.inputs.dtype.itemsize
    row = batch * tokens * _model_dim(plan) * itemsize
    rest = (
        sampling.gpu_weights + act.persistent + (FEED_FORWARD_STAGE_TENSORS + FEED_FORWARD_CHUNKED_EXTRA_TENSORS) * row
    )
    budget = int(free_bytes / (1 + margin)) - rest
    if budget <= 0:
        return None
    chunk = chunking.feed_forward_chunk_tokens(budget, tokens, _ff_dim(plan), itemsize, batch)
    if chunk is None:
        return None
    chunked = plan.replace(ff_chunk_tokens=chunk)
    return chunk if fits(chunked.mode(mode).phase(Phase.SAMPLING).gpu, free_bytes, margin) else None


def _model_dim(plan: MemoryPlan) -> int:
    return int(plan.configs.transformer["model_dim"])


def _ff_dim(plan: MemoryPlan) -> int:
    return int(plan.configs.transformer["ff_dim"])


def _best_attempt(plan: MemoryPlan, mode: Mode, free_bytes: int, margin: float) -> tuple[MemoryPlan, bool]:
    """``plan`` for ``mode`` made to fit if it can, and whether it does: as it is, with the VAE's tiles (when
    tiling is automatic: the VAE then tiles by itself), with feed-forward chunks (when chunking is not set), or
    both. When nothing fits, the attempt with the lowest peak."""
    attempts = [plan]
    if plan.inputs.vae_tiling is None and plan.auto_tiles:
        attempts.append(plan.replace(vae_tiling=True))
    for attempt in list(attempts):
        if attempt.inputs.ff_chunk_tokens is None:
            chunk = feed_forward_chunk_tokens(attempt, free_bytes, mode, margin)
            if chunk is not None:
                attempts.append(attempt.replace(ff_chunk_tokens=chunk))
    for attempt in attempts:
        if fits(attempt.mode(mode).peak_gpu, free_bytes, margin):
            return attempt, True
    return min(attempts, key=lambda a: a.mode(mode).peak_gpu), False


def choose_mode(plan: MemoryPlan, free_bytes: int, margin: float = DEFAULT_MARGIN) -> ModeChoice:
    """The fastest mode (``MODES``' order: resident, model, blocks, sequential) whose every phase fits
    ``free_bytes`` with ``margin`` (:func:`fits`), with the VAE tiling and feed-forward chunking it relies on, and a
    one-line reason saying what did not fit in the next faster mode. When nothing fits: ``sequential``, ``fits``
    False, and the reason says it may not fit."""
    free = format_gib(free_bytes)
    missed = ""
    for mode in MODES:
        attempt, fitting = _best_attempt(plan, mode, free_bytes, margin)
        mode_plan = attempt.mode(mode)
        if not fitting and mode is not Mode.SEQUENTIAL:
            missed = f"{_shortfall(attempt, mode_plan)}, more than {free} free allows with a {margin:.0%} margin; "
            continue
        needed = format_gib(mode_plan.peak_gpu)
        if fitting:
            why = f"{missed}{mode.offload} needs {needed}" if missed else f"everything fits: {needed} of {free} free"
        else:
            why = f"{missed}{mode.offload} needs {needed} at {mode_plan.peak_phase.phase} and may not fit either"
        return ModeChoice(
            mode=mode,
            fits=fitting,
            needed_bytes=mode_plan.peak_gpu,
            free_bytes=free_bytes,
            vae_tiling=attempt.inputs.vae_tiling,
            ff_chunk_tokens=attempt.inputs.ff_chunk_tokens,
            reason=f"offload: {mode.offload} ({why}{_settings_note(plan, attempt)})",
        )
    raise AssertionError("unreachable: sequential is always returned")


def _shortfall(plan: MemoryPlan, mode_plan: ModePlan) -> str:
    """What sets a mode's peak, in words: "everything at once needs 61.0 GiB at sampling", "the transformer's
    40.4 GiB of weights and its activations need 52.3 GiB at sampling", ..."""
    peak = mode_plan.peak_phase
    where = f"{format_gib(peak.gpu)} at {peak.phase}"
    if mode_plan.mode is Mode.RESIDENT:
        return f"everything at once needs {where}"
    if mode_plan.mode is Mode.MODEL:
        component = plan.component(peak.component)
        return f"the {component.label}'s {format_gib(component.bytes)} of weights and its activations need {where}"
    return f"{mode_plan.mode.offload} offload needs {where}"


def _settings_note(plan: MemoryPlan, attempt: MemoryPlan) -> str:
    notes = []
    if attempt.inputs.vae_tiling and not plan.inputs.vae_tiling:
        notes.append("the VAE decodes in tiles")
    if attempt.inputs.ff_chunk_tokens is not None and plan.inputs.ff_chunk_tokens is None:
        notes.append(f"feed-forward in chunks of {attempt.inputs.ff_chunk_tokens} tokens")
    return "; " + " and ".join(notes) if notes else ""


# ---------------------------------------------------------------------------------------------------- decode only


def decode_plan_bytes(
    vae_config: dict[str, Any], latent_shape: tuple[int, ...], dtype: torch.dtype, tiled: bool
) -> tuple[int, int, int]:
    """``kandinsky5 decode``'s memory: (VAE weight bytes, decode activation bytes, sequential offload's weight
    bytes) for channels-last latents ``(batch, frames, height, width, channels)``."""
    weights = _vae_weights(_json(vae_config), dtype, is_image_vae(vae_config))
    batch, frames, height, width = latent_shape[:4]
    return (
        weights.bytes,
        decode_activations(vae_config, frames, height, width, batch, dtype, tiled),
        weights.layer_bytes,
    )


# ---------------------------------------------------------------------------------------------------- anchors


@dataclass(frozen=True)
class Anchor:
    """A measured peak the plan must reproduce (shared/reference/README.md: H100 80GB, torch 2.11, diffusers 0.42.1,
    bfloat16, random weights, peak allocated memory). ``figure``: which of the plan's numbers it is:
    ``"forward"`` (the DiT resident alone: its weights and one call's activations), ``"decode"`` (the VAE decode's
    activations, above the weights), ``"pipeline"`` (the whole T2V pipeline with model CPU offload: ``model`` mode's
    peak)."""

    name: str
    model: str  # "lite" | "pro"
    figure: str
    height: int
    width: int
    num_frames: int
    vae_tiling: bool | None
    measured_gib: float


ANCHORS: tuple[Anchor, ...] = (
    Anchor("Lite forward", "lite", "forward", 512, 768, 121, None, 6.4),
    Anchor("Pro forward", "pro", "forward", 512, 768, 121, None, 45.2),
    Anchor("VAE decode, tiling on", "lite", "decode", 512, 768, 121, True, 3.9),
    Anchor("VAE decode, tiling off", "lite", "decode", 512, 768, 121, False, 21.5),
    Anchor("Lite pipeline, model offload, tiling off", "lite", "pipeline", 512, 768, 121, False, 22.0),
    Anchor("Lite pipeline, model offload, tiling on", "lite", "pipeline", 512, 768, 121, True, 15.9),
    Anchor("Pro pipeline, model offload, tiling on", "pro", "pipeline", 512, 768, 121, True, 45.2),
)


def anchor_configs(model: str) -> PipelineConfigs:
    """The official configs of ``"lite"`` or ``"pro"`` (dense attention, as the anchors were measured)."""
    from kandinsky5.variants import get_variant

    return PipelineConfigs.for_variant(get_variant("lite-sft-5s" if model == "lite" else "pro-sft-5s"))


def anchor_estimate(anchor: Anchor, configs: PipelineConfigs | None = None) -> int:
    """The plan's figure for ``anchor``, in bytes."""
    configs = configs or anchor_configs(anchor.model)
    if anchor.figure == "forward":
        # one model call on a dense transformer, as measured
        configs = dataclasses.replace(configs, transformer=dict(configs.transformer, attention_type="regular"))
    inputs = PlanInputs(anchor.height, anchor.width, anchor.num_frames, vae_tiling=anchor.vae_tiling)
    plan = plan_memory(configs, inputs)
    if anchor.figure == "forward":
        return plan.component(TRANSFORMER).bytes + plan.sampling.peak
    if anchor.figure == "decode":
        return plan.decode
    return plan.mode(Mode.MODEL).peak_gpu


def anchor_table() -> str:
    """The anchors and the plan's estimates as a Markdown table (docs/memory.md holds this very table)."""
    lines = ["| anchor | measured | plan | error |", "|---|---|---|---|"]
    for anchor in ANCHORS:
        estimate = anchor_estimate(anchor) / GIB
        error = estimate / anchor.measured_gib - 1
        lines.append(f"| {anchor.name} | {anchor.measured_gib:.1f} GiB | {estimate:.1f} GiB | {error:+.0%} |")
    return "\n".join(lines)
