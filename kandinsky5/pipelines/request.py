"""One generation request: the ``__call__`` arguments with the model's defaults filled in, validated in one place.

``GenerationRequest.build(facts, **arguments)`` is the only way a pipeline call or the command line turns user
input into work. It fills what was left as ``None`` from the checkpoint's recommended values (its
:class:`~kandinsky5.variants.Variant`, else the reference's), rounds ``num_frames`` to ``4k + 1`` as the reference
does, and raises :class:`RequestError` (a ``ValueError`` naming the parameter) for anything the pipeline could not
use, before any encoding or sampling. What validation needs to know of the model is a :class:`ModelFacts`, which
the command line reads from the variant registry or the checkpoint's configs before loading anything, so it rejects
exactly what the pipeline would.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

import torch

from kandinsky5.io.preprocess import count_images, image_size
from kandinsky5.models.text_encoders import MAX_SEQUENCE_LENGTH_LIMIT as LIMIT
from kandinsky5.pipelines.output import OUTPUT_TYPES
from kandinsky5.resolutions import SIZE_MULTIPLE, SizeError, check_size, snap_image_size
from kandinsky5.sampling.guidance import NO_GUIDANCE_SCALE
from kandinsky5.variants import (
    VIDEO_MAX_SEQUENCE_LENGTH,
    VIDEO_NEGATIVE_PROMPT,
    GenerationDefaults,
    Task,
    Variant,
    generation_defaults,
)

logger = logging.getLogger(__name__)

DEFAULT_NEGATIVE_PROMPT = VIDEO_NEGATIVE_PROMPT
DEFAULT_MAX_SEQUENCE_LENGTH = VIDEO_MAX_SEQUENCE_LENGTH
DEFAULT_OUTPUT_TYPE = "pil"
# The tensors a ``callback_on_step_end`` may read and replace (diffusers' names).
CALLBACK_TENSOR_INPUTS = (
    "latents",
    "prompt_embeds_qwen",
    "prompt_embeds_clip",
    "negative_prompt_embeds_qwen",
    "negative_prompt_embeds_clip",
)
DEFAULT_CALLBACK_TENSOR_INPUTS = ("latents",)
# Integer parameters: any integral type (numpy's too) is taken as a Python int.
INTEGER_PARAMETERS = (
    "height",
    "width",
    "num_frames",
    "num_inference_steps",
    "num_videos_per_prompt",
    "max_sequence_length",
)
# Each branch's precomputed text: the three tensors come together or not at all.
EMBEDDING_PARTS = ("embeds_qwen", "embeds_clip", "cu_seqlens")


class RequestError(ValueError):
    """Input a generation cannot use; ``parameter`` names the argument (the command line maps it to its option)."""

    def __init__(self, parameter: str, message: str):
        super().__init__(message)
        self.parameter = parameter


@dataclass(frozen=True)
class ModelFacts:
    """What validating a request needs to know of the model (all official checkpoints share the sizes below)."""

    variant: Variant | None = None
    nabla: bool = False
    task: Task = Task.TEXT_TO_VIDEO
    spatial_compression: int = 8
    temporal_compression: int = 4
    spatial_patch: int = 2
    noise_channels: int = 16
    # noise, then (image-conditioned models) condition channels and a mask channel
    latent_channels: int = 33
    # the widths of the Qwen hidden states and the CLIP pooled output the transformer takes (None: not known)
    text_dim: int | None = None
    pooled_text_dim: int | None = None

    @classmethod
    def of_pipeline(cls, pipe) -> ModelFacts:
        config = pipe.transformer.config
        return cls(
            variant=pipe.model_variant,
            nabla=config.uses_nabla,
            task=pipe.task,
            spatial_compression=pipe.vae_scale_factor_spatial,
            temporal_compression=pipe.vae_scale_factor_temporal,
            spatial_patch=config.patch_size[1],
            noise_channels=config.in_visual_dim,
            latent_channels=config.visual_input_dim,
            text_dim=config.in_text_dim,
            pooled_text_dim=config.in_text_dim2,
        )

    @property
    def image_to_video(self) -> bool:
        return self.task is Task.IMAGE_TO_VIDEO

    @property
    def makes_images(self) -> bool:
        return self.task.makes_images

    @property
    def defaults(self) -> GenerationDefaults:
        """The values of arguments left as ``None``: the variant's, else the reference's for the task."""
        return generation_defaults(self.variant, self.task)

    @property
    def per_prompt_parameter(self) -> str:
        """The name of the outputs-per-prompt argument (diffusers': per video or per image)."""
        return "num_images_per_prompt" if self.makes_images else "num_videos_per_prompt"

    @property
    def output_noun(self) -> str:
        return "image" if self.makes_images else "video"

    @property
    def size_multiple(self) -> int:
        """Pixels per latent token along a side."""
        return self.spatial_compression * self.spatial_patch


@dataclass(frozen=True)
class GenerationRequest:
    """Everything one call generates from; fields are ``__call__``'s parameters (see the README)."""

    prompt: list[str] | None = None
    negative_prompt: str | list[str] | None = None
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    num_videos_per_prompt: int | None = 1
    generator: torch.Generator | list[torch.Generator] | None = None
    latents: torch.Tensor | None = None
    prompt_embeds_qwen: torch.Tensor | None = None
    prompt_embeds_clip: torch.Tensor | None = None
    negative_prompt_embeds_qwen: torch.Tensor | None = None
    negative_prompt_embeds_clip: torch.Tensor | None = None
    prompt_cu_seqlens: torch.Tensor | None = None
    negative_prompt_cu_seqlens: torch.Tensor | None = None
    output_type: str | None = DEFAULT_OUTPUT_TYPE
    return_dict: bool = True
    callback_on_step_end: Any = None
    callback_on_step_end_tensor_inputs: list[str] | None = None
    max_sequence_length: int | None = None
    # rewrite the prompt into a detailed caption with the pipeline's own Qwen2.5-VL before encoding it
    expand_prompt: bool = False
    image: Any = None  # image-to-video: the first frame(s); image editing: the source image(s)

    # ------------------------------------------------------------------ building

    @classmethod
    def build(cls, facts: ModelFacts, **arguments) -> GenerationRequest:
        """Defaults filled, ``num_frames`` rounded to ``4k + 1`` (with a warning), an image model's size snapped to
        its resolutions (with a warning, as diffusers), validated."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(arguments) - known)
        if unknown:
            raise TypeError(f"got unexpected keyword arguments {unknown}")
        request = cls(**arguments).with_size_of_image(facts).with_defaults(facts).with_python_numbers()
        if facts.makes_images:
            request = request.with_snapped_size()
        check_arguments(request, facts)
        request = request.with_rounded_frames(facts.temporal_compression)
        request.check(facts)
        return request

    def with_size_of_image(self, facts: ModelFacts) -> GenerationRequest:
        """Image editing with neither ``height`` nor ``width``: the source image's size (diffusers' rule)."""
        if facts.task is not Task.IMAGE_TO_IMAGE or self.height is not None or self.width is not None:
            return self
        try:
            height, width = image_size(self.image)
        except ValueError as err:
            raise RequestError("image", str(err)) from err
        return dataclasses.replace(self, height=height, width=width)

    def with_defaults(self, facts: ModelFacts) -> GenerationRequest:
        """Arguments left as ``None`` take the variant's recommended values (else the reference's)."""
        defaults = facts.defaults
        filled = {
            name: getattr(defaults, name)
            for name in (
                "height",
                "width",
                "num_frames",
                "num_inference_steps",
                "guidance_scale",
                "negative_prompt",
                "max_sequence_length",
            )
            if getattr(self, name) is None
        }
        tensor_inputs = self.callback_on_step_end_tensor_inputs
        if hasattr(self.callback_on_step_end, "tensor_inputs"):  # diffusers' PipelineCallback objects
            tensor_inputs = self.callback_on_step_end.tensor_inputs
        return dataclasses.replace(
            self,
            **filled,
            prompt=[self.prompt] if isinstance(self.prompt, str) else self.prompt,
            num_videos_per_prompt=1 if self.num_videos_per_prompt is None else self.num_videos_per_prompt,
            output_type=self.output_type or DEFAULT_OUTPUT_TYPE,
            callback_on_step_end_tensor_inputs=list(tensor_inputs or DEFAULT_CALLBACK_TENSOR_INPUTS),
        )

    def with_snapped_size(self) -> GenerationRequest:
        """An image model's size: one of its resolutions, the nearest in aspect ratio when not (with diffusers'
        warning). Sizes that are no positive integers are left for the checks to name."""
        sizes = (self.height, self.width)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sizes):
            return self
        height, width = snap_image_size(self.height, self.width)
        if (height, width) != sizes:
            logger.warning(
                "height x width %dx%d is not one of the image model's resolutions; using %dx%d, the nearest in "
                "aspect ratio (as diffusers does).",
                self.height,
                self.width,
                height,
                width,
            )
        return dataclasses.replace(self, height=height, width=width)

    def with_python_numbers(self) -> GenerationRequest:
        """Integral values of the integer parameters (``numpy.int64``, say) as ``int``, a real guidance scale as
        ``float``; ``bool`` and everything else are left for the checks to name."""
        numbers = {
            name: int(value)
            for name in INTEGER_PARAMETERS
            if isinstance(value := getattr(self, name), Integral) and not isinstance(value, bool)
        }
        scale = self.guidance_scale
        if isinstance(scale, Real) and not isinstance(scale, bool):
            numbers["guidance_scale"] = float(scale)
        return dataclasses.replace(self, **numbers)

    def with_rounded_frames(self, temporal_compression: int) -> GenerationRequest:
        """``num_frames - 1`` made a multiple of the VAE's temporal compression, as the reference rounds it."""
        if temporal_compression == 1 or self.num_frames % temporal_compression == 1:
            return self
        rounded = max(self.num_frames // temporal_compression * temporal_compression + 1, 1)
        logger.warning(
            "`num_frames - 1` has to be divisible by %d; using num_frames=%d instead of %d.",
            temporal_compression,
            rounded,
            self.num_frames,
        )
        return dataclasses.replace(self, num_frames=rounded)

    # ------------------------------------------------------------------ what the request implies

    @property
    def batch_size(self) -> int:
        """Prompts (or rows of precomputed embeddings)."""
        return len(self.prompt) if self.prompt is not None else self.prompt_embeds_qwen.shape[0]

    @property
    def num_videos(self) -> int:
        return self.batch_size * self.num_videos_per_prompt

    @property
    def uses_guidance(self) -> bool:
        return self.guidance_scale > NO_GUIDANCE_SCALE

    def negative_prompts(self) -> list[str]:
        """The negative prompt per prompt (the model's default when none was given)."""
        negative = DEFAULT_NEGATIVE_PROMPT if self.negative_prompt is None else self.negative_prompt
        return [negative] * self.batch_size if isinstance(negative, str) else list(negative)

    def embeddings(self, branch: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The precomputed ``(embeds_qwen, embeds_clip, cu_seqlens)`` of ``"prompt"`` or ``"negative_prompt"``."""
        parts = tuple(getattr(self, f"{branch}_{part}") for part in EMBEDDING_PARTS)
        return None if parts[0] is None else parts

    def latent_shape(self, facts: ModelFacts) -> tuple[int, int, int, int, int]:
        """The noise latents ``(videos, T, H, W, C)``, channels last."""
        return noise_latent_shape(
            self.num_videos,
            self.num_frames,
            self.height,
            self.width,
            facts.noise_channels,
            facts.temporal_compression,
            facts.spatial_compression,
        )

    # ------------------------------------------------------------------ validation against a model

    def check(self, facts: ModelFacts) -> None:
        """The checks that depend on the model: size, batch, latents, image. Raises :class:`RequestError`."""
        try:
            check_size(
                self.height,
                self.width,
                self.num_frames,
                nabla=facts.nabla,
                size_multiple=facts.size_multiple,
                temporal_compression=facts.temporal_compression,
            )
        except SizeError as err:
            raise RequestError(err.parameter, str(err)) from err
        if facts.variant is not None:
            facts.variant.warn_if_untrained(self.height, self.width)
        check_embeddings(self, facts)
        check_batch(self, facts)
        check_latents(self, facts)
        check_image(self, facts)


def noise_latent_shape(
    videos: int, num_frames: int, height: int, width: int, channels: int, temporal: int, spatial: int
) -> tuple[int, int, int, int, int]:
    """The noise latents of ``videos`` videos of ``num_frames`` frames at ``height x width``, channels last, for
    a VAE compressing ``temporal`` times in time and ``spatial`` times a side."""
    return (videos, (num_frames - 1) // temporal + 1, int(height) // spatial, int(width) // spatial, channels)


def check_arguments(request: GenerationRequest, facts: ModelFacts) -> None:
    """The reference's ``check_inputs`` and ours on types and ranges (the model only names things)."""
    check_reference_inputs(
        request.prompt,
        request.negative_prompt,
        request.height,
        request.width,
        **{f"{b}_{p}": getattr(request, f"{b}_{p}") for b in ("prompt", "negative_prompt") for p in EMBEDDING_PARTS},
        callback_on_step_end_tensor_inputs=request.callback_on_step_end_tensor_inputs,
        max_sequence_length=request.max_sequence_length,
    )
    positive = (
        ("num_frames", request.num_frames, " (4k+1, e.g. 121)"),
        ("num_inference_steps", request.num_inference_steps, ""),
        (facts.per_prompt_parameter, request.num_videos_per_prompt, ""),
    )
    for name, value, hint in positive:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RequestError(name, f"`{name}` must be a positive integer{hint}, got {value!r}")
    if not isinstance(request.guidance_scale, float) or not math.isfinite(request.guidance_scale):
        raise RequestError(
            "guidance_scale",
            f"`guidance_scale` must be a finite number (1 turns guidance off), got {request.guidance_scale!r}",
        )
    if request.prompt is not None and not all(p.strip() for p in request.prompt):
        raise RequestError("prompt", f"`prompt` must not be empty: describe the {facts.output_noun}")
    if not isinstance(request.expand_prompt, bool):
        raise RequestError("expand_prompt", f"`expand_prompt` must be True or False, got {request.expand_prompt!r}")
    if request.expand_prompt and facts.makes_images:
        raise RequestError("expand_prompt", "`expand_prompt` is for the video models (their expansion instructions)")
    if request.expand_prompt and request.prompt is None:
        raise RequestError("expand_prompt", "`expand_prompt` needs a text `prompt` (it cannot expand embeddings)")
    callback = request.callback_on_step_end
    if callback is not None and not callable(callback):
        raise RequestError(
            "callback_on_step_end",
            f"`callback_on_step_end` must be callable as callback(pipe, step, timestep, tensors), got {callback!r}",
        )
    if request.output_type not in OUTPUT_TYPES:
        raise RequestError("output_type", f"`output_type` must be one of {OUTPUT_TYPES}, got {request.output_type!r}")
    generator = request.generator
    generators = generator if isinstance(generator, list) else [generator]
    if generator is not None and not (generators and all(isinstance(g, torch.Generator) for g in generators)):
        raise RequestError("generator", "`generator` must be a torch.Generator or a non-empty list of them")
    if request.latents is not None and not isinstance(request.latents, torch.Tensor):
        raise RequestError("latents", "`latents` must be a torch.Tensor")


def check_reference_inputs(
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
    """The reference's ``check_inputs``: :class:`RequestError` naming the parameter."""
    length = max_sequence_length
    if length is not None and (isinstance(length, bool) or not isinstance(length, int) or not 1 <= length <= LIMIT):
        raise RequestError(
            "max_sequence_length",
            f"max_sequence_length must be an integer between 1 and {LIMIT}, got {max_sequence_length!r}",
        )
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise RequestError(name, f"`{name}` must be an integer number of pixels, got {value!r}")
        if value % SIZE_MULTIPLE:
            raise RequestError(
                name, f"`height` and `width` have to be divisible by {SIZE_MULTIPLE} but are {height} and {width}."
            )
    unknown = [k for k in callback_on_step_end_tensor_inputs or () if k not in CALLBACK_TENSOR_INPUTS]
    if unknown:
        raise RequestError(
            "callback_on_step_end_tensor_inputs",
            f"`callback_on_step_end_tensor_inputs` has to be in {list(CALLBACK_TENSOR_INPUTS)}, but found {unknown}",
        )
    groups = (
        ("prompt", (prompt_embeds_qwen, prompt_embeds_clip, prompt_cu_seqlens)),
        ("negative_prompt", (negative_prompt_embeds_qwen, negative_prompt_embeds_clip, negative_prompt_cu_seqlens)),
    )
    for branch, group in groups:
        if any(x is not None for x in group) and any(x is None for x in group):
            missing = next(f"{branch}_{part}" for part, x in zip(EMBEDDING_PARTS, group, strict=True) if x is None)
            raise RequestError(
                missing,
                f"If any of `{branch}_embeds_qwen`, `{branch}_embeds_clip`, or `{branch}_cu_seqlens` is provided, "
                f"all three must be provided (`{missing}` is missing).",
            )
    if prompt is None and prompt_embeds_qwen is None:
        raise RequestError(
            "prompt",
            "Provide either `prompt` or `prompt_embeds_qwen` (and corresponding `prompt_embeds_clip` and "
            "`prompt_cu_seqlens`). Cannot leave all undefined.",
        )
    for name, value in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        if value is not None and not isinstance(value, str | list):
            raise RequestError(name, f"`{name}` has to be of type `str` or `list` but is {type(value)}")
        if isinstance(value, list) and not all(isinstance(p, str) for p in value):
            raise RequestError(name, f"`{name}` must be a list of strings")


def check_batch(request: GenerationRequest, facts: ModelFacts) -> None:
    """Negative prompts, precomputed embeddings and generators agree with the number of prompts and outputs."""
    batch = request.batch_size
    negative = request.negative_prompt
    if request.prompt is not None and isinstance(negative, list) and len(negative) != batch:
        raise RequestError(
            "negative_prompt", f"`negative_prompt` must have same length as `prompt`. Got {len(negative)} vs {batch}."
        )
    for branch in ("prompt", "negative_prompt"):
        parts = request.embeddings(branch)
        if parts is None:
            continue
        rows = parts[0].shape[0]
        if rows not in (1, batch) or parts[1].shape[0] != rows or parts[2].numel() != rows + 1:
            raise RequestError(
                f"{branch}_embeds_qwen",
                f"`{branch}_embeds_qwen`, `{branch}_embeds_clip` and `{branch}_cu_seqlens` must describe {batch} "
                f"prompt(s) (or 1): got {rows} and {parts[1].shape[0]} rows and {parts[2].numel()} cu_seqlens",
            )
    generator = request.generator
    if isinstance(generator, list) and len(generator) not in (1, request.num_videos):
        raise RequestError(
            "generator",
            f"`generator` is a list of {len(generator)} generators, but the effective batch size "
            f"(prompts x {facts.per_prompt_parameter}) is {request.num_videos}; pass one generator or one per "
            f"{facts.output_noun}.",
        )


def check_embeddings(request: GenerationRequest, facts: ModelFacts) -> None:
    """Precomputed embeddings fit the model's text widths, and their ``cu_seqlens`` describe their rows."""
    for branch in ("prompt", "negative_prompt"):
        parts = request.embeddings(branch)
        if parts is None:
            continue
        for part, value in zip(EMBEDDING_PARTS, parts, strict=True):
            if not isinstance(value, torch.Tensor):
                raise RequestError(f"{branch}_{part}", f"`{branch}_{part}` must be a torch.Tensor, got {type(value)}")
        qwen, clip, cu_seqlens = parts
        for name, tensor, width in (
            (f"{branch}_embeds_qwen", qwen, facts.text_dim),
            (f"{branch}_embeds_clip", clip, facts.pooled_text_dim),
        ):
            expected_ndim = 3 if name.endswith("qwen") else 2
            if tensor.ndim != expected_ndim or (width is not None and tensor.shape[-1] != width):
                raise RequestError(
                    name,
                    f"`{name}` must have {expected_ndim} dimensions, the last of width {width}, "
                    f"got {tuple(tensor.shape)}",
                )
        lengths = cu_seqlens.diff()
        if int(cu_seqlens[0]) != 0 or bool((lengths < 1).any()) or bool((lengths > qwen.shape[1]).any()):
            raise RequestError(
                f"{branch}_cu_seqlens",
                f"`{branch}_cu_seqlens` must start at 0 and step by each row's token count, 1 to {qwen.shape[1]} "
                f"(the length of `{branch}_embeds_qwen`), got {cu_seqlens.tolist()}",
            )


def check_latents(request: GenerationRequest, facts: ModelFacts) -> None:
    """Given ``latents`` hold the noise channels of every video, or every channel."""
    if request.latents is None:
        return
    shape = request.latent_shape(facts)
    full = shape[:-1] + (facts.latent_channels,)
    if tuple(request.latents.shape) not in (shape, full):
        got = tuple(request.latents.shape)
        raise RequestError("latents", f"`latents` must have shape {shape} (or {full}), got {got}")


def check_image(request: GenerationRequest, facts: ModelFacts) -> None:
    """Image-to-video and editing: a valid ``image``, one for all prompts or one per prompt; the other models
    take none."""
    if not facts.task.takes_image:
        if request.image is not None:
            kind = "text-to-image" if facts.makes_images else "text-to-video"
            raise TypeError(f"a {kind} pipeline got an unexpected keyword argument 'image'")
        return
    try:
        num_images = count_images(request.image)
    except ValueError as err:
        raise RequestError("image", str(err)) from err
    if num_images not in (1, request.batch_size):
        raise RequestError(
            "image",
            f"`image` holds {num_images} images for {request.batch_size} prompts; pass one image, or one per prompt",
        )
