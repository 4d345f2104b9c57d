"""The official Kandinsky 5.0 checkpoints (video and image) and the settings each is meant to run with.

A pipeline knows its :class:`Variant` (``pipe.model_variant``, found by :func:`find_variant` when loading) and uses
its :class:`GenerationDefaults` for every ``__call__`` argument the caller leaves as ``None``; without a known
variant the defaults are the reference's (:data:`REFERENCE_DEFAULTS`).

Where the settings come from: the step counts and guidance scales are the original repository's configs
(``num_steps``, ``guidance_weight``); nocfg and distilled checkpoints were trained to run without classifier-free
guidance (guidance 1.0: one model call per step). Lite was trained at the 512 class; Pro at the 512 class ("SD")
and the 1024 class ("HD"), the latter its purpose, so Pro defaults to a 1024-class size. The scheduler shift is
only a fallback for a checkpoint folder without ``scheduler/scheduler_config.json``: 5.0 for all, the value of the
published Diffusers configs we have (Pro T2V and I2V) and the one the original repository's script passes to
every model (its per-config ``scheduler_scale`` entries, 10 for I2V and Lite 10 s nocfg, are not read by it).

The image models (text-to-image and image editing, Lite only) are a wider DiT (model_dim 2560, 50 visual blocks)
trained at the 1024 class; their defaults are diffusers' ``Kandinsky5T2IPipeline`` / ``Kandinsky5I2IPipeline``
``__call__`` defaults (50 steps, guidance 3.5, 1024x1024, an empty negative prompt) and, for a folder without a
scheduler config, the original's image shift 3.0.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from kandinsky5.pipelines.registry import I2I_PIPELINE, I2V_PIPELINE, T2I_PIPELINE, T2V_PIPELINE
from kandinsky5.resolutions import RESOLUTION_512, RESOLUTION_1024, ResolutionClass, Size, warn_if_untrained

logger = logging.getLogger(__name__)


class Task(StrEnum):
    TEXT_TO_VIDEO = "t2v"
    IMAGE_TO_VIDEO = "i2v"
    TEXT_TO_IMAGE = "t2i"
    IMAGE_TO_IMAGE = "i2i"  # image editing

    @property
    def makes_images(self) -> bool:
        return self in IMAGE_TASKS

    @property
    def takes_image(self) -> bool:
        """Whether a generation needs an input image (image-to-video, editing)."""
        return self in (Task.IMAGE_TO_VIDEO, Task.IMAGE_TO_IMAGE)


class ModelSize(StrEnum):
    LITE = "lite"
    PRO = "pro"


class AttentionType(StrEnum):
    DENSE = "dense"
    NABLA = "nabla"


class Training(StrEnum):
    """The training stage a checkpoint comes from, as its hub id spells it."""

    SFT = "sft"
    PRETRAIN = "pretrain"
    NO_CFG = "nocfg"  # classifier-free guidance distilled into the model
    DISTILLED = "distilled16steps"  # diffusion-distilled to 16 steps (and no guidance)


IMAGE_TASKS = frozenset({Task.TEXT_TO_IMAGE, Task.IMAGE_TO_IMAGE})

# the reference's negative prompt for video (diffusers' Kandinsky5T2VPipeline default)
VIDEO_NEGATIVE_PROMPT = (
    "Static, 2D cartoon, cartoon, 2d animation, paintings, images, worst quality, low quality, ugly, deformed, "
    "walking backwards"
)
VIDEO_MAX_SEQUENCE_LENGTH = 512


@dataclass(frozen=True)
class GenerationDefaults:
    """What a pipeline call uses for an argument left as ``None``."""

    num_inference_steps: int
    guidance_scale: float
    height: int
    width: int
    num_frames: int
    negative_prompt: str = VIDEO_NEGATIVE_PROMPT
    max_sequence_length: int = VIDEO_MAX_SEQUENCE_LENGTH


# diffusers' Kandinsky5T2VPipeline.__call__ defaults: used when the checkpoint is no known variant.
REFERENCE_DEFAULTS = GenerationDefaults(
    num_inference_steps=50, guidance_scale=5.0, height=512, width=768, num_frames=121
)
# diffusers' Kandinsky5T2IPipeline / Kandinsky5I2IPipeline defaults (the editing model's Qwen input holds the
# source image's tokens too, hence its longer sequence).
IMAGE_GUIDANCE = 3.5
IMAGE_SIZE = 1024
IMAGE_MAX_SEQUENCE_LENGTH = {Task.TEXT_TO_IMAGE: 512, Task.IMAGE_TO_IMAGE: 1024}
REFERENCE_IMAGE_DEFAULTS = {
    task: GenerationDefaults(
        num_inference_steps=50,
        guidance_scale=IMAGE_GUIDANCE,
        height=IMAGE_SIZE,
        width=IMAGE_SIZE,
        num_frames=1,
        negative_prompt="",
        max_sequence_length=length,
    )
    for task, length in IMAGE_MAX_SEQUENCE_LENGTH.items()
}
DEFAULT_STEPS = 50
DISTILLED_STEPS = 16
DEFAULT_GUIDANCE = 5.0
NO_GUIDANCE = 1.0  # the pipeline skips the negative prompt's model call at guidance <= 1
FPS = 24
FRAMES_BY_SECONDS = {5: 121, 10: 241}  # 4k+1 frames at 24 fps
SCHEDULER_SHIFT_FALLBACK = 5.0
IMAGE_SCHEDULER_SHIFT_FALLBACK = 3.0  # the original's image pipelines' scheduler_scale
LITE_SIZE = Size(512, 768)
PRO_SIZE = Size(768, 1280)  # the landscape 1024-class size with 768 rows
# transformer config model_dim of each model size, to recognise a checkpoint folder by its configs
MODEL_DIMS = {ModelSize.LITE: 1792, ModelSize.PRO: 4096}
IMAGE_MODEL_DIM = 2560  # the image models' DiT (Lite)
PIPELINE_CLASS_NAMES = {
    Task.TEXT_TO_VIDEO: T2V_PIPELINE,
    Task.IMAGE_TO_VIDEO: I2V_PIPELINE,
    Task.TEXT_TO_IMAGE: T2I_PIPELINE,
    Task.IMAGE_TO_IMAGE: I2I_PIPELINE,
}

HUB_OWNER = "kandinskylab"
# The organisation that first published the same repositories (the hub redirects its ids).
FORMER_HUB_OWNERS = ("ai-forever",)
# huggingface_hub's cache: <cache>/models--<owner>--<name>/snapshots/<revision>/
HUB_CACHE_REPO_PREFIX = "models--"
HUB_CACHE_SEPARATOR = "--"
HUB_CACHE_SNAPSHOTS = "snapshots"


@dataclass(frozen=True)
class Variant:
    """One official checkpoint and how it is meant to run."""

    repo_id: str
    short_name: str
    task: Task
    model_size: ModelSize
    training: Training
    duration_s: int
    defaults: GenerationDefaults
    # the class of the default size; trained_classes: every class the checkpoint was trained at
    resolution_class: ResolutionClass
    trained_classes: tuple[ResolutionClass, ...]
    attention: AttentionType
    model_dim: int
    fps: int = FPS
    scheduler_shift: float = SCHEDULER_SHIFT_FALLBACK
    aliases: tuple[str, ...] = ()

    @property
    def makes_images(self) -> bool:
        return self.task.makes_images

    @property
    def repo_name(self) -> str:
        return self.repo_id.split("/", 1)[1]

    @property
    def pipeline_class_name(self) -> str:
        return PIPELINE_CLASS_NAMES[self.task]

    @property
    def model_calls_per_step(self) -> int:
        """Transformer calls per denoising step at the default guidance (2 with classifier-free guidance)."""
        return 2 if self.defaults.guidance_scale > NO_GUIDANCE else 1

    @property
    def names(self) -> tuple[str, ...]:
        """Every name :func:`variant_by_name` accepts for it without an owner, lower case."""
        return tuple(n.lower() for n in (self.repo_name, self.short_name, *self.aliases))

    def warn_if_untrained(self, height: int, width: int) -> bool:
        """One warning when ``height x width`` is not a size this checkpoint was trained at."""
        return warn_if_untrained(height, width, self.trained_classes, self.short_name)


def _variant(repo_name: str, model_size: ModelSize, task: Task, training: Training, seconds: int) -> Variant:
    """An entry of the registry, its defaults derived from what it is."""
    guided = training in (Training.SFT, Training.PRETRAIN)
    lite = model_size is ModelSize.LITE
    size = LITE_SIZE if lite else PRO_SIZE
    kind = "distilled" if training is Training.DISTILLED else training.value
    if task is Task.TEXT_TO_VIDEO:
        short_name = f"{model_size}-{kind}-{seconds}s"
        aliases = {f"{model_size}-{training}-{seconds}s", f"{model_size}-{task}-{training}-{seconds}s"}
    else:
        short_name = f"{model_size}-{task}-{seconds}s"
        aliases = {f"{model_size}-{task}-{training}-{seconds}s"}
    return Variant(
        repo_id=f"{HUB_OWNER}/{repo_name}",
        short_name=short_name,
        task=task,
        model_size=model_size,
        training=training,
        duration_s=seconds,
        defaults=GenerationDefaults(
            num_inference_steps=DISTILLED_STEPS if training is Training.DISTILLED else DEFAULT_STEPS,
            guidance_scale=DEFAULT_GUIDANCE if guided else NO_GUIDANCE,
            height=size.height,
            width=size.width,
            num_frames=FRAMES_BY_SECONDS[seconds],
        ),
        resolution_class=RESOLUTION_512 if lite else RESOLUTION_1024,
        trained_classes=(RESOLUTION_512,) if lite else (RESOLUTION_512, RESOLUTION_1024),
        # 10 s checkpoints and every Pro checkpoint were trained with NABLA (their transformer configs say so)
        attention=AttentionType.NABLA if seconds == 10 or not lite else AttentionType.DENSE,
        model_dim=MODEL_DIMS[model_size],
        aliases=tuple(sorted(aliases - {short_name})),
    )


def _image_variant(repo_name: str, task: Task, training: Training) -> Variant:
    """An image model of the registry (Lite, dense attention, the 1024 class)."""
    kind = "t2i" if task is Task.TEXT_TO_IMAGE else "edit"
    short_name = f"lite-{kind}-{training}"
    aliases = {f"lite-{task}-{training}"}
    return Variant(
        repo_id=f"{HUB_OWNER}/{repo_name}",
        short_name=short_name,
        task=task,
        model_size=ModelSize.LITE,
        training=training,
        duration_s=0,
        defaults=REFERENCE_IMAGE_DEFAULTS[task],
        resolution_class=RESOLUTION_1024,
        trained_classes=(RESOLUTION_1024,),
        attention=AttentionType.DENSE,
        model_dim=IMAGE_MODEL_DIM,
        scheduler_shift=IMAGE_SCHEDULER_SHIFT_FALLBACK,
        aliases=tuple(sorted(aliases - {short_name})),
    )


LITE, PRO = ModelSize.LITE, ModelSize.PRO
T2V, I2V, T2I, I2I = Task.TEXT_TO_VIDEO, Task.IMAGE_TO_VIDEO, Task.TEXT_TO_IMAGE, Task.IMAGE_TO_IMAGE
VARIANTS: tuple[Variant, ...] = (
    _variant("Kandinsky-5.0-T2V-Lite-sft-5s-Diffusers", LITE, T2V, Training.SFT, 5),
    _variant("Kandinsky-5.0-T2V-Lite-sft-10s-Diffusers", LITE, T2V, Training.SFT, 10),
    _variant("Kandinsky-5.0-T2V-Lite-pretrain-5s-Diffusers", LITE, T2V, Training.PRETRAIN, 5),
    _variant("Kandinsky-5.0-T2V-Lite-pretrain-10s-Diffusers", LITE, T2V, Training.PRETRAIN, 10),
    _variant("Kandinsky-5.0-T2V-Lite-nocfg-5s-Diffusers", LITE, T2V, Training.NO_CFG, 5),
    _variant("Kandinsky-5.0-T2V-Lite-nocfg-10s-Diffusers", LITE, T2V, Training.NO_CFG, 10),
    _variant("Kandinsky-5.0-T2V-Lite-distilled16steps-5s-Diffusers", LITE, T2V, Training.DISTILLED, 5),
    _variant("Kandinsky-5.0-T2V-Lite-distilled16steps-10s-Diffusers", LITE, T2V, Training.DISTILLED, 10),
    _variant("Kandinsky-5.0-T2V-Pro-sft-5s-Diffusers", PRO, T2V, Training.SFT, 5),
    _variant("Kandinsky-5.0-T2V-Pro-sft-10s-Diffusers", PRO, T2V, Training.SFT, 10),
    _variant("Kandinsky-5.0-I2V-Lite-5s-Diffusers", LITE, I2V, Training.SFT, 5),
    _variant("Kandinsky-5.0-I2V-Pro-sft-5s-Diffusers", PRO, I2V, Training.SFT, 5),
    _image_variant("Kandinsky-5.0-T2I-Lite-sft-Diffusers", T2I, Training.SFT),
    _image_variant("Kandinsky-5.0-T2I-Lite-pretrain-Diffusers", T2I, Training.PRETRAIN),
    _image_variant("Kandinsky-5.0-I2I-Lite-sft-Diffusers", I2I, Training.SFT),
    _image_variant("Kandinsky-5.0-I2I-Lite-pretrain-Diffusers", I2I, Training.PRETRAIN),
)

_BY_NAME: dict[str, Variant] = {name: v for v in VARIANTS for name in v.names}
_BY_REPO_NAME: dict[str, Variant] = {v.repo_name.lower(): v for v in VARIANTS}
if len(_BY_NAME) != sum(len(set(v.names)) for v in VARIANTS):
    raise RuntimeError("two variants share a name")  # a registry edit gone wrong; fail on import


def generation_defaults(variant: Variant | None, task: Task = Task.TEXT_TO_VIDEO) -> GenerationDefaults:
    """The variant's defaults, or the reference's for an unknown checkpoint of ``task``."""
    if variant is not None:
        return variant.defaults
    return REFERENCE_IMAGE_DEFAULTS.get(task, REFERENCE_DEFAULTS)


def get_variant(name: str) -> Variant:
    """The variant of a hub id, short name or alias; ``KeyError`` listing the short names otherwise."""
    variant = variant_by_name(name)
    if variant is None:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(v.short_name for v in VARIANTS)}")
    return variant


def variant_by_name(name: str) -> Variant | None:
    """A hub id (``kandinskylab/...``, or the former ``ai-forever/...``), repository name, short name or alias."""
    text = str(name).strip().lower()
    owner, _, repo_name = text.rpartition("/")
    if not owner:
        return _BY_NAME.get(text)
    return _BY_REPO_NAME.get(repo_name) if owner in (HUB_OWNER, *FORMER_HUB_OWNERS) else None


def find_variant(name_or_path: str | os.PathLike | None) -> Variant | None:
    """The variant of a local checkpoint folder (see :func:`variant_for_folder`), else of a hub id or name;
    ``None`` when unknown."""
    if name_or_path is None:
        return None
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return variant_for_folder(path)
    return variant_by_name(str(name_or_path))


def variant_for_checkpoint(name_or_path: str | os.PathLike, folder: Path) -> Variant | None:
    """The variant of what ``from_pretrained`` was given: a local folder by its name and configs; a hub id by its
    name, else by the folder it was downloaded to."""
    if Path(name_or_path).expanduser().is_dir():
        return variant_for_folder(folder)
    return variant_by_name(str(name_or_path)) or variant_for_folder(folder)


def variant_for_folder(folder: Path) -> Variant | None:
    """The variant of a checkpoint folder: by its name (an official repository's name, a short name, or a hub
    cache snapshot ``models--kandinskylab--<name>/snapshots/<revision>``) when its configs agree (pipeline class
    and attention type; sizes are not compared, so small stand-ins named after a variant count); else by its
    configs when they fit exactly one variant (pipeline class, model_dim, attention type); else ``None``."""
    facts = CheckpointFacts.read(folder)
    for name in _folder_names(folder):
        variant = variant_by_name(name)
        if variant is None:
            continue
        conflict = facts.conflict(variant)
        if conflict is None:
            return variant
        logger.warning("%s is named after %s, but %s; not using its defaults", folder, variant.short_name, conflict)
        return None
    matches = [v for v in VARIANTS if facts.fits(v)]
    return matches[0] if len(matches) == 1 else None


def _folder_names(folder: Path) -> list[str]:
    names = []
    for path in dict.fromkeys((folder.absolute(), folder.resolve())):
        names.append(path.name)
        cache_repo = path.parent.parent.name
        if path.parent.name == HUB_CACHE_SNAPSHOTS and cache_repo.startswith(HUB_CACHE_REPO_PREFIX):
            owner, _, repo_name = cache_repo.removeprefix(HUB_CACHE_REPO_PREFIX).partition(HUB_CACHE_SEPARATOR)
            names.append(f"{owner}/{repo_name}")
    return names


@dataclass(frozen=True)
class CheckpointFacts:
    """What a checkpoint folder's configs say about it (``None``: not stated or not readable)."""

    pipeline_class_name: str | None
    model_dim: int | None
    attention: AttentionType | None

    @classmethod
    def read(cls, folder: Path) -> CheckpointFacts:
        index = _read_json(folder / "model_index.json")
        transformer = _read_json(folder / "transformer" / "config.json")
        attention = None
        if transformer:
            nabla = transformer.get("attention_type") == AttentionType.NABLA.value
            attention = AttentionType.NABLA if nabla else AttentionType.DENSE
        return cls(index.get("_class_name"), transformer.get("model_dim"), attention)

    @property
    def task(self) -> Task | None:
        tasks = {name: task for task, name in PIPELINE_CLASS_NAMES.items()}
        return tasks.get(self.pipeline_class_name)

    def conflict(self, variant: Variant) -> str | None:
        """Why the configs contradict ``variant`` (pipeline class or attention), or ``None``."""
        if self.pipeline_class_name is not None and self.pipeline_class_name != variant.pipeline_class_name:
            return f"its model_index.json names {self.pipeline_class_name}, not {variant.pipeline_class_name}"
        if self.attention is not None and self.attention != variant.attention:
            return f"its transformer uses {self.attention} attention, not {variant.attention}"
        return None

    def fits(self, variant: Variant) -> bool:
        return (
            self.pipeline_class_name == variant.pipeline_class_name
            and self.model_dim == variant.model_dim
            and self.attention == variant.attention
        )


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
