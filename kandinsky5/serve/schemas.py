"""The API's request and response bodies (pydantic), in the shapes of OpenAI's video API where it has one.

The job object (:class:`Video`) is built from a stored job by :func:`video_object`; errors have OpenAI's shape
``{"error": {"message", "type", "param"}}`` (:func:`error_body`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator

from kandinsky5.serve.store import Job

Status = Literal["queued", "in_progress", "completed", "failed", "cancelled"]
Mode = Literal["t2v", "i2v"]
CacheMode = Literal["none", "magcache"]
# The fields of a create request that take numbers (a JSON true is no number, although pydantic would take it).
NUMBER_FIELDS = ("seconds", "num_frames", "seed", "num_inference_steps", "guidance_scale")
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
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    cache: CacheMode | None = None
    model: str | None = None

    @field_validator(*NUMBER_FIELDS, mode="before")
    @classmethod
    def _no_booleans(cls, value):
        if isinstance(value, bool):
            raise ValueError("expected a number, got a boolean")
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
        mode=job.mode,
        queue_position=queue_position,
    ).model_dump()


def error_body(message: str, param: str | None = None, kind: str = INVALID_REQUEST) -> dict:
    return ErrorBody(error=ErrorDetail(message=message, type=kind, param=param)).model_dump()
