"""The Kandinsky 5 diffusion transformer (DiT).

Only the network lives here. Parameter names equal those of the official Diffusers checkpoints. Float32
islands (time embedding, modulation, the norm-modulate and gate-residual arithmetic) follow the reference; the
model's compute dtype is used everywhere else.

The forward runs in named stages (:meth:`Kandinsky5Transformer3DModel.embed_text`, ``embed_time``,
``embed_visual``, ``text_blocks``, ``visual_blocks``, ``output_head``). Code outside the model changes how a stage
runs without editing it: :meth:`Kandinsky5Transformer3DModel.wrap_stage` (a step cache, sequence parallelism).
Fusing projections and compiling are transforms applied from outside, in :mod:`kandinsky5.runtime`; the methods
of the same names here delegate to them.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from kandinsky5.attention import attention, attention_backend
from kandinsky5.attention.backends import validate_backend
from kandinsky5.attention.nabla import (
    NablaParams,
    as_nabla_params,
    from_fractal_order,
    to_fractal_order,
)
from kandinsky5.models.base import ComponentConfig, ModelBase
from kandinsky5.models.forward_context import ForwardContext

ROPE_MAX_PERIOD = 10000.0
TIME_MAX_PERIOD = 10000.0
# The reference rounds rotated queries and keys to bfloat16, whatever the model dtype; exact mode does too.
ROPE_OUTPUT_DTYPE = torch.bfloat16


@dataclasses.dataclass
class TransformerConfig(ComponentConfig):
    in_visual_dim: int = 4
    in_text_dim: int = 3584
    in_text_dim2: int = 768
    time_dim: int = 512
    out_visual_dim: int = 4
    patch_size: tuple[int, int, int] = (1, 2, 2)
    model_dim: int = 2048
    ff_dim: int = 5120
    num_text_blocks: int = 2
    num_visual_blocks: int = 32
    axes_dims: tuple[int, int, int] = (16, 24, 24)
    visual_cond: bool = False
    attention_type: str = "regular"
    attention_causal: bool | None = None
    attention_local: bool | None = None
    attention_glob: bool | None = None
    attention_window: int | None = None
    attention_P: float | None = None
    attention_wT: int | None = None
    attention_wW: int | None = None
    attention_wH: int | None = None
    attention_add_sta: bool | None = None
    attention_method: str | None = None

    @property
    def head_dim(self) -> int:
        return sum(self.axes_dims)

    @property
    def uses_nabla(self) -> bool:
        return self.attention_type == "nabla"

    @property
    def visual_input_dim(self) -> int:
        # noise latents, then (when visual_cond) the condition latents and a one-channel condition mask
        return 2 * self.in_visual_dim + 1 if self.visual_cond else self.in_visual_dim


def rope_frequencies(dim: int, max_period: float) -> torch.Tensor:
    """Frequencies of the reference's sinusoidal embeddings, computed the same way in float32."""
    return torch.exp(-math.log(max_period) * torch.arange(start=0, end=dim, dtype=torch.float32) / dim)


@lru_cache(maxsize=16)
def frequencies_on(dim: int, max_period: float, device: torch.device) -> torch.Tensor:
    """``rope_frequencies`` computed on the CPU (the reference's values) and copied to ``device`` once: a copy per
    forward would make every denoising step wait for the GPU."""
    return rope_frequencies(dim, max_period).to(device)


def rotation_table(angles: torch.Tensor) -> torch.Tensor:
    """``(..., n)`` angles -> ``(..., 1, n, 2)``: the cosine and sine of each angle (the head axis broadcasts).

    The reference stores full 2x2 rotation matrices and sums their rows against each pair; ``apply_rope`` does the
    same multiply-adds from the two distinct entries, with a table half the size and no 2x2 temporaries.
    """
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1).unsqueeze(-3)


