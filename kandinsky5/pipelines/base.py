"""What every pipeline shares (text-to-video, image-to-video, and through ``image.py`` text-to-image and image
editing): loading, placement, prompt encoding, latents and decoding, and ``__call__`` as a few phases around the
sampling loop (``kandinsky5/sampling/loop.py``).

Several processes (``torchrun``) share a call after :meth:`Kandinsky5PipelineBase.enable_parallelism`: Ulysses
sequence parallelism and CFG parallelism (``kandinsky5/runtime/parallel``); every rank returns the same output.

A call turns its arguments into one :class:`~kandinsky5.pipelines.request.GenerationRequest` (defaults filled and
everything validated before any work), then runs the phases under a per-call
:class:`~kandinsky5.sampling.control.RunControl` (progress, cancellation, previews). Nothing of a call is kept on
the pipeline: the properties diffusers' callbacks read (``guidance_scale``, ``num_timesteps``) come from the call
running in the current thread. A subclass overrides only the conditioning (:meth:`prepare_condition`,
:meth:`finalize_latents`, ``num_frozen_latent_frames``, :meth:`qwen_images`) and, for images, the output's form.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from kandinsky5.attention.nabla import NablaParams, sliding_window_block_mask
from kandinsky5.loading.hub import resolve_checkpoint
from kandinsky5.models import text_encoders as te
from kandinsky5.models.nabla_params import nabla_params_for_latents
from kandinsky5.pipelines.adapters import ProgressBar, StepCallback
from kandinsky5.pipelines.loading import check_load_arguments, load_components
from kandinsky5.pipelines.lora import LoraMixin
from kandinsky5.pipelines.output import KandinskyPipelineOutput, decode_latents, postprocess_video
from kandinsky5.pipelines.prompt_expansion import PromptExpansionMixin
from kandinsky5.pipelines.registry import check_checkpoint_class
from kandinsky5.pipelines.request import (
    CALLBACK_TENSOR_INPUTS,
    DEFAULT_MAX_SEQUENCE_LENGTH,
    GenerationRequest,
    ModelFacts,
    check_reference_inputs,
    noise_latent_shape,
)
from kandinsky5.resolutions import rope_scale_factor
from kandinsky5.runtime.lora import sync as sync_lora
from kandinsky5.runtime.offload import (
    ModelCpuOffload,
    OffloadPlan,
    SequentialCpuOffload,
    offload_components,
    offload_execution_device,
)
from kandinsky5.runtime.parallel.mesh import ParallelMesh, broadcast_from_main, use_mesh
from kandinsky5.sampling import noise
from kandinsky5.sampling.control import Phase, RunControl
from kandinsky5.sampling.guidance import NO_GUIDANCE_SCALE, Guidance, TextConditioning, make_guidance
from kandinsky5.sampling.loop import denoise
from kandinsky5.sampling.preview import LatentPreviewer
from kandinsky5.variants import Task, Variant, variant_for_checkpoint


@dataclass(frozen=True)
class RunningCall:
    """What diffusers' callbacks may ask the pipeline about the call running in this thread."""

    guidance_scale: float
    num_timesteps: int


logger = logging.getLogger(__name__)

_RUNNING_CALL: ContextVar[RunningCall | None] = ContextVar("kandinsky5_running_call", default=None)


