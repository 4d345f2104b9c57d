"""The API's request and response bodies (pydantic), in the shapes of OpenAI's video API where it has one.

The job object (:class:`Video`) is built from a stored job by :func:`video_object`; errors have OpenAI's shape
``{"error": {"message", "type", "param"}}`` (:func:`error_body`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kandinsky5.serve.store import Job

Status = Literal["queued", "in_progress", "completed", "failed", "cancelled"]
Mode = Literal["t2v", "i2v"]
CacheMode = Literal["none", "magcache"]
# The fields of a create request that take numbers (a JSON true is no number, although pydantic would take it).
NUMBER_FIELDS = ("seconds", "num_frames", "seed", "num_inference_steps", "guidance_scale")
# The fields of a create request that take text (JSON's "\ud800" decodes to a lone surrogate, which is no Unicode:
# SQLite and the JSON answer could not encode it).
TEXT_FIELDS = ("prompt", "negative_prompt", "size", "model")
# The most steps a job may ask for (the models' defaults are 16 to 50): its timesteps fit in memory and its number
# in SQLite (2**63 was a 500; 10**10 would allocate 80 GB of timesteps in the worker).
MAX_INFERENCE_STEPS = 100_000
INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"


class VideoCreateParams(BaseModel):
    """``POST /v1/videos`` (JSON, or the fields of a multipart form; the image comes as the file
    ``input_reference``). Values left out take the model's defaults; ``seconds`` and ``num_frames`` are two ways
    to give the length."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    negative_prompt: str | None = None
    seconds: float | None = None
    num_frames: int | None = None
    size: str | None = None
    seed: int | None = None
    num_inference_steps: int | None = Field(None, le=MAX_INFERENCE_STEPS)
    guidance_scale: float | None = None
    cache: CacheMode | None = None
    # rewrite the prompt into a detailed caption with the model's own Qwen2.5-VL first
    expand_prompt: bool = False
    model: str | None = None

    @field_validator(*NUMBER_FIELDS, mode="before")
    @classmethod
    def _no_booleans(cls, value):
        if isinstance(value, bool):
            raise ValueError("expected a number, got a boolean")
        return value

    @field_validator(*TEXT_FIELDS)
    @classmethod
    def _valid_unicode(cls, value):
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("not valid Unicode (it has a lone surrogate such as \\ud800)") from None
        return value


class VideoError(BaseModel):
    message: str


class Video(BaseModel):
    """A job: ``GET /v1/videos/{id}``, and the answer to ``POST /v1/videos``."""

    id: str
    object: Literal["video"] = "video"
    model: str
    status: Status
    progress: int
    created_at: int
    completed_at: int | None
    error: VideoError | None
    seconds: str
    size: str
    seed: int
    prompt: str
    num_frames: int
    num_inference_steps: int
    guidance_scale: float
    expand_prompt: bool
    mode: Mode
    queue_position: int | None


class VideoList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Video]
    has_more: bool
    first_id: str | None
    last_id: str | None


class VideoDeleted(BaseModel):
    id: str
    object: Literal["video.deleted"] = "video.deleted"
    deleted: bool = True


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    task: Mode


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


def seconds_text(num_frames: int, fps: int) -> str:
    """The video's length as OpenAI writes it (a string): the time the frames span, ``(frames - 1) / fps``
    (121 frames at 24 fps: "5")."""
    return f"{(num_frames - 1) / fps:g}"


def video_object(job: Job, queue_position: int | None) -> dict:
    """The job object of ``job`` (a JSON-ready dict)."""
    return Video(
        id=job.id,
        model=job.model,
        status=job.status,
        progress=job.progress,
        created_at=job.created_at,
        completed_at=job.completed_at,
        error=None if job.error is None else VideoError(message=job.error),
        seconds=seconds_text(job.num_frames, job.fps),
        size=f"{job.width}x{job.height}",
        seed=job.seed,
        prompt=job.prompt,
        num_frames=job.num_frames,
        num_inference_steps=job.num_inference_steps,
        guidance_scale=job.guidance_scale,
        expand_prompt=job.expand_prompt,
        mode=job.mode,
        queue_position=queue_position,
    ).model_dump()


def error_body(message: str, param: str | None = None, kind: str = INVALID_REQUEST) -> dict:
    # a lone surrogate of the request (an unknown field named "\ud800") written as its escape: the answer is UTF-8
    message, param = (
        None if text is None else text.encode("utf-8", "backslashreplace").decode() for text in (message, param)
    )
    return ErrorBody(error=ErrorDetail(message=message, type=kind, param=param)).model_dump()
