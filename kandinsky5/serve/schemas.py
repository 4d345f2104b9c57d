"""The API's request and response bodies (pydantic), in the shapes of OpenAI's video and image APIs where they have
one.

The job object (:class:`Video`, also for image jobs: ``"object": "image"``) is built from a stored job by
:func:`video_object`; errors have OpenAI's shape ``{"error": {"message", "type", "param"}}`` (:func:`error_body`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kandinsky5.serve.store import Job

Status = Literal["queued", "in_progress", "completed", "failed", "cancelled"]
Mode = Literal["t2v", "i2v", "t2i", "i2i"]
CacheMode = Literal["none", "magcache"]
ResponseFormat = Literal["url", "b64_json"]
# The fields of a create request that take numbers (a JSON true is no number, although pydantic would take it).
NUMBER_FIELDS = ("seconds", "num_frames", "seed", "num_inference_steps", "guidance_scale")
# The fields of a create request that take text (JSON's "\ud800" decodes to a lone surrogate, which is no Unicode:
# SQLite and the JSON answer could not encode it).
TEXT_FIELDS = ("prompt", "negative_prompt", "size", "model")
# The most steps a job may ask for (the models' defaults are 16 to 50): its timesteps fit in memory and its number
# in SQLite (2**63 was a 500; 10**10 would allocate 80 GB of timesteps in the worker).
MAX_INFERENCE_STEPS = 100_000
# The most images one image request may ask for (``n``; OpenAI's API allows 10): a tiny batch costs a big model
# n times the memory of one image.
MAX_IMAGES = 4
INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"


def valid_unicode(value):
    """``value``, unless it is text with a lone surrogate (JSON's ``"\\ud800"``): ``ValueError``."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("not valid Unicode (it has a lone surrogate such as \\ud800)") from None
    return value


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
        return valid_unicode(value)


class ImageCreateParams(BaseModel):
    """``POST /v1/images/generations`` (JSON, or a form) and the fields of ``POST /v1/images/edits`` (a multipart
    form whose file ``image`` is the source image): OpenAI's ``prompt``, ``n``, ``size`` (``WIDTHxHEIGHT`` or
    ``auto``), ``response_format``, ``model``, ``user`` (ignored) and ``output_format`` (``png`` only); and the
    video API's ``negative_prompt``, ``seed``, ``num_inference_steps``, ``guidance_scale``, ``cache``. Values left
    out take the model's defaults."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    n: int | None = Field(None, ge=1, le=MAX_IMAGES)
    size: str | None = None
    response_format: ResponseFormat = "url"
    model: str | None = None
    negative_prompt: str | None = None
    seed: int | None = None
    num_inference_steps: int | None = Field(None, le=MAX_INFERENCE_STEPS)
    guidance_scale: float | None = None
    cache: CacheMode | None = None
    output_format: Literal["png"] = "png"
    user: str | None = None

    @field_validator("n", "seed", "num_inference_steps", "guidance_scale", mode="before")
    @classmethod
    def _no_booleans(cls, value):
        if isinstance(value, bool):
            raise ValueError("expected a number, got a boolean")
        return value

    @field_validator("prompt", "negative_prompt", "size", "model", "user")
    @classmethod
    def _valid_unicode(cls, value):
        return valid_unicode(value)


class ImageData(BaseModel):
    """One image of an answer: its URL (``response_format: "url"``) or its PNG in base64."""

    url: str | None = None
    b64_json: str | None = None


class ImagesResponse(BaseModel):
    """The answer to ``POST /v1/images/generations`` and ``/edits`` (OpenAI's shape; ``id`` names the job, whose
    images stay at the URLs of the jobs API)."""

    created: int
    data: list[ImageData]
    id: str
    size: str
    output_format: Literal["png"] = "png"


class VideoError(BaseModel):
    message: str


class Video(BaseModel):
    """A job: ``GET /v1/videos/{id}``, and the answer to ``POST /v1/videos``. An image job's object is
    ``"image"``, its ``n`` the number of its images; ``outputs``: the URLs of a completed job's video or images."""

    id: str
    object: Literal["video", "image"] = "video"
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
    n: int = 1
    outputs: list[str] | None = None


class VideoList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Video]
    has_more: bool
    first_id: str | None
    last_id: str | None


class VideoDeleted(BaseModel):
    id: str
    object: Literal["video.deleted", "image.deleted"] = "video.deleted"
    deleted: bool = True


class ModelObject(BaseModel):
    """The served model; an image model also lists its sizes (``WIDTHxHEIGHT``) and the most images a request
    may ask for."""

    id: str
    object: Literal["model"] = "model"
    task: Mode
    sizes: list[str] | None = None
    max_images: int | None = None


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


def content_url(job: Job, index: int = 0) -> str:
    """The path of a job's video, or of its ``index``-th image."""
    path = f"/v1/videos/{job.id}/content"
    return f"{path}?index={index}" if job.makes_images else path


def video_object(job: Job, queue_position: int | None) -> dict:
    """The job object of ``job`` (a JSON-ready dict)."""
    outputs = None
    if job.status == "completed":
        outputs = [content_url(job, index) for index in range(job.num_outputs if job.makes_images else 1)]
    return Video(
        id=job.id,
        object="image" if job.makes_images else "video",
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
        n=job.num_outputs,
        outputs=outputs,
    ).model_dump()


def error_body(message: str, param: str | None = None, kind: str = INVALID_REQUEST) -> dict:
    # a lone surrogate of the request (an unknown field named "\ud800") written as its escape: the answer is UTF-8
    message, param = (
        None if text is None else text.encode("utf-8", "backslashreplace").decode() for text in (message, param)
    )
    return ErrorBody(error=ErrorDetail(message=message, type=kind, param=param)).model_dump()