class Kandinsky5PipelineBase(LoraMixin, PromptExpansionMixin):
    """Shared machinery of the Kandinsky 5 pipelines, video and image (Diffusers-compatible API)."""

    # model_index.json class names this pipeline loads
    checkpoint_classes: ClassVar[tuple[str, ...]] = ()
    task: ClassVar[Task] = Task.TEXT_TO_VIDEO
    # what a call returns, and how decoded pixels become it
    output_class: ClassVar[type] = KandinskyPipelineOutput
    # the editing model's Qwen2.5-VL also sees the source image (its vision tower runs)
    text_encoder_sees_images: ClassVar[bool] = False
    # leading latent frames given as condition: the sampler never steps them (image-to-video: the image's frame)
    num_frozen_latent_frames: ClassVar[int] = 0
    model_cpu_offload_seq = "text_encoder->text_encoder_2->transformer->vae"
    _callback_tensor_inputs: ClassVar[list[str]] = list(CALLBACK_TENSOR_INPUTS)
    prompt_template = te.VIDEO_PROMPT_TEMPLATE
    # tokens cropped from Qwen's output beyond the template's prefix (the reference's choice per template)
    prompt_crop_past_prefix: ClassVar[int] = 0

    def __init__(self, transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, scheduler):
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.text_encoder_2 = text_encoder_2
        self.tokenizer_2 = tokenizer_2
        self.scheduler = scheduler
        self.vae_scale_factor_spatial, self.vae_scale_factor_temporal = vae_compression(vae)
        self.prompt_template_encode_start_idx = (
            te.template_prefix_length(tokenizer, self.prompt_template) + self.prompt_crop_past_prefix
            if tokenizer is not None
            else None
        )
        self._progress_bar_config: dict[str, Any] = {}
        # Classifier-free guidance: condition and negative in one transformer call (True) or two (the reference).
        # Equal results; which is faster is for the GPU benchmark to tell (benchmarks/pipeline.py).
        self.batched_guidance = False
        # diffusers' interrupt flag, set by step callbacks (``pipe._interrupt = True``): reset when a call starts
        self._interrupt = False
        # set by enable_model_cpu_offload / enable_sequential_cpu_offload / enable_block_offload
        self._offload_plan: OffloadPlan | None = None
        # the official checkpoint this is (set by from_pretrained; None when unknown): its defaults fill the
        # __call__ arguments left as None
        self.model_variant: Variant | None = None
        # set by enable_parallelism: the process mesh of a multi-process run and the Ulysses stage wrapper's handle
        self._parallel: ParallelMesh | None = None
        self._parallel_handle = None

    # ------------------------------------------------------------------ loading and placement

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        torch_dtype: torch.dtype | None = None,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        **kwargs,
    ):
        """Load a Diffusers-layout checkpoint from a local folder or a hub repository id.

        Components passed as keyword arguments (``transformer=...``) are used instead of loading them.
        """
        check_load_arguments(kwargs, torch_dtype)
        root = resolve_checkpoint(pretrained_model_name_or_path, revision, cache_dir, local_files_only, token)
        check_checkpoint_class(root, cls)
        variant = variant_for_checkpoint(pretrained_model_name_or_path, root)
        pipe = cls(**load_components(root, variant, torch_dtype, kwargs, cls.text_encoder_sees_images))
        pipe.model_variant = variant
        return pipe

    @property
    def components(self) -> dict[str, Any]:
        return {
            "transformer": self.transformer,
            "vae": self.vae,
            "text_encoder": self.text_encoder,
            "tokenizer": self.tokenizer,
            "text_encoder_2": self.text_encoder_2,
            "tokenizer_2": self.tokenizer_2,
            "scheduler": self.scheduler,
        }

    def _modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.text_encoder, self.text_encoder_2, self.transformer, self.vae) if m is not None]

    def to(self, *args, **kwargs):
        """Move the networks to a device and/or dtype (``pipe.to("cuda")``, ``pipe.to(torch.bfloat16)``).

        A dtype keeps the transformer's float32 islands in float32, as loading does.
        """
        device, dtype = None, kwargs.pop("dtype", None)
        device = kwargs.pop("device", None)
        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg
            else:
                device = arg
        if kwargs:
            raise TypeError(f"to() got unexpected keyword arguments {sorted(kwargs)}")
        if dtype is not None and self._offload_plan is not None and self._offload_plan.holds_host_copies:
            raise ValueError(
                f"`{self._offload_plan.method}` keeps pinned host copies of the blocks: cast the pipeline "
                f"(`pipe.to({dtype})`) before enabling it, or call `pipe.remove_all_hooks()` first"
            )
        if device is not None and self._offload_plan is not None:
            self._offload_plan.pipeline_moving(torch.device(device))  # sequential: error; model: warning
        for module in self._modules():
            if dtype is not None:
                if hasattr(module, "to_dtype"):
                    module.to_dtype(dtype)
                else:
                    module.to(dtype)
            if device is not None:
                module.to(device)
        if dtype is not None:
            sync_lora(self.transformer)  # to_dtype casts parameters; the LoRA branches follow
        return self

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    @property
    def _execution_device(self) -> torch.device:
        if self._offload_plan is not None:
            return self._offload_plan.device
        return self.transformer.device

    def maybe_free_model_hooks(self) -> None:
        """Called at the end of a generation: with offload on, every component goes back to the CPU and the hooks
        stay armed for the next call; nothing without offload."""
        if self._offload_plan is not None:
            self._offload_plan.free()

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str | None = None) -> None:
        """Keep the networks on the CPU; each moves to the execution device (``device``, default the machine's
        accelerator, index ``gpu_id``) when it runs and back when the next one starts (see runtime/offload.py)."""
        self._enable_offload(ModelCpuOffload, gpu_id, device)

    def enable_sequential_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str | None = None):
        """Keep the weights on the CPU; each layer's are copied to the execution device only for its forward.
        Least memory, slowest (see runtime/offload.py)."""
        self._enable_offload(SequentialCpuOffload, gpu_id, device)

    def enable_block_offload(
        self,
        blocks_on_gpu: int = 1,
        prefetch: int = 1,
        gpu_id: int | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """Model offload in which the transformer's blocks and the text encoder's decoder layers rest in pinned host
        memory and stream to the device ``prefetch`` blocks ahead of the computing one, on a side stream, through
        ``blocks_on_gpu + prefetch`` reused device buffers per group of blocks (see runtime/block_offload.py)."""
        from kandinsky5.runtime.block_offload import BlockOffload, check_stream_settings

        check_stream_settings(blocks_on_gpu, prefetch)
        options = {"blocks_on_gpu": blocks_on_gpu, "prefetch": prefetch, "vision_input": self.text_encoder_sees_images}
        self._enable_offload(BlockOffload, gpu_id, device, **options)

    def _enable_offload(self, plan_class: type[OffloadPlan], gpu_id, device, **options) -> None:
        previous = self._offload_plan.device if self._offload_plan is not None else None
        execution_device = offload_execution_device(plan_class.method, gpu_id, device, previous)
        components = offload_components(self)
        self.remove_all_hooks()
        self.to("cpu")
        self._offload_plan = plan_class(components, execution_device, **options)

    def remove_all_hooks(self) -> None:
        """Turn offloading off: the hooks are removed and the networks left on the CPU."""
        if self._offload_plan is not None:
            self._offload_plan.remove()
            self._offload_plan = None

    # ------------------------------------------------------------------ transforms

    def fuse_qkv_projections(self) -> None:
        """Fuse the transformer's attention projections (see ``Kandinsky5Transformer3DModel.fuse_qkv_projections``);
        offload hooks, when on, are re-armed for the new layers."""
        self._rebuild_layers(self.transformer.fuse_qkv_projections)

    def unfuse_qkv_projections(self) -> None:
        self._rebuild_layers(self.transformer.unfuse_qkv_projections)

    def _rebuild_layers(self, transform) -> None:
        plan = self._offload_plan
        self.remove_all_hooks()
        transform()
        sync_lora(self.transformer)  # LoRA branches follow the new layers
        if plan is not None:
            self._enable_offload(type(plan), None, plan.device, **plan.options)

    def quantize(self, transformer: str | None = None, text_encoder: str | None = None) -> None:
        """Low-bit weights, applied in place before any offloading (see runtime/quantization.py):
        ``transformer`` "fp8" (float8 weights and activations, per-row scales; GPUs with FP8 units) or "int8"
        (weight-only); ``text_encoder`` "int8" (torchao) or "nf4" (bitsandbytes). The approximation's error
        against the exact path is stated and tested there."""
        from kandinsky5.runtime.quantization import quantize_pipeline

        quantize_pipeline(self, transformer=transformer, text_encoder=text_encoder)

    # ------------------------------------------------------------------ several processes

    def enable_parallelism(
        self, ulysses_degree: int | None = None, cfg_degree: int | None = None, shard_weights: bool = False
    ) -> ParallelMesh:
        """Share every call among the processes of the default process group (``torch.distributed`` initialised
        first, e.g. under ``torchrun``; every rank calls this, then every rank calls the pipeline with the same
        arguments and gets the same output). Returns the mesh (also ``pipe._parallel``).

        ``cfg_degree`` 2: the condition's and the negative prompt's transformer calls run on two ranks at once
        (:class:`~kandinsky5.runtime.parallel.cfg.CfgParallelGuidance`). ``ulysses_degree`` n: each branch's call is
        shared by n ranks, each holding 1/n of the visual tokens, exchanging them for 1/n of the attention heads
        around each visual self-attention (:mod:`kandinsky5.runtime.parallel.ulysses`); n must divide the heads and
        the token count. ``ulysses_degree x cfg_degree`` must equal the world size; left as ``None`` they are
        derived from it: CFG 2 when the model runs with guidance by default and the world size is even, the rest
        Ulysses. Degree 1 everywhere is the single-process path (no exchange at all).

        ``shard_weights``: the transformer's blocks are sharded over all ranks with FSDP2, each block's weights
        gathered for its forward (:func:`~kandinsky5.runtime.parallel.fsdp.shard_transformer`; permanent:
        :meth:`disable_parallelism` leaves them sharded). Shard after fusing or quantizing, before ``compile()``.

        Text is encoded once, on rank 0, and broadcast; every rank draws the same noise from the same generator
        (pass each rank the same seed); the VAE decode's tiles are shared among the ranks. Place the pipeline on
        ``mesh.device`` (its GPU) yourself. RuntimeError when ``torch.distributed`` is not initialised;
        ValueError when the degrees do not fit the world size or the heads.
        """
        import torch.distributed as dist

        from kandinsky5.models.dit import VISUAL_BLOCKS
        from kandinsky5.runtime.parallel.mesh import ParallelConfig, require_distributed
        from kandinsky5.runtime.parallel.ulysses import UlyssesStage, check_heads

        require_distributed()
        variant = self.model_variant
        guidance = variant is None or variant.defaults.guidance_scale > NO_GUIDANCE_SCALE
        config = ParallelConfig.resolve(dist.get_world_size(), ulysses_degree, cfg_degree, guidance=guidance)
        transformer_config = self.transformer.config
        if config.ulysses_degree > 1:
            check_heads(transformer_config.model_dim // transformer_config.head_dim, config.ulysses_degree)
        self.disable_parallelism()
        mesh = ParallelMesh.build(config)
        if config.ulysses_degree > 1:
            self._parallel_handle = self.transformer.wrap_stage(VISUAL_BLOCKS, UlyssesStage.for_mesh(mesh))
        if shard_weights:
            from kandinsky5.runtime.parallel.fsdp import is_sharded, shard_transformer

            if not is_sharded(self.transformer):
                shard_transformer(self.transformer, mesh)
        self._parallel = mesh
        return mesh

    def disable_parallelism(self) -> None:
        """Back to single-process calls (the process groups stay; destroying them is the caller's)."""
        if self._parallel_handle is not None:
            self._parallel_handle.remove()
        self._parallel = self._parallel_handle = None

    # ------------------------------------------------------------------ step cache

    def enable_magcache(self, resolution_class: str | None = None, **settings):
        """Turn on MagCache with the official ratios of ``self.model_variant`` (at ``resolution_class``, "512" or
        "1024"; default: the variant's default size's class) and ``settings`` (``threshold``, ``max_skip_steps``,
        ``retention_ratio``: see :class:`~kandinsky5.sampling.caches.MagCacheConfig`). Returns the cache (its
        ``skipped_calls`` / ``total_calls`` describe the last generation). ``ValueError`` when the variant is
        unknown or has no official ratios. It approximates: outputs differ from the exact path."""
        from kandinsky5.sampling.caches import magcache_config_for

        return self.transformer.enable_cache(magcache_config_for(self.model_variant, resolution_class, **settings))

    def disable_magcache(self) -> None:
        """Turn the step cache off (``self.transformer.disable_cache()``)."""
        self.transformer.disable_cache()

    # ------------------------------------------------------------------ progress bar

    def set_progress_bar_config(self, **kwargs) -> None:
        """Options for the tqdm progress bar, e.g. ``disable=True``."""
        self._progress_bar_config = dict(kwargs)

    # ------------------------------------------------------------------ the running call (diffusers' properties)

    @property
    def guidance_scale(self) -> float:
        call = _RUNNING_CALL.get()
        return NO_GUIDANCE_SCALE if call is None else call.guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self.guidance_scale > NO_GUIDANCE_SCALE

    @property
    def num_timesteps(self) -> int:
        call = _RUNNING_CALL.get()
        return 0 if call is None else call.num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    @interrupt.setter
    def interrupt(self, value: bool) -> None:
        self._interrupt = bool(value)

    # ------------------------------------------------------------------ sizes and attention settings

    @staticmethod
    def _get_scale_factor(height: int, width: int) -> tuple[float, float, float]:
        """RoPE scale factor: the 512 class when both sides lie in 480..854 pixels, else the 1024 class."""
        return rope_scale_factor(height, width)

    @staticmethod
    def fast_sta_nabla(T: int, H: int, W: int, wT: int = 3, wH: int = 3, wW: int = 3, device="cuda") -> torch.Tensor:
        """Sliding-window block map over a ``T x H x W`` grid of tiles, ``(T*H*W, T*H*W)`` boolean."""
        return sliding_window_block_mask(T, H, W, wT, wH, wW, device=device)

    def get_sparse_params(self, sample: torch.Tensor, device) -> NablaParams | None:
        """NABLA's parameters for latents ``sample`` ``(batch, T, H, W, C)``; ``None`` for dense checkpoints
        (the reference returns the same as a dict: ``NablaParams.to_reference()``)."""
        return nabla_params_for_latents(self.transformer.config, sample.shape, device, self.vae_scale_factor_spatial)

    # ------------------------------------------------------------------ prompts

    def _encode_prompt_qwen(
        self, prompt: list[str], device=None, max_sequence_length: int = 256, dtype=None, images=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        device = device or self._execution_device
        dtype = dtype or self.text_encoder.dtype
        return te.encode_qwen(
            self.tokenizer,
            self.text_encoder,
            prompt,
            self.prompt_template_encode_start_idx,
            max_sequence_length,
            device,
            dtype,
            template=self.prompt_template,
            images=images,
        )

    def _encode_prompt_clip(self, prompt: list[str], device=None, dtype=None):
        device = device or self._execution_device
        dtype = dtype or self.text_encoder_2.dtype
        return te.encode_clip(self.tokenizer_2, self.text_encoder_2, prompt, device, dtype)

    @torch.no_grad()
    def encode_prompt(
        self,
        prompt: str | list[str],
        num_videos_per_prompt: int = 1,
        max_sequence_length: int = 512,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Qwen embeddings ``(batch*n, seq, dim)``, CLIP pooled ``(batch*n, dim)`` and ``cu_seqlens``
        ``(batch*n + 1,)``, each prompt repeated ``n = num_videos_per_prompt`` times in a row."""
        return self._embed_prompts(prompt, num_videos_per_prompt, max_sequence_length, device, dtype)

    def _embed_prompts(self, prompt, num_per_prompt: int, max_sequence_length: int, device, dtype, images=None):
        """What :meth:`encode_prompt` returns; ``images`` (:class:`~kandinsky5.models.text_encoders.QwenImages`,
        one per prompt) for a text encoder that sees the source image."""
        device = device or self._execution_device
        dtype = dtype or self.text_encoder.dtype
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [te.prompt_clean(p) for p in prompts]
        embeds_qwen, cu_seqlens = self._encode_prompt_qwen(prompts, device, max_sequence_length, dtype, images)
        embeds_clip = self._encode_prompt_clip(prompts, device, dtype)
        return repeat_embeddings(embeds_qwen, embeds_clip, cu_seqlens, num_per_prompt)

    def qwen_images(self, request: GenerationRequest):
        """The source images the text encoder sees with the prompts (none here; see the editing pipeline)."""
        return None

    # ------------------------------------------------------------------ validation

    # diffusers' check_inputs (the reference's checks, raising ``RequestError`` naming the parameter); a call makes
    # these and the rest through GenerationRequest
    check_inputs = staticmethod(check_reference_inputs)

    def model_facts(self) -> ModelFacts:
        """What validating a request needs to know of this pipeline's model."""
        return ModelFacts.of_pipeline(self)

    # ------------------------------------------------------------------ latents and conditioning

    def prepare_latents(
        self,
        batch_size: int,
        num_channels_latents: int = 16,
        height: int = 480,
        width: int = 832,
        num_frames: int = 81,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """See :meth:`_prepare_latents` (diffusers' video signature)."""
        args = (batch_size, num_channels_latents, height, width, num_frames, dtype, device, generator, latents)
        return self._prepare_latents(*args)

    def _prepare_latents(
        self, batch_size, num_channels_latents, height, width, num_frames, dtype, device, generator, latents
    ) -> torch.Tensor:
        """Initial latents ``(batch, T, H, W, C')`` channels-last: noise, then for ``visual_cond`` models zero
        condition channels and a zero mask channel. Given ``latents`` with only the noise channels get the
        condition channels appended; full-width ones are used as they are (copied, never modified). A call has
        checked their shape already (``GenerationRequest.check``)."""
        shape = noise_latent_shape(
            batch_size,
            num_frames,
            height,
            width,
            num_channels_latents,
            self.vae_scale_factor_temporal,
            self.vae_scale_factor_spatial,
        )
        if latents is not None:
            latents = latents.to(device=device, dtype=dtype).clone()
            full = self.transformer.config.visual_input_dim
            if latents.shape[-1] == full and full != num_channels_latents:
                return latents
        else:
            latents = noise.randn(shape, generator, device, dtype)
        if self.transformer.visual_cond:
            condition = torch.zeros_like(latents)
            mask = torch.zeros((*shape[:-1], 1), dtype=latents.dtype, device=latents.device)
            latents = torch.cat([latents, condition, mask], dim=-1)
        return latents

    def prepare_condition(self, latents: torch.Tensor, request: GenerationRequest, control: RunControl) -> torch.Tensor:
        """Fill the conditioning channels of ``latents``; text-to-video has none."""
        return latents

    def finalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Sampled latents ``(batch, T, H, W, C)`` before decoding (and as ``output_type="latent"``); kept as
        they are here."""
        return latents

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Channels-last latents ``(batch, T, H, W, C)`` -> decoded video ``(batch, 3, frames, H, W)`` in [-1, 1];
        in a parallel run the tiles are shared among the ranks (the same result)."""
        if self._parallel is not None and self._parallel.world_size > 1:
            from kandinsky5.runtime.parallel.vae import decode_latents_parallel

            return decode_latents_parallel(self.vae, latents, self._parallel)
        return decode_latents(self.vae, latents)

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        num_videos_per_prompt: int | None = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds_qwen: torch.Tensor | None = None,
        prompt_embeds_clip: torch.Tensor | None = None,
        negative_prompt_embeds_qwen: torch.Tensor | None = None,
        negative_prompt_embeds_clip: torch.Tensor | None = None,
        prompt_cu_seqlens: torch.Tensor | None = None,
        negative_prompt_cu_seqlens: torch.Tensor | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
        expand_prompt: bool = False,
        control: RunControl | None = None,
        **condition,
    ):
        """Generate videos; returns an object whose ``.frames[i]`` is the i-th video (see ``output_type``).

        ``height``, ``width``, ``num_frames``, ``num_inference_steps`` and ``guidance_scale`` left as ``None`` take
        the checkpoint's recommended values (``self.model_variant``), or the reference's (512, 768, 121, 50, 5.0).
        ``control`` (a :class:`~kandinsky5.sampling.control.RunControl`) receives progress events and previews
        and can cancel the run. ``expand_prompt=True`` first rewrites each prompt into a detailed caption with the
        pipeline's own Qwen2.5-VL (:meth:`expand_prompt`; off by default, as in diffusers). Everything is validated
        before any work.
        """
        arguments = {name: value for name, value in locals().items() if name not in ("self", "control", "condition")}
        request = GenerationRequest.build(self.model_facts(), **arguments, **condition)
        return self._run(request, control or RunControl())

    @torch.no_grad()
    def generate(self, request: GenerationRequest, control: RunControl | None = None):
        """Run a request built with :meth:`GenerationRequest.build` (the command line builds it before loading a
        model; it is checked again against this pipeline's model)."""
        request.check(self.model_facts())
        return self._run(request, control or RunControl())

    def _run(self, request: GenerationRequest, control: RunControl):
        self._interrupt = False
        control.restart_clock()
        progress_bar = ProgressBar(**self._progress_bar_config)
        running = _RUNNING_CALL.set(RunningCall(request.guidance_scale, request.num_inference_steps))
        control.add_listener(progress_bar)
        try:
            with use_mesh(self._parallel):
                condition, negative = self.encode_text(request, control)
                latents = self.initial_latents(request, control)
                latents = self.sample(request, latents, condition, negative, control)
                return self.output(request, latents, control)
        finally:
            control.remove_listener(progress_bar)
            progress_bar.close()
            _RUNNING_CALL.reset(running)
            self.maybe_free_model_hooks()

    def encode_text(
        self, request: GenerationRequest, control: RunControl
    ) -> tuple[TextConditioning, TextConditioning | None]:
        """The prompt's text conditioning and, with guidance on, the negative prompt's (one row per video).

        In a parallel run rank 0 alone encodes and broadcasts the result (:func:`broadcast_text`)."""
        mesh = self._parallel
        shared = mesh is not None and mesh.world_size > 1
        with control.phase(Phase.ENCODE_TEXT):
            if not shared or mesh.is_main:
                try:
                    prompts = request.prompt
                    if request.expand_prompt and request.embeddings("prompt") is None:
                        prompts = self.expand_prompt(prompts, control=control)
                        logger.info("Expanded prompt(s): %s", prompts)
                    condition = self._text_conditioning(request, "prompt", prompts)
                    negative = None
                    if request.uses_guidance:
                        negative = self._text_conditioning(request, "negative_prompt", request.negative_prompts())
                except Exception as error:
                    if not shared:
                        raise
                    broadcast_text(mesh, error, self._execution_device)  # the other ranks raise too
                    raise
            if shared:
                sent = (condition, negative) if mesh.is_main else None
                condition, negative = broadcast_text(mesh, sent, self._execution_device)
        return condition, negative

    def _text_conditioning(self, request: GenerationRequest, branch: str, prompts: list[str] | None):
        device = self._execution_device
        given = request.embeddings(branch)
        if given is None:
            embeds = self._embed_prompts(
                prompts,
                request.num_videos_per_prompt,
                request.max_sequence_length,
                device,
                self.transformer.dtype,
                self.qwen_images(request),
            )
        else:
            embeds = repeat_embeddings(*given, request.num_videos // given[0].shape[0])
        embeds_qwen, embeds_clip, cu_seqlens = embeds
        return TextConditioning(embeds_qwen, embeds_clip, padding_mask(cu_seqlens, embeds_qwen.shape[1], device))

    def initial_latents(self, request: GenerationRequest, control: RunControl) -> torch.Tensor:
        """Noise (or the caller's latents) with the conditioning channels filled."""
        latents = self._prepare_latents(
            request.num_videos,
            self.transformer.config.in_visual_dim,
            request.height,
            request.width,
            request.num_frames,
            self.transformer.dtype,
            self._execution_device,
            request.generator,
            request.latents,
        )
        return self.prepare_condition(latents, request, control)

    def sample(
        self,
        request: GenerationRequest,
        latents: torch.Tensor,
        condition: TextConditioning,
        negative: TextConditioning | None,
        control: RunControl,
    ) -> torch.Tensor:
        """The denoising loop with this request's guidance, step callback and previews; the sampled latents
        (noise channels) after :meth:`finalize_latents`."""
        # a copy per call: the timesteps are the call's, not the pipeline's
        scheduler = copy.copy(self.scheduler)
        scheduler.set_timesteps(request.num_inference_steps, device=self._execution_device)
        guidance = self.make_guidance(request, latents, condition, negative, len(scheduler.timesteps))
        on_step_end = None
        if request.callback_on_step_end is not None:
            tensor_inputs = request.callback_on_step_end_tensor_inputs
            on_step_end = StepCallback(self, request.callback_on_step_end, tensor_inputs, control)
        previewer = LatentPreviewer.from_vae(self.vae) if control.preview_every else None
        noise_channels = self.transformer.config.in_visual_dim
        latents = denoise(
            latents,
            scheduler,
            guidance,
            control,
            noise_channels=noise_channels,
            frozen_frames=self.num_frozen_latent_frames,
            on_step_end=on_step_end,
            previewer=previewer,
        )
        return self.finalize_latents(latents[..., :noise_channels])

    def make_guidance(self, request, latents, condition, negative, num_steps: int) -> Guidance:
        """The guidance mode of this call over a denoiser bound to its size, attention and dtype (CFG-parallel
        when the pipeline's mesh has ``cfg_degree`` 2)."""
        mesh = self._parallel
        if mesh is not None and mesh.ulysses_degree > 1:
            from kandinsky5.runtime.parallel.ulysses import check_tokens

            _, frames, height, width, _ = latents.shape
            _, patch_h, patch_w = self.transformer.config.patch_size
            check_tokens(frames * (height // patch_h) * (width // patch_w), mesh.ulysses_degree)
        dtype = self.transformer.dtype
        scale_factor = self._get_scale_factor(request.height, request.width)
        sparse_params = self.get_sparse_params(latents, latents.device)

        def denoiser(latents, timestep, text: TextConditioning, context):
            # The reference feeds the timestep in the model dtype (rounded to bf16 in bf16 runs).
            return self.transformer(
                hidden_states=latents.to(dtype),
                encoder_hidden_states=text.embeds_qwen.to(dtype),
                pooled_projections=text.embeds_clip.to(dtype),
                timestep=timestep.to(dtype),
                scale_factor=scale_factor,
                sparse_params=sparse_params,
                encoder_attention_mask=text.mask,
                context=context,
            ).sample

        scale = request.guidance_scale
        return make_guidance(denoiser, condition, negative, scale, num_steps, self.batched_guidance, mesh)

    def output(self, request: GenerationRequest, latents: torch.Tensor, control: RunControl):
        """The requested output: the latents, or the decoded videos (images) as ``output_type``."""
        if request.output_type == "latent":
            result = latents
        else:
            with control.phase(Phase.DECODE):
                result = self.postprocess(self.decode_latents(latents), request.output_type)
        return self.output_class(result) if request.return_dict else (result,)

    @staticmethod
    def postprocess(decoded: torch.Tensor, output_type: str):
        """Decoded pixels in [-1, 1] as ``output_type``."""
        return postprocess_video(decoded, output_type)


def vae_compression(vae) -> tuple[int, int]:
    """``(spatial, temporal)`` compression of ``vae``: the video VAE's config says both; the image VAE compresses
    space only (a one-frame "video"); without a VAE, the official models' 8 and 4."""
    if vae is None:
        return 8, 4
    config = vae.config
    if hasattr(config, "temporal_compression_ratio"):
        return config.spatial_compression_ratio, config.temporal_compression_ratio
    return vae.spatial_compression_ratio, 1


def broadcast_text(mesh: ParallelMesh, text, device) -> tuple[TextConditioning, TextConditioning | None]:
    """Rank 0's ``(condition, negative)`` text conditioning on every rank (the others pass ``None``); rank 0 passes
    an exception when encoding failed, and every rank raises."""
    if isinstance(text, BaseException) or text is None:
        tensors = text
    else:
        tensors = []
        for part in text:
            tensors += [None, None, None] if part is None else [part.embeds_qwen, part.embeds_clip, part.mask]
    received = broadcast_from_main(mesh, tensors, device)
    condition = TextConditioning(*received[:3])
    negative = None if received[3] is None else TextConditioning(*received[3:])
    return condition, negative


def repeat_embeddings(embeds_qwen, embeds_clip, cu_seqlens, times: int):
    """Repeat each prompt's embeddings ``times`` times in a row (prompt-major, as the reference orders videos)."""
    embeds_qwen = embeds_qwen.repeat_interleave(times, dim=0)
    embeds_clip = embeds_clip.repeat_interleave(times, dim=0)
    lengths = cu_seqlens.diff().repeat_interleave(times)
    cu_seqlens = torch.cat([cu_seqlens.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)
    return embeds_qwen, embeds_clip, cu_seqlens


def padding_mask(cu_seqlens: torch.Tensor, length: int, device) -> torch.Tensor | None:
    """``(batch, length)`` True on real tokens, or ``None`` when no row is padded (computed once per call)."""
    lengths = cu_seqlens.diff().to(device)
    if bool((lengths == length).all()):
        return None
    return torch.arange(length, device=device)[None, :] < lengths[:, None]