@lru_cache(maxsize=16)
def _text_rope(length: int, head_dim: int, device: torch.device) -> torch.Tensor:
    positions = torch.arange(length, dtype=torch.float32, device=device)
    angles = torch.outer(positions, frequencies_on(head_dim // 2, ROPE_MAX_PERIOD, device))
    return rotation_table(angles).unsqueeze(0)  # (1, L, 1, D/2, 2)


@lru_cache(maxsize=16)
def _visual_rope(
    grid: tuple[int, int, int],
    axes_dims: tuple[int, int, int],
    scale_factor: tuple[float, float, float],
    fractal: bool,
    device: torch.device,
) -> torch.Tensor:
    """RoPE table of a latent token grid ``(T, H, W)``, flattened to ``(1, T*H*W, 1, D/2, 2)``."""
    per_axis = []
    for size, dim, scale in zip(grid, axes_dims, scale_factor, strict=True):
        positions = torch.arange(size, dtype=torch.float32, device=device)
        per_axis.append(torch.outer(positions, frequencies_on(dim // 2, ROPE_MAX_PERIOD, device)) / scale)
    t, h, w = grid
    angles = torch.cat(
        [
            per_axis[0].view(t, 1, 1, -1).expand(t, h, w, -1),
            per_axis[1].view(1, h, 1, -1).expand(t, h, w, -1),
            per_axis[2].view(1, 1, w, -1).expand(t, h, w, -1),
        ],
        dim=-1,
    ).unsqueeze(0)
    rope = rotation_table(angles)  # (1, T, H, W, 1, D/2, 2)
    return to_fractal_order(rope) if fractal else rope.flatten(1, 3)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate the ``(batch, seq, heads, head_dim)`` pairs ``(a, b)`` by the table's ``(cos, sin)``:
    ``(a cos - b sin, a sin + b cos)``, in float32 as the reference computes it (the same products and sums, so
    the same bits), rounded to ``ROPE_OUTPUT_DTYPE`` and stored in ``x``'s dtype."""
    pairs = x.unflatten(-1, (-1, 2)).to(torch.float32)
    a, b = pairs.unbind(-1)
    cos, sin = rope.unbind(-1)
    rotated = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1)
    return rotated.flatten(-2).to(ROPE_OUTPUT_DTYPE).type_as(x)


def modulate(norm: nn.Module, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``norm(x) * (1 + scale) + shift`` in float32, stored in ``x``'s dtype.

    The products and sums are the reference's, done in place on the normalised copy: one float32 temporary of
    ``x``'s size instead of three.
    """
    normed = norm(x.float())
    return normed.mul_(scale.float() + 1.0).add_(shift.float()).type_as(x)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``x + gate * out`` in float32, stored in ``x``'s dtype.

    ``out`` (a sublayer's fresh output, used nowhere else) is scaled in place and ``x`` added to it (float addition
    is commutative, so the bits are the reference's).
    """
    return out.float().mul_(gate.float()).add_(x).type_as(x)


class TimeEmbeddings(nn.Module):
    def __init__(self, model_dim: int, time_dim: int):
        super().__init__()
        self.model_dim = model_dim
        self.in_layer = nn.Linear(model_dim, time_dim, bias=True)
        self.activation = nn.SiLU()
        self.out_layer = nn.Linear(time_dim, time_dim, bias=True)

    def forward(self, time: torch.Tensor) -> torch.Tensor:
        freqs = frequencies_on(self.model_dim // 2, TIME_MAX_PERIOD, time.device)
        args = torch.outer(time.to(torch.float32), freqs)
        embed = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.out_layer(self.activation(self.in_layer(embed)))


class TextEmbeddings(nn.Module):
    def __init__(self, text_dim: int, model_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(text_dim, model_dim, bias=True)
        self.norm = nn.LayerNorm(model_dim, elementwise_affine=True)

    def forward(self, text_embed: torch.Tensor) -> torch.Tensor:
        text_embed = self.in_layer(text_embed)
        return self.norm(text_embed).type_as(text_embed)


class VisualEmbeddings(nn.Module):
    def __init__(self, visual_dim: int, model_dim: int, patch_size: tuple[int, int, int]):
        super().__init__()
        self.patch_size = patch_size
        self.in_layer = nn.Linear(math.prod(patch_size) * visual_dim, model_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h, w, c = x.shape
        pt, ph, pw = self.patch_size
        x = x.view(b, t // pt, pt, h // ph, ph, w // pw, pw, c).permute(0, 1, 3, 5, 2, 4, 6, 7).flatten(4, 7)
        return self.in_layer(x)


class Modulation(nn.Module):
    def __init__(self, time_dim: int, model_dim: int, num_params: int):
        super().__init__()
        self.activation = nn.SiLU()
        self.out_layer = nn.Linear(time_dim, num_params * model_dim)

    def forward(self, time_embed: torch.Tensor) -> torch.Tensor:
        return self.out_layer(self.activation(time_embed))


# Projections of an attention layer, by the names of the reference's linear layers.
QKV_PROJECTIONS = ("to_query", "to_key", "to_value")  # self-attention: all three read the same input
KV_PROJECTIONS = ("to_key", "to_value")  # cross-attention: key and value read the text
FUSED_PROJECTION = "fused_projection"


class Attention(nn.Module):
    """Multi-head attention with per-head RMS-normalised queries and keys.

    The projections that read the same input may be merged into one linear layer, ``FUSED_PROJECTION`` (one GEMM
    reads the input once): see :mod:`kandinsky5.runtime.fusion`, which also keeps the checkpoint layout in
    ``state_dict()`` and ``load_state_dict``. Here, :meth:`project` only runs whichever layers are present.
    """

    def __init__(self, num_channels: int, head_dim: int):
        super().__init__()
        self.num_heads = num_channels // head_dim
        self.to_query = nn.Linear(num_channels, num_channels, bias=True)
        self.to_key = nn.Linear(num_channels, num_channels, bias=True)
        self.to_value = nn.Linear(num_channels, num_channels, bias=True)
        self.query_norm = nn.RMSNorm(head_dim)
        self.key_norm = nn.RMSNorm(head_dim)
        self.out_layer = nn.Linear(num_channels, num_channels, bias=True)
        self.register_module(FUSED_PROJECTION, None)

    @property
    def fused(self) -> tuple[str, ...]:
        """The names of the projections merged into ``FUSED_PROJECTION`` (read from its width), or ``()``."""
        layer = getattr(self, FUSED_PROJECTION)
        if layer is None:
            return ()
        return QKV_PROJECTIONS if layer.out_features == len(QKV_PROJECTIONS) * layer.in_features else KV_PROJECTIONS

    def fuse_projections(self, names: tuple[str, ...]) -> None:
        """Merge the linear layers ``names`` into one (see :func:`kandinsky5.runtime.fusion.fuse_projections`)."""
        from kandinsky5.runtime.fusion import fuse_projections

        fuse_projections(self, names)

    def unfuse_projections(self) -> None:
        """Undo :meth:`fuse_projections` (see :func:`kandinsky5.runtime.fusion.unfuse_projections`)."""
        from kandinsky5.runtime.fusion import unfuse_projections

        unfuse_projections(self)

    def project(self, x: torch.Tensor, context: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """Query from ``x``; key and value from ``context`` (``None``: self-attention on ``x``)."""
        # Slices of a fused output are strided views. Query and key are copied by their norms anyway; the value
        # goes to the attention kernel as it is, so it is made contiguous, as the unfused layer gives it (kernels
        # such as cuDNN's put conditions on the strides they accept).
        if self.fused == QKV_PROJECTIONS:
            if context is not None:
                raise ValueError("fused query/key/value projections serve self-attention only")
            query, key, value = self.fused_projection(x).chunk(3, dim=-1)
            return query, key, value.contiguous()
        context = x if context is None else context
        if self.fused == KV_PROJECTIONS:
            key, value = self.fused_projection(context).chunk(2, dim=-1)
            return self.to_query(x), key, value.contiguous()
        return self.to_query(x), self.to_key(context), self.to_value(context)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        rope: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        sparse: NablaParams | None = None,
        sequence_parallel: bool = False,
    ) -> torch.Tensor:
        """``sequence_parallel``: ``x`` holds the tokens a sequence-parallel stage shards and this is their
        self-attention (the visual blocks'); under Ulysses the choke point exchanges the rotated query, key and
        value for all tokens of this rank's heads (see :mod:`kandinsky5.attention.backends`)."""
        query, key, value = (t.unflatten(-1, (self.num_heads, -1)) for t in self.project(x, context))
        query = self.query_norm(query.float()).type_as(query)
        key = self.key_norm(key.float()).type_as(key)
        if rope is not None:
            query = apply_rope(query, rope)
            key = apply_rope(key, rope)
        # NABLA: the choke point computes the block map (after a Ulysses exchange: per head over all tokens) and
        # runs flex_attention on it (GPU) or SDPA with it expanded to a token mask (CPU)
        out = attention(query, key, value, mask=mask, sparse=sparse, sequence_parallel=sequence_parallel)
        return self.out_layer(out.flatten(-2, -1))


class FeedForward(nn.Module):
    """``out_layer(GELU(in_layer(x)))`` on tokens ``(..., tokens, dim)``, optionally in chunks of tokens.

    The hidden activation is ``ff_dim / dim`` (2.5 to 4) times the size of the tokens, and GELU makes a second one.
    With ``chunk_tokens`` set, at most that many tokens (of every batch row) go through the layers at a time and each
    chunk's output is written into one preallocated output: every token's row takes the same products and sums as
    unchunked (summed in the order the matrix multiply picks for the chunk's row count), and the hidden activation
    is never larger than a chunk's. The chunk size is set from outside
    (:func:`kandinsky5.runtime.chunking.enable_feed_forward_chunking`).
    """

    # Tokens per chunk of the sequence (dim -2); ``None``: all at once.
    chunk_tokens: int | None = None

    def __init__(self, dim: int, ff_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(dim, ff_dim, bias=False)
        self.activation = nn.GELU()
        self.out_layer = nn.Linear(ff_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chunk, tokens = self.chunk_tokens, x.shape[-2]
        if chunk is None or chunk >= tokens:
            return self.forward_unchunked(x)
        first = self.forward_unchunked(x[..., :chunk, :])
        out = first.new_empty((*x.shape[:-1], first.shape[-1]))
        out[..., :chunk, :] = first
        del first
        for start in range(chunk, tokens, chunk):
            out[..., start : start + chunk, :] = self.forward_unchunked(x[..., start : start + chunk, :])
        return out

    def forward_unchunked(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(self.activation(self.in_layer(x)))


class TextBlock(nn.Module):
    """Self-attention and feed-forward over the text tokens."""

    def __init__(self, model_dim: int, time_dim: int, ff_dim: int, head_dim: int):
        super().__init__()
        self.text_modulation = Modulation(time_dim, model_dim, 6)
        self.self_attention_norm = nn.LayerNorm(model_dim, elementwise_affine=False)
        self.self_attention = Attention(model_dim, head_dim)
        self.feed_forward_norm = nn.LayerNorm(model_dim, elementwise_affine=False)
        self.feed_forward = FeedForward(model_dim, ff_dim)

    def forward(self, x, time_embed, rope, text_mask=None) -> torch.Tensor:
        shift, scale, gate, ff_shift, ff_scale, ff_gate = self.text_modulation(time_embed).unsqueeze(1).chunk(6, -1)
        out = self.self_attention(modulate(self.self_attention_norm, x, shift, scale), rope=rope, mask=text_mask)
        x = gated_residual(x, gate, out)
        out = self.feed_forward(modulate(self.feed_forward_norm, x, ff_shift, ff_scale))
        return gated_residual(x, ff_gate, out)


class VisualBlock(nn.Module):
    """Self-attention over the video tokens, cross-attention to the text, feed-forward."""

    def __init__(self, model_dim: int, time_dim: int, ff_dim: int, head_dim: int):
        super().__init__()
        self.visual_modulation = Modulation(time_dim, model_dim, 9)
        self.self_attention_norm = nn.LayerNorm(model_dim, elementwise_affine=False)
        self.self_attention = Attention(model_dim, head_dim)
        self.cross_attention_norm = nn.LayerNorm(model_dim, elementwise_affine=False)
        self.cross_attention = Attention(model_dim, head_dim)
        self.feed_forward_norm = nn.LayerNorm(model_dim, elementwise_affine=False)
        self.feed_forward = FeedForward(model_dim, ff_dim)

    def forward(self, x, text, time_embed, rope, sparse=None, text_mask=None) -> torch.Tensor:
        params = self.visual_modulation(time_embed).unsqueeze(1).chunk(9, -1)
        (sa_shift, sa_scale, sa_gate, ca_shift, ca_scale, ca_gate, ff_shift, ff_scale, ff_gate) = params
        out = self.self_attention(
            modulate(self.self_attention_norm, x, sa_shift, sa_scale), rope=rope, sparse=sparse, sequence_parallel=True
        )
        x = gated_residual(x, sa_gate, out)
        out = self.cross_attention(modulate(self.cross_attention_norm, x, ca_shift, ca_scale), text, mask=text_mask)
        x = gated_residual(x, ca_gate, out)
        out = self.feed_forward(modulate(self.feed_forward_norm, x, ff_shift, ff_scale))
        return gated_residual(x, ff_gate, out)


class OutLayer(nn.Module):
    def __init__(self, model_dim: int, time_dim: int, visual_dim: int, patch_size: tuple[int, int, int]):
        super().__init__()
        self.patch_size = patch_size
        self.modulation = Modulation(time_dim, model_dim, 2)
        self.norm = nn.LayerNorm(model_dim, elementwise_affine=False)
        self.out_layer = nn.Linear(model_dim, math.prod(patch_size) * visual_dim, bias=True)

    def forward(self, x: torch.Tensor, time_embed: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(time_embed).chunk(2, -1)
        x = modulate(self.norm, x, shift[:, None, None, None], scale[:, None, None, None])
        x = self.out_layer(x)
        b, t, h, w, _ = x.shape
        pt, ph, pw = self.patch_size
        x = x.view(b, t, h, w, -1, pt, ph, pw).permute(0, 1, 5, 2, 6, 3, 7, 4)
        return x.reshape(b, t * pt, h * ph, w * pw, -1)


VISUAL_BLOCKS = "visual_blocks"
# Stages of the forward that wrap_stage can wrap.
WRAPPABLE_STAGES = (VISUAL_BLOCKS,)


@dataclasses.dataclass(frozen=True, eq=False)
class VisualBlocksInputs:
    """What the visual blocks read besides the visual tokens; built anew by each forward.

    ``text``: ``(batch, text_len, model_dim)``, out of the text blocks. ``time_embed``: ``(batch, time_dim)``.
    ``rope``: ``(1, seq, 1, head_dim / 2, 2)``, one row per visual token, in the tokens' order. ``sparse``: NABLA's
    parameters, or ``None`` for dense attention. ``text_mask``: ``(batch, 1, 1, text_len)``, True for real text
    tokens, or ``None``. ``grid``: the latent token grid ``(T, H, W)`` the ``seq = T*H*W`` tokens come from.
    """

    text: torch.Tensor
    time_embed: torch.Tensor
    rope: torch.Tensor
    sparse: NablaParams | None
    text_mask: torch.Tensor | None
    grid: tuple[int, int, int]


# A stage as a wrapper calls it: ``run(visual, inputs) -> visual``, the call's context already bound.
StageRun = Callable[[torch.Tensor, VisualBlocksInputs], torch.Tensor]


class StageWrapper(Protocol):
    """Runs in place of a stage: ``wrapper(run, visual, inputs, context=context) -> visual``.

    ``visual`` is the stage's input, ``(batch, seq, model_dim)`` tokens (fractal order under NABLA), and the result
    must have its shape. ``run(visual, inputs)`` runs what the wrapper wraps (the stage itself or an inner wrapper);
    a wrapper may call it on other arguments (a shard of the sequence), several times, or not at all (a step cache
    returning ``visual`` plus a cached residual). ``context`` tells which guidance branch each equal chunk of the
    batch computes and the step (``None`` when the caller gave none).
    """

    def __call__(
        self, run: StageRun, visual: torch.Tensor, inputs: VisualBlocksInputs, *, context: ForwardContext | None
    ) -> torch.Tensor: ...


def _bind(wrapper: StageWrapper, run: StageRun, context: ForwardContext | None) -> StageRun:
    def wrapped(visual: torch.Tensor, inputs: VisualBlocksInputs) -> torch.Tensor:
        return wrapper(run, visual, inputs, context=context)

    return wrapped


class Kandinsky5Transformer3DModel(ModelBase):
    """The Kandinsky 5 DiT. Inputs and outputs are channels-last latents ``(batch, T, H, W, C)``."""

    config_class = TransformerConfig
    _keep_in_fp32_modules = ("time_embeddings", "modulation", "visual_modulation", "text_modulation")
    # Regional compilation targets (see kandinsky5.runtime.compile).
    _repeated_blocks = ("TextBlock", "VisualBlock")

    def __init__(self, config: TransformerConfig):
        super().__init__(config)
        c = config
        self.attention_backend: str | None = None
        # wrap_stage's wrappers per stage, in registration order (configuration, like hooks)
        self._stage_wrappers: dict[str, OrderedDict[int, StageWrapper]] = {
            stage: OrderedDict() for stage in WRAPPABLE_STAGES
        }
        # enable_cache's step cache (a visual-blocks wrapper) and its wrap_stage handle
        self._cache: Any = None
        self._cache_handle: RemovableHandle | None = None
        self.time_embeddings = TimeEmbeddings(c.model_dim, c.time_dim)
        self.text_embeddings = TextEmbeddings(c.in_text_dim, c.model_dim)
        self.pooled_text_embeddings = TextEmbeddings(c.in_text_dim2, c.time_dim)
        self.visual_embeddings = VisualEmbeddings(c.visual_input_dim, c.model_dim, c.patch_size)
        self.text_transformer_blocks = nn.ModuleList(
            TextBlock(c.model_dim, c.time_dim, c.ff_dim, c.head_dim) for _ in range(c.num_text_blocks)
        )
        self.visual_transformer_blocks = nn.ModuleList(
            VisualBlock(c.model_dim, c.time_dim, c.ff_dim, c.head_dim) for _ in range(c.num_visual_blocks)
        )
        self.out_layer = OutLayer(c.model_dim, c.time_dim, c.out_visual_dim, c.patch_size)

    @property
    def visual_cond(self) -> bool:
        return self.config.visual_cond

    def set_attention_backend(self, name: str | None) -> None:
        """Attention backend for this model's forward (``None``: the process default); see kandinsky5.attention."""
        self.attention_backend = None if name is None else validate_backend(name)

    # ---- transforms applied from outside (kandinsky5.runtime); thin delegates ----

    def fuse_qkv_projections(self) -> None:
        """Merge each self-attention's query, key and value projections, and each cross-attention's key and value
        projections, into one linear layer (diffusers' method name; see :mod:`kandinsky5.runtime.fusion`)."""
        from kandinsky5.runtime.fusion import fuse_qkv_projections

        fuse_qkv_projections(self)

    def unfuse_qkv_projections(self) -> None:
        """Undo :meth:`fuse_qkv_projections`."""
        from kandinsky5.runtime.fusion import unfuse_qkv_projections

        unfuse_qkv_projections(self)

    def enable_forward_chunking(self, chunk_tokens: int | None = None) -> None:
        """Run every block's feed-forward in chunks of at most ``chunk_tokens`` tokens (``None``: unchunked), same
        values, a smaller hidden activation (diffusers' method name; unlike diffusers', ``None`` turns chunking off
        and the chunks always split the token sequence). See :mod:`kandinsky5.runtime.chunking`."""
        from kandinsky5.runtime.chunking import enable_feed_forward_chunking

        enable_feed_forward_chunking(self, chunk_tokens)

    def disable_forward_chunking(self) -> None:
        """Undo :meth:`enable_forward_chunking`."""
        from kandinsky5.runtime.chunking import disable_feed_forward_chunking

        disable_feed_forward_chunking(self)

    def compile(self, mode: str | None = None, dynamic: bool | None = None, fullgraph: bool = False, **kwargs):
        """Regional compilation: ``torch.compile`` each text and visual block in place (see
        :func:`kandinsky5.runtime.compile.compile_repeated_blocks`). Returns the model."""
        from kandinsky5.runtime.compile import compile_repeated_blocks

        return compile_repeated_blocks(self, mode=mode, dynamic=dynamic, fullgraph=fullgraph, **kwargs)

    def wrap_stage(self, stage: str, wrapper: StageWrapper) -> RemovableHandle:
        """Run ``wrapper`` in place of the forward's stage ``stage`` (one of ``WRAPPABLE_STAGES``) from now on;
        ``handle.remove()`` unwraps it. See :class:`StageWrapper` for what a wrapper receives.

        Wrappers nest: the one wrapped last is outermost, and its ``run`` calls the one wrapped before it.
        """
        if stage not in self._stage_wrappers:
            raise ValueError(f"unknown stage {stage!r}; wrappable stages: {', '.join(WRAPPABLE_STAGES)}")
        wrappers = self._stage_wrappers[stage]
        handle = RemovableHandle(wrappers)
        wrappers[handle.id] = wrapper
        return handle

    def enable_cache(self, config: Any) -> Any:
        """Turn on a step cache (diffusers' method name): ``config`` is a
        :class:`~kandinsky5.sampling.caches.MagCacheConfig`. Wraps the visual blocks (see :meth:`wrap_stage`) and
        returns the wrapper, which reports ``skipped_calls`` / ``total_calls`` of the last generation. A second
        call replaces the cache. The cache approximates: outputs differ from the exact path."""
        from kandinsky5.sampling.caches import make_cache

        cache = make_cache(config)
        self.disable_cache()
        self._cache_handle = self.wrap_stage(VISUAL_BLOCKS, cache)
        self._cache = cache
        return cache

    def disable_cache(self) -> None:
        """Turn off the step cache of :meth:`enable_cache` (nothing when there is none)."""
        if self._cache_handle is not None:
            self._cache_handle.remove()
        self._cache = self._cache_handle = None

    @property
    def cache(self) -> Any:
        """The step cache :meth:`enable_cache` turned on, or ``None``."""
        return self._cache

    # ---- the forward ----

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        pooled_projections: torch.Tensor,
        visual_rope_pos: Any = None,
        text_rope_pos: Any = None,
        scale_factor: tuple[float, float, float] = (1.0, 1.0, 1.0),
        sparse_params: NablaParams | Mapping[str, Any] | None = None,
        return_dict: bool = True,
        encoder_attention_mask: torch.Tensor | None = None,
        context: ForwardContext | None = None,
    ):
        """One denoiser evaluation.

        ``visual_rope_pos``/``text_rope_pos`` are accepted for reference compatibility; positions are always
        ``0..n-1`` along each axis, so the tables are derived from the shapes and cached.
        ``sparse_params``: NABLA's :class:`~kandinsky5.attention.nabla.NablaParams`, or the reference's dict.
        ``encoder_attention_mask`` (``(batch, text_len)``, True for real tokens) keeps real tokens from attending
        to padding when prompts of different lengths share a batch (the reference lets them).
        ``context`` (which guidance branch each batch chunk computes, the step) goes to the stage wrappers only.
        """
        sparse = as_nabla_params(sparse_params)
        with attention_backend(self.attention_backend):
            text = self.embed_text(encoder_hidden_states)
            time_embed = self.embed_time(timestep, pooled_projections)
            fractal = sparse is not None and sparse.fractal
            visual, grid = self.embed_visual(hidden_states, fractal)
            text_mask = text_attention_mask(encoder_attention_mask, text.device)
            text = self.text_blocks(text, time_embed, text_mask)
            rope = self.visual_rope(grid, scale_factor, fractal, visual.device)
            inputs = VisualBlocksInputs(text, time_embed, rope, sparse, text_mask, grid)
            visual = self.visual_blocks(visual, inputs, context=context)
            sample = self.output_head(visual, time_embed, grid, fractal)
        if not return_dict:
            return (sample,)
        return Transformer3DOutput(sample=sample)

    def embed_text(self, text: torch.Tensor) -> torch.Tensor:
        """Text embeddings ``(batch, text_len, in_text_dim)`` -> tokens ``(batch, text_len, model_dim)``."""
        return self.text_embeddings(text)

    def embed_time(self, timestep: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """The conditioning vector ``(batch, time_dim)``: timestep embedding plus pooled text embedding."""
        return self.time_embeddings(timestep) + self.pooled_text_embeddings(pooled)

    def embed_visual(self, latents: torch.Tensor, fractal: bool) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Latents ``(batch, T, H, W, C)`` -> (tokens ``(batch, seq, model_dim)``, token grid ``(t, h, w)``), the
        tokens in fractal order when ``fractal`` (NABLA), else row-major."""
        visual = self.visual_embeddings(latents)
        grid = tuple(visual.shape[1:4])
        return (to_fractal_order(visual) if fractal else visual.flatten(1, 3)), grid

    def text_blocks(self, text: torch.Tensor, time_embed: torch.Tensor, text_mask: torch.Tensor | None) -> torch.Tensor:
        """The text transformer blocks."""
        rope = _text_rope(text.shape[1], self.config.head_dim, text.device)
        for block in self.text_transformer_blocks:
            text = block(text, time_embed, rope, text_mask)
        return text

    def visual_rope(
        self, grid: tuple[int, int, int], scale_factor: tuple[float, ...], fractal: bool, device: torch.device
    ) -> torch.Tensor:
        """RoPE table of the visual tokens, in their order (cached per shape)."""
        scale = tuple(float(s) for s in scale_factor)
        return _visual_rope(grid, tuple(self.config.axes_dims), scale, fractal, device)

    def visual_blocks(
        self, visual: torch.Tensor, inputs: VisualBlocksInputs, context: ForwardContext | None = None
    ) -> torch.Tensor:
        """The visual transformer blocks on tokens ``(batch, seq, model_dim)``, through the wrappers of
        :meth:`wrap_stage` when there are any."""
        run: StageRun = self.run_visual_blocks
        for wrapper in self._stage_wrappers[VISUAL_BLOCKS].values():
            run = _bind(wrapper, run, context)
        return run(visual, inputs)

    def run_visual_blocks(self, visual: torch.Tensor, inputs: VisualBlocksInputs) -> torch.Tensor:
        """The visual blocks themselves, unwrapped."""
        for block in self.visual_transformer_blocks:
            visual = block(visual, inputs.text, inputs.time_embed, inputs.rope, inputs.sparse, inputs.text_mask)
        return visual

    def output_head(
        self, visual: torch.Tensor, time_embed: torch.Tensor, grid: tuple[int, int, int], fractal: bool
    ) -> torch.Tensor:
        """Tokens ``(batch, seq, model_dim)`` -> the velocity ``(batch, T, H, W, out_visual_dim)``."""
        visual = from_fractal_order(visual, grid) if fractal else visual.unflatten(1, grid)
        return self.out_layer(visual, time_embed)


def text_attention_mask(text_valid: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """``(batch, text_len)`` validity (True for real tokens) -> the ``(batch, 1, 1, text_len)`` attention mask."""
    return None if text_valid is None else text_valid[:, None, None, :].to(device, torch.bool)


@dataclasses.dataclass
class Transformer3DOutput:
    sample: torch.Tensor
