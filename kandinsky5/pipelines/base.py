"""What the text-to-video and image-to-video pipelines share: loading, prompt encoding, the sampling loop and
decoding. A subclass overrides only the conditioning (:meth:`Kandinsky5PipelineBase.prepare_condition`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm

from kandinsky5.attention.nabla import FRACTAL_TILE, sliding_window_block_mask
from kandinsky5.loading.diffusers_format import (
    CONFIG_FILE,
    CheckpointError,
    component_folder,
    load_component,
    read_json,
)
from kandinsky5.loading.hub import resolve_checkpoint
from kandinsky5.models import text_encoders as te
from kandinsky5.models.dit import Kandinsky5Transformer3DModel
from kandinsky5.pipelines.auto import check_checkpoint_class
from kandinsky5.pipelines.output import OUTPUT_TYPES, KandinskyPipelineOutput, postprocess_video
from kandinsky5.resolutions import SIZE_MULTIPLE, check_size, rope_scale_factor
from kandinsky5.runtime.offload import (
    ModelCpuOffload,
    OffloadPlan,
    SequentialCpuOffload,
    offload_components,
    offload_execution_device,
)
from kandinsky5.sampling import noise
from kandinsky5.sampling.scheduler import FlowMatchEulerDiscreteScheduler
from kandinsky5.variants import Variant, generation_defaults, variant_for_checkpoint

logger = logging.getLogger(__name__)

DEFAULT_NEGATIVE_PROMPT = (
    "Static, 2D cartoon, cartoon, 2d animation, paintings, images, worst quality, low quality, ugly, deformed, "
    "walking backwards"
)
SCHEDULER_CONFIG = "scheduler_config.json"


class Kandinsky5PipelineBase:
    """Shared machinery of the Kandinsky 5 video pipelines (Diffusers-compatible API)."""

    # model_index.json class names this pipeline loads
    checkpoint_classes: ClassVar[tuple[str, ...]] = ()
    # leading latent frames given as condition: the sampler never steps them (image-to-video: the image's frame)
    num_frozen_latent_frames: ClassVar[int] = 0
    model_cpu_offload_seq = "text_encoder->text_encoder_2->transformer->vae"
    _callback_tensor_inputs: ClassVar[list[str]] = [
        "latents",
        "prompt_embeds_qwen",
        "prompt_embeds_clip",
        "negative_prompt_embeds_qwen",
        "negative_prompt_embeds_clip",
    ]
    prompt_template = te.VIDEO_PROMPT_TEMPLATE

    def __init__(self, transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, scheduler):
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.text_encoder_2 = text_encoder_2
        self.tokenizer_2 = tokenizer_2
        self.scheduler = scheduler
        self.vae_scale_factor_temporal = vae.config.temporal_compression_ratio if vae is not None else 4
        self.vae_scale_factor_spatial = vae.config.spatial_compression_ratio if vae is not None else 8
        self.prompt_template_encode_start_idx = (
            te.template_prefix_length(tokenizer, self.prompt_template) if tokenizer is not None else None
        )
        self._progress_bar_config: dict[str, Any] = {}
        # Classifier-free guidance: condition and negative in one transformer call (True) or two (the reference).
        # Equal results; which is faster is for the GPU benchmark to tell (benchmarks/pipeline.py).
        self.batched_guidance = False
        self._guidance_scale = 1.0
        self._num_timesteps = 0
        self._interrupt = False
        # set by enable_model_cpu_offload / enable_sequential_cpu_offload
        self._offload_plan: OffloadPlan | None = None
        # the official checkpoint this is (set by from_pretrained; None when unknown): its defaults fill the
        # __call__ arguments left as None
        self.model_variant: Variant | None = None

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
        from kandinsky5.models.vae import AutoencoderKLHunyuanVideo

        known = {"transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler"}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"from_pretrained() got unexpected keyword arguments {unknown}")
        root = resolve_checkpoint(pretrained_model_name_or_path, revision, cache_dir, local_files_only, token)
        check_checkpoint_class(root, cls)
        variant = variant_for_checkpoint(pretrained_model_name_or_path, root)
        parts = dict(kwargs)
        if "scheduler" not in parts:
            scheduler_path = root / "scheduler" / SCHEDULER_CONFIG
            if variant is not None and not scheduler_path.is_file():
                logger.info("No %s; using %s's shift", scheduler_path, variant.short_name)
                scheduler_config = {"shift": variant.scheduler_shift}
            else:
                scheduler_config = read_json(scheduler_path)
            parts["scheduler"] = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        if "transformer" not in parts:
            parts["transformer"] = load_component(
                Kandinsky5Transformer3DModel, component_folder(root, "transformer"), torch_dtype
            )
        if "vae" not in parts:
            parts["vae"] = load_component(AutoencoderKLHunyuanVideo, component_folder(root, "vae"), torch_dtype)
        for name in ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2"):
            folder = component_folder(root, name)
            if name.startswith("text_encoder") and not (folder / CONFIG_FILE).is_file():
                raise CheckpointError(f"Missing file {folder / CONFIG_FILE}")
        if "tokenizer" not in parts or "tokenizer_2" not in parts:
            tokenizer, tokenizer_2 = te.load_tokenizers(root)
            parts.setdefault("tokenizer", tokenizer)
            parts.setdefault("tokenizer_2", tokenizer_2)
        if "text_encoder" not in parts or "text_encoder_2" not in parts:
            text_encoder, text_encoder_2 = te.load_text_encoders(root, torch_dtype)
            parts.setdefault("text_encoder", text_encoder)
            parts.setdefault("text_encoder_2", text_encoder_2)
        pipe = cls(**parts)
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

    def _enable_offload(self, plan_class: type[OffloadPlan], gpu_id, device) -> None:
        previous = self._offload_plan.device if self._offload_plan is not None else None
        execution_device = offload_execution_device(plan_class.method, gpu_id, device, previous)
        components = offload_components(self)
        self.remove_all_hooks()
        self.to("cpu")
        self._offload_plan = plan_class(components, execution_device)

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
        if plan is not None:
            self._enable_offload(type(plan), None, plan.device)

    # ------------------------------------------------------------------ progress bar

    def set_progress_bar_config(self, **kwargs) -> None:
        """Options for the tqdm progress bar, e.g. ``disable=True``."""
        self._progress_bar_config = dict(kwargs)

    def progress_bar(self, iterable=None, total=None):
        return tqdm(iterable=iterable, total=total, **self._progress_bar_config)

    # ------------------------------------------------------------------ properties of the running call

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1.0

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

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

    def get_sparse_params(self, sample: torch.Tensor, device) -> dict[str, Any] | None:
        """NABLA settings for latents ``sample`` ``(batch, T, H, W, C)``; ``None`` for dense checkpoints."""
        config = self.transformer.config
        if not config.uses_nabla:
            return None
        pt, ph, pw = config.patch_size
        if pt != 1:
            raise ValueError("NABLA attention needs a temporal patch size of 1")
        t, h, w = sample.shape[1] // pt, sample.shape[2] // ph, sample.shape[3] // pw
        if h % FRACTAL_TILE or w % FRACTAL_TILE:
            raise ValueError(
                f"NABLA attention needs a latent token grid divisible by {FRACTAL_TILE}: height and width must be "
                f"multiples of {FRACTAL_TILE * ph * self.vae_scale_factor_spatial} pixels"
            )
        window = self.fast_sta_nabla(
            t,
            h // FRACTAL_TILE,
            w // FRACTAL_TILE,
            config.attention_wT,
            config.attention_wH,
            config.attention_wW,
            device=device,
        )
        return {
            "sta_mask": window[None, None],
            "attention_type": config.attention_type,
            "to_fractal": True,
            "P": config.attention_P,
            "wT": config.attention_wT,
            "wW": config.attention_wW,
            "wH": config.attention_wH,
            "add_sta": config.attention_add_sta,
            "visual_shape": (t, h, w),
            "method": config.attention_method,
        }

    # ------------------------------------------------------------------ prompts

    def _encode_prompt_qwen(self, prompt: list[str], device=None, max_sequence_length: int = 256, dtype=None):
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
        device = device or self._execution_device
        dtype = dtype or self.text_encoder.dtype
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [te.prompt_clean(p) for p in prompts]
        embeds_qwen, cu_seqlens = self._encode_prompt_qwen(prompts, device, max_sequence_length, dtype)
        embeds_clip = self._encode_prompt_clip(prompts, device, dtype)
        return repeat_embeddings(embeds_qwen, embeds_clip, cu_seqlens, num_videos_per_prompt)

    # ------------------------------------------------------------------ validation

    def check_inputs(
        self,
        prompt,
        negative_prompt,
        height,
        width,
        prompt_embeds_qwen=None,
        prompt_embeds_clip=None,
        negative_prompt_embeds_qwen=None,
        negative_prompt_embeds_clip=None,
        prompt_cu_seqlens=None,
        negative_prompt_cu_seqlens=None,
        callback_on_step_end_tensor_inputs=None,
        max_sequence_length=None,
    ) -> None:
        """Raise ``ValueError`` naming the parameter for input the pipeline cannot use (the reference's checks)."""
        if max_sequence_length is not None and not 1 <= max_sequence_length <= te.MAX_SEQUENCE_LENGTH_LIMIT:
            raise ValueError(
                f"max_sequence_length must be between 1 and {te.MAX_SEQUENCE_LENGTH_LIMIT}, got {max_sequence_length}"
            )
        if height % SIZE_MULTIPLE != 0 or width % SIZE_MULTIPLE != 0:
            raise ValueError(
                f"`height` and `width` have to be divisible by {SIZE_MULTIPLE} but are {height} and {width}."
            )
        if callback_on_step_end_tensor_inputs is not None:
            unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
            if unknown:
                raise ValueError(
                    f"`callback_on_step_end_tensor_inputs` has to be in {self._callback_tensor_inputs}, "
                    f"but found {unknown}"
                )
        for group, names in (
            ((prompt_embeds_qwen, prompt_embeds_clip, prompt_cu_seqlens), "prompt"),
            ((negative_prompt_embeds_qwen, negative_prompt_embeds_clip, negative_prompt_cu_seqlens), "negative_prompt"),
        ):
            if any(x is not None for x in group) and any(x is None for x in group):
                raise ValueError(
                    f"If any of `{names}_embeds_qwen`, `{names}_embeds_clip`, or `{names}_cu_seqlens` is provided, "
                    "all three must be provided."
                )
        if prompt is None and prompt_embeds_qwen is None:
            raise ValueError(
                "Provide either `prompt` or `prompt_embeds_qwen` (and corresponding `prompt_embeds_clip` and "
                "`prompt_cu_seqlens`). Cannot leave all undefined."
            )
        for name, value in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            if value is not None and not isinstance(value, str | list):
                raise ValueError(f"`{name}` has to be of type `str` or `list` but is {type(value)}")
            if isinstance(value, list) and not all(isinstance(p, str) for p in value):
                raise ValueError(f"`{name}` must be a list of strings")

    def _check_call_arguments(
        self, num_frames, num_inference_steps, guidance_scale, num_videos_per_prompt, output_type, generator, latents
    ) -> None:
        """Checks beyond the reference's, made before any encoding or sampling."""
        if not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"`num_frames` must be a positive integer (4k+1, e.g. 121), got {num_frames!r}")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be a positive integer, got {num_inference_steps!r}")
        if not isinstance(guidance_scale, int | float):
            raise ValueError(f"`guidance_scale` must be a number, got {guidance_scale!r}")
        if not isinstance(num_videos_per_prompt, int) or num_videos_per_prompt < 1:
            raise ValueError(f"`num_videos_per_prompt` must be a positive integer, got {num_videos_per_prompt!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if generator is not None and not isinstance(generator, torch.Generator | list):
            raise ValueError("`generator` must be a torch.Generator or a list of them")
        if latents is not None and not isinstance(latents, torch.Tensor):
            raise ValueError("`latents` must be a torch.Tensor")

    def check_video_size(self, height: int, width: int, num_frames: int) -> None:
        """``ValueError`` naming the parameter for a size this checkpoint cannot represent (see resolutions.py);
        one warning for a size its variant was not trained at."""
        config = self.transformer.config
        check_size(
            height,
            width,
            num_frames,
            nabla=config.uses_nabla,
            size_multiple=self.vae_scale_factor_spatial * config.patch_size[1],
            temporal_compression=self.vae_scale_factor_temporal,
        )
        if self.model_variant is not None:
            self.model_variant.warn_if_untrained(height, width)

    # ------------------------------------------------------------------ latents and conditioning

    def latent_shape(self, batch_size: int, height: int, width: int, num_frames: int, channels: int):
        return (
            batch_size,
            (num_frames - 1) // self.vae_scale_factor_temporal + 1,
            int(height) // self.vae_scale_factor_spatial,
            int(width) // self.vae_scale_factor_spatial,
            channels,
        )

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
        """Initial latents ``(batch, T, H, W, C')`` channels-last: noise, then for ``visual_cond`` models zero
        condition channels and a zero mask channel. Given ``latents`` with only the noise channels get the
        condition channels appended; full-width ones are used as they are (copied, never modified)."""
        shape = self.latent_shape(batch_size, height, width, num_frames, num_channels_latents)
        if latents is not None:
            latents = latents.to(device=device, dtype=dtype).clone()
            full = self.transformer.config.visual_input_dim
            if latents.shape[-1] == full and full != num_channels_latents:
                return latents
            if tuple(latents.shape) != shape:
                raise ValueError(f"`latents` must have shape {shape} (or {shape[:-1] + (full,)}), got {latents.shape}")
        else:
            latents = noise.randn(shape, generator, device, dtype)
        if self.transformer.visual_cond:
            condition = torch.zeros_like(latents)
            mask = torch.zeros((*shape[:-1], 1), dtype=latents.dtype, device=latents.device)
            latents = torch.cat([latents, condition, mask], dim=-1)
        return latents

    def prepare_condition(self, latents: torch.Tensor, **kwargs) -> torch.Tensor:
        """Fill the conditioning channels of ``latents``; text-to-video has none."""
        return latents

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
        max_sequence_length: int = 512,
        **condition_kwargs,
    ):
        """Generate videos; returns an object whose ``.frames[i]`` is the i-th video (see ``output_type``).

        ``height``, ``width``, ``num_frames``, ``num_inference_steps`` and ``guidance_scale`` left as ``None`` take
        the checkpoint's recommended values (``self.model_variant``), or the reference's (512, 768, 121, 50, 5.0).
        """
        defaults = generation_defaults(self.model_variant)
        height = defaults.height if height is None else height
        width = defaults.width if width is None else width
        num_frames = defaults.num_frames if num_frames is None else num_frames
        num_inference_steps = defaults.num_inference_steps if num_inference_steps is None else num_inference_steps
        guidance_scale = defaults.guidance_scale if guidance_scale is None else guidance_scale
        if callback_on_step_end_tensor_inputs is None:
            callback_on_step_end_tensor_inputs = ["latents"]
        if hasattr(callback_on_step_end, "tensor_inputs"):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        num_videos_per_prompt = 1 if num_videos_per_prompt is None else num_videos_per_prompt
        output_type = output_type or "pil"
        self.check_inputs(
            prompt=prompt,
            negative_prompt=negative_prompt,
            height=height,
            width=width,
            prompt_embeds_qwen=prompt_embeds_qwen,
            prompt_embeds_clip=prompt_embeds_clip,
            negative_prompt_embeds_qwen=negative_prompt_embeds_qwen,
            negative_prompt_embeds_clip=negative_prompt_embeds_clip,
            prompt_cu_seqlens=prompt_cu_seqlens,
            negative_prompt_cu_seqlens=negative_prompt_cu_seqlens,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            max_sequence_length=max_sequence_length,
        )
        self._check_call_arguments(
            num_frames, num_inference_steps, guidance_scale, num_videos_per_prompt, output_type, generator, latents
        )
        if num_frames % self.vae_scale_factor_temporal != 1:
            rounded = max(num_frames // self.vae_scale_factor_temporal * self.vae_scale_factor_temporal + 1, 1)
            logger.warning(
                "`num_frames - 1` has to be divisible by %d; using num_frames=%d instead of %d.",
                self.vae_scale_factor_temporal,
                rounded,
                num_frames,
            )
            num_frames = rounded
        self.check_video_size(height, width, num_frames)

        self._guidance_scale = guidance_scale
        self._interrupt = False
        device = self._execution_device
        dtype = self.transformer.dtype

        if isinstance(prompt, str):
            prompt = [prompt]
        batch_size = len(prompt) if prompt is not None else prompt_embeds_qwen.shape[0]
        self.check_condition(batch_size, **condition_kwargs)
        if prompt is not None and isinstance(negative_prompt, list) and len(negative_prompt) != len(prompt):
            raise ValueError(
                f"`negative_prompt` must have same length as `prompt`. Got {len(negative_prompt)} vs {len(prompt)}."
            )

        effective_batch = batch_size * num_videos_per_prompt
        if isinstance(generator, list) and len(generator) not in (1, effective_batch):
            raise ValueError(
                f"`generator` is a list of {len(generator)} generators, but the effective batch size "
                f"(prompts x num_videos_per_prompt) is {effective_batch}; pass one generator or one per video."
            )

        # Text conditioning, each prompt repeated num_videos_per_prompt times.
        if prompt_embeds_qwen is None:
            prompt_embeds_qwen, prompt_embeds_clip, prompt_cu_seqlens = self.encode_prompt(
                prompt, num_videos_per_prompt, max_sequence_length, device, dtype
            )
        else:
            prompt_embeds_qwen, prompt_embeds_clip, prompt_cu_seqlens = fit_embeddings_to_batch(
                prompt_embeds_qwen, prompt_embeds_clip, prompt_cu_seqlens, batch_size, num_videos_per_prompt
            )
        use_guidance = self.do_classifier_free_guidance
        if use_guidance:
            if negative_prompt_embeds_qwen is None:
                negative_prompt = DEFAULT_NEGATIVE_PROMPT if negative_prompt is None else negative_prompt
                if isinstance(negative_prompt, str):
                    negative_prompt = [negative_prompt] * batch_size
                negative_prompt_embeds_qwen, negative_prompt_embeds_clip, negative_prompt_cu_seqlens = (
                    self.encode_prompt(negative_prompt, num_videos_per_prompt, max_sequence_length, device, dtype)
                )
            else:
                negative_prompt_embeds_qwen, negative_prompt_embeds_clip, negative_prompt_cu_seqlens = (
                    fit_embeddings_to_batch(
                        negative_prompt_embeds_qwen,
                        negative_prompt_embeds_clip,
                        negative_prompt_cu_seqlens,
                        batch_size,
                        num_videos_per_prompt,
                    )
                )

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)

        num_channels = self.transformer.config.in_visual_dim
        given_latents = latents  # the caller's tensor (or None), for the conditioning hook
        latents = self.prepare_latents(
            effective_batch, num_channels, height, width, num_frames, dtype, device, generator, latents
        )
        latents = self.prepare_condition(
            latents,
            height=height,
            width=width,
            num_frames=num_frames,
            generator=generator,
            num_videos_per_prompt=num_videos_per_prompt,
            given_latents=given_latents,
            **condition_kwargs,
        )

        scale_factor = self._get_scale_factor(height, width)
        sparse_params = self.get_sparse_params(latents, device)
        text_mask = padding_mask(prompt_cu_seqlens, prompt_embeds_qwen.shape[1], device)
        negative_text_mask = (
            padding_mask(negative_prompt_cu_seqlens, negative_prompt_embeds_qwen.shape[1], device)
            if use_guidance
            else None
        )

        def denoise(latents, embeds_qwen, embeds_clip, mask, timestep):
            return self.transformer(
                hidden_states=latents.to(dtype),
                encoder_hidden_states=embeds_qwen.to(dtype),
                pooled_projections=embeds_clip.to(dtype),
                timestep=timestep,
                scale_factor=scale_factor,
                sparse_params=sparse_params,
                encoder_attention_mask=mask,
            ).sample

        guidance_batch = GuidanceBatch()
        with self.progress_bar(total=num_inference_steps) as progress:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                # The reference feeds the timestep in the model dtype (rounded to bf16 in bf16 runs).
                timestep = t.expand(effective_batch).to(dtype)
                if use_guidance and self.batched_guidance:
                    # condition and negative in one forward, text padded to a common length and masked
                    embeds_qwen, embeds_clip, mask = guidance_batch.get(
                        (prompt_embeds_qwen, prompt_embeds_clip, text_mask),
                        (negative_prompt_embeds_qwen, negative_prompt_embeds_clip, negative_text_mask),
                    )
                    both = denoise(torch.cat([latents, latents]), embeds_qwen, embeds_clip, mask, timestep.repeat(2))
                    velocity, uncond = both.chunk(2)
                    velocity = uncond + guidance_scale * (velocity - uncond)
                else:
                    velocity = denoise(latents, prompt_embeds_qwen, prompt_embeds_clip, text_mask, timestep)
                    if use_guidance:
                        uncond = denoise(
                            latents,
                            negative_prompt_embeds_qwen,
                            negative_prompt_embeds_clip,
                            negative_text_mask,
                            timestep,
                        )
                        velocity = uncond + guidance_scale * (velocity - uncond)
                frozen = self.num_frozen_latent_frames
                latents[:, frozen:, ..., :num_channels] = self.scheduler.step(
                    velocity[:, frozen:], i, latents[:, frozen:, ..., :num_channels]
                )

                if callback_on_step_end is not None:
                    state = {
                        "latents": latents,
                        "prompt_embeds_qwen": prompt_embeds_qwen,
                        "prompt_embeds_clip": prompt_embeds_clip,
                        "negative_prompt_embeds_qwen": negative_prompt_embeds_qwen,
                        "negative_prompt_embeds_clip": negative_prompt_embeds_clip,
                    }
                    outputs = (
                        callback_on_step_end(self, i, t, {k: state[k] for k in callback_on_step_end_tensor_inputs})
                        or {}
                    )
                    latents = outputs.pop("latents", latents)
                    prompt_embeds_qwen = outputs.pop("prompt_embeds_qwen", prompt_embeds_qwen)
                    prompt_embeds_clip = outputs.pop("prompt_embeds_clip", prompt_embeds_clip)
                    negative_prompt_embeds_qwen = outputs.pop(
                        "negative_prompt_embeds_qwen", negative_prompt_embeds_qwen
                    )
                    negative_prompt_embeds_clip = outputs.pop(
                        "negative_prompt_embeds_clip", negative_prompt_embeds_clip
                    )
                progress.update()

        latents = self.finalize_latents(latents[..., :num_channels])
        if output_type == "latent":
            video = latents
        else:
            video = postprocess_video(self.decode_latents(latents), output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (video,)
        return KandinskyPipelineOutput(frames=video)

    def check_condition(self, batch_size: int, **condition_kwargs) -> None:
        """Validate the conditioning arguments of a subclass for ``batch_size`` prompts, before any encoding;
        text-to-video takes none."""
        if condition_kwargs:
            raise TypeError(
                f"{type(self).__name__}.__call__() got unexpected keyword arguments {sorted(condition_kwargs)}"
            )

    def finalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Sampled latents ``(batch, T, H, W, C)`` before decoding (and as ``output_type="latent"``); kept as
        they are here."""
        return latents

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Channels-last latents ``(batch, T, H, W, C)`` -> decoded video ``(batch, 3, frames, H, W)`` in [-1, 1]."""
        latents = latents.to(self.vae.dtype).permute(0, 4, 1, 2, 3)
        return self.vae.decode(latents / self.vae.config.scaling_factor).sample


def repeat_embeddings(embeds_qwen, embeds_clip, cu_seqlens, times: int):
    """Repeat each prompt's embeddings ``times`` times in a row (prompt-major, as the reference orders videos)."""
    embeds_qwen = embeds_qwen.repeat_interleave(times, dim=0)
    embeds_clip = embeds_clip.repeat_interleave(times, dim=0)
    lengths = cu_seqlens.diff().repeat_interleave(times)
    cu_seqlens = torch.cat([cu_seqlens.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)
    return embeds_qwen, embeds_clip, cu_seqlens


def fit_embeddings_to_batch(embeds_qwen, embeds_clip, cu_seqlens, batch_size: int, num_videos_per_prompt: int):
    """Precomputed embeddings, given one row per prompt (or one row for all), repeated to one row per video."""
    rows = embeds_qwen.shape[0]
    if rows not in (1, batch_size) or embeds_clip.shape[0] != rows or cu_seqlens.numel() != rows + 1:
        raise ValueError(
            f"`prompt_embeds_qwen`, `prompt_embeds_clip` and `prompt_cu_seqlens` must describe {batch_size} prompt(s) "
            f"(or 1): got {rows} and {embeds_clip.shape[0]} rows and {cu_seqlens.numel()} cu_seqlens"
        )
    return repeat_embeddings(embeds_qwen, embeds_clip, cu_seqlens, batch_size * num_videos_per_prompt // rows)


class GuidanceBatch:
    """The condition and negative text stacked into one batch, rebuilt only when a callback swaps embeddings."""

    def __init__(self):
        self._key: tuple | None = None
        self._value: tuple | None = None

    def get(self, condition: tuple, negative: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        key = tuple(id(t) for t in (*condition, *negative))
        if key != self._key:
            self._key, self._value = key, stack_for_guidance(condition, negative)
        return self._value


def stack_for_guidance(condition: tuple, negative: tuple):
    """``(embeds_qwen, embeds_clip, mask)`` of both halves -> one batch: condition rows first, text zero-padded
    to the longer length, with a padding mask (``None`` when nothing is padded)."""
    length = max(condition[0].shape[1], negative[0].shape[1])
    qwen, masks = [], []
    for embeds, _, mask in (condition, negative):
        rows, own = embeds.shape[0], embeds.shape[1]
        valid = torch.ones(rows, own, dtype=torch.bool, device=embeds.device) if mask is None else mask
        qwen.append(torch.nn.functional.pad(embeds, (0, 0, 0, length - own)))
        masks.append(torch.nn.functional.pad(valid, (0, length - own), value=False))
    mask = torch.cat(masks)
    all_valid = condition[2] is None and negative[2] is None and condition[0].shape[1] == negative[0].shape[1]
    return torch.cat(qwen), torch.cat([condition[1], negative[1]]), None if all_valid else mask


def padding_mask(cu_seqlens: torch.Tensor, length: int, device) -> torch.Tensor | None:
    """``(batch, length)`` True on real tokens, or ``None`` when no row is padded (computed once per call)."""
    lengths = cu_seqlens.diff().to(device)
    if bool((lengths == length).all()):
        return None
    return torch.arange(length, device=device)[None, :] < lengths[:, None]
