"""The HTTP API of ``kandinsky5 serve`` (FastAPI): OpenAI-style video jobs over the job store and the worker.

Routes (``/v1`` ones need the token when the server has one: ``Authorization: Bearer TOKEN``, or the cookie
``kandinsky5_token``, which browsers send with ``EventSource`` and ``<video>`` requests that cannot carry a header):

- ``POST /v1/videos``: JSON or a multipart form (the image as the file ``input_reference``); validated by building
  the same ``GenerationRequest`` as the command line before anything is queued; the job object.
- ``GET /v1/videos``: ``limit`` (1..100, default 20), ``after`` (an id: the page after it), ``order`` (``desc``,
  newest first, or ``asc``); ``{"object": "list", "data", "has_more", "first_id", "last_id"}``.
- ``GET /v1/videos/{id}``; ``/content`` (``video/mp4``, byte ranges); ``/preview`` (JPEG); ``/events``
  (server-sent events: ``progress``, ``preview``, ``status``; the stream ends after a final status).
- ``DELETE /v1/videos/{id}``: a queued or running job is cancelled (its status becomes ``cancelled``) and its
  files removed; a finished one (completed, failed, cancelled) is removed altogether (then 404).
- ``GET /v1/models``, ``GET /health``, ``GET /`` (the web page) and ``/static/...``.

Errors are JSON ``{"error": {"message", "type", "param"}}``: 400 for bad input (``param`` names the field), 401
without the token, 404, 413 for a body over ``max_body_bytes``. The handlers only read SQLite (short
transactions), so they answer within milliseconds while a job runs in the worker's thread.
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import json
import re
import secrets
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from kandinsky5.serve import schemas
from kandinsky5.serve.schemas import SERVER_ERROR, VideoCreateParams, error_body, video_object
from kandinsky5.serve.store import CANCELLED, Job, JobStore, new_job_id, valid_job_id
from kandinsky5.serve.worker import (
    END_OF_STREAM,
    EventHub,
    ServeSettings,
    Worker,
    generation_request,
    step_cache_config,
)

STATIC_DIR = Path(__file__).resolve().parent / "static"
# The largest request body (a create request with its image).
MAX_BODY_BYTES = 20 * 1024 * 1024
TOKEN_COOKIE = "kandinsky5_token"
MAX_LIST_LIMIT = 100
DEFAULT_LIST_LIMIT = 20
# An idle event stream gets a comment this often (proxies keep it open, and a gone client is noticed).
EVENTS_KEEPALIVE_S = 15.0
# Default seeds are drawn below this (they stay exact in JavaScript numbers); given seeds go up to 2**64 - 1.
DEFAULT_SEED_BOUND = 2**31
# create-request fields -> the GenerationRequest parameters that the request checks name
PARAMETER_OF_FIELD = {"size": ("height", "width"), "input_reference": ("image",)}
LOOPBACK_NAMES = frozenset({"localhost"})
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
MAX_FORM_FIELDS = 32
# a width or a height of a size: 1 to 6 ASCII digits
SIZE_NUMBER = re.compile(r"[0-9]{1,6}")


class ApiError(Exception):
    """An error answered as ``{"error": {...}}`` with ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) stays on this machine."""
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------- middleware


class GuardMiddleware:
    """Checks made before any route runs (pure ASGI, so bodies are counted as they arrive):

    - the body is at most ``max_body_bytes`` (413, from its Content-Length at once, else as it streams);
    - with ``loopback_only`` (a loopback server without a token), the Host header names the loopback: a web page
      on another site cannot reach the API through a DNS name of its own rebound to 127.0.0.1 (a reverse proxy in
      front of the server must pass a loopback Host, or the server needs a token);
    - a request that changes state and carries an ``Origin`` comes from this server's own origin (no other site's
      page can submit or delete jobs with a visitor's browser).
    """

    def __init__(self, app, max_body_bytes: int, loopback_only: bool):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.loopback_only = loopback_only

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        host = headers.get("host", "")
        refused = None
        if self.loopback_only and not is_loopback(urlsplit(f"//{host}").hostname or ""):
            refused = (
                400,
                f"Host {host!r} is refused: a server without --token answers only requests addressed to localhost",
                None,
            )
        origin = headers.get("origin")
        if refused is None and scope["method"] in UNSAFE_METHODS and origin and origin != "null":
            if urlsplit(origin).netloc.lower() != host.lower():
                refused = (403, f"requests from {origin} may not change jobs here (cross-site)", None)
        length = headers.get("content-length")
        if refused is None and length is not None:
            if not length.isdigit():
                refused = (400, "Content-Length is not a number", None)
            elif int(length) > self.max_body_bytes:
                refused = (413, self._too_large(), None)
        if refused is not None:
            status, message, param = refused
            response = JSONResponse(error_body(message, param), status_code=status)
            return await response(scope, receive, send)

        received = 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise StarletteHTTPException(413, self._too_large())
            return message

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-content-type-options", b"nosniff")]
            await send(message)

        try:
            await self.app(scope, counted_receive, send_with_headers)
        except ClientDisconnect:  # the client went away while it sent its body: no one to answer, nothing to log
            pass

    def _too_large(self) -> str:
        return f"the request body is larger than {self.max_body_bytes // (1024 * 1024)} MB"


# ---------------------------------------------------------------------------------------------- the app


def create_app(
    settings: ServeSettings,
    store: JobStore,
    worker: Worker,
    hub: EventHub,
    token: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    loopback_only: bool = False,
    static_dir: Path = STATIC_DIR,
) -> FastAPI:
    """The API over ``store`` and ``worker`` (see the module doc). ``token``: the bearer token the ``/v1`` routes
    need (``None``: none). ``loopback_only``: answer only requests addressed to a loopback host name."""
    app = FastAPI(title="kandinsky5", summary="Kandinsky 5.0 video generation", docs_url="/docs", redoc_url=None)
    app.add_middleware(GuardMiddleware, max_body_bytes=max_body_bytes, loopback_only=loopback_only)
    _add_error_handlers(app)

    async def check_token(request: Request) -> None:
        if token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer":
            given = request.cookies.get(TOKEN_COOKIE, "")
        if not (given and secrets.compare_digest(given.strip().encode(), token.encode())):
            raise ApiError(401, "a valid token is required: send the header `Authorization: Bearer TOKEN`")

    router = APIRouter(prefix="/v1", dependencies=[Depends(check_token)])

    def job_or_404(video_id: str) -> Job:
        job = store.get(video_id) if valid_job_id(video_id) else None
        if job is None:
            raise ApiError(404, f"no video with id {video_id[:80]!r}", "video_id")
        return job

    def as_object(job: Job) -> dict:
        return video_object(job, store.queue_position(job))

    @router.post("/videos", response_model=schemas.Video)
    async def create_video(request: Request):
        fields, image_bytes = await read_create_body(request)
        job = await run_in_threadpool(submit, settings, store, fields, image_bytes)
        worker.wake()
        return JSONResponse(as_object(job))

    # The quick reads (a job, a page of the list, the event stream's) run in the event loop itself: an SQLite
    # read in WAL mode takes well under a millisecond and never waits for the worker's writes, and a hop to the
    # thread pool would cost more, above all while the worker's thread competes for the GIL. Handlers that touch
    # files or write are plain functions (the thread pool).
    @router.get("/videos", response_model=schemas.VideoList)
    async def list_videos(
        limit: int = Query(DEFAULT_LIST_LIMIT, ge=1, le=MAX_LIST_LIMIT),
        after: str | None = None,
        order: str = Query("desc", pattern="^(asc|desc)$"),
    ):
        cursor = None
        if after is not None:
            cursor = store.get(after) if valid_job_id(after) else None
            if cursor is None:
                raise ApiError(400, f"after: no video with id {after[:80]!r}", "after")
        jobs, has_more = store.list(limit, cursor, order)
        return JSONResponse(
            schemas.VideoList(
                data=[as_object(job) for job in jobs],
                has_more=has_more,
                first_id=jobs[0].id if jobs else None,
                last_id=jobs[-1].id if jobs else None,
            ).model_dump()
        )

    @router.get("/videos/{video_id}", response_model=schemas.Video)
    async def get_video(video_id: str):
        return JSONResponse(as_object(job_or_404(video_id)))

    @router.get("/videos/{video_id}/content", response_class=FileResponse)
    def get_content(video_id: str):
        job = job_or_404(video_id)
        path = store.video_path(job.id)
        if job.status != "completed" or not path.is_file():
            raise ApiError(404, f"video {job.id} has no content: it is {job.status}", "video_id")
        return FileResponse(path, media_type="video/mp4", filename=f"{job.id}.mp4", content_disposition_type="inline")

    @router.get("/videos/{video_id}/preview")
    def get_preview(video_id: str):
        job = job_or_404(video_id)
        try:  # read whole: the worker replaces the file while it runs (a streamed file could change size)
            data = store.preview_path(job.id).read_bytes()
        except FileNotFoundError:
            raise ApiError(404, f"video {job.id} has no preview yet", "video_id") from None
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "no-store"})

    @router.get("/videos/{video_id}/events")
    async def get_events(video_id: str):
        job_or_404(video_id)
        return StreamingResponse(
            event_stream(store, hub, video_id),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @router.delete("/videos/{video_id}", response_model=schemas.VideoDeleted)
    def delete_video(video_id: str):
        job = job_or_404(video_id)
        if store.cancel(job.id) is not None:  # it was queued or running: now cancelled
            worker.cancel(job.id)
            hub.publish_status(job.id)
        elif not store.delete(job.id):
            raise ApiError(404, f"no video with id {video_id!r}", "video_id")  # deleted meanwhile
        store.remove_files(job.id)
        return JSONResponse(schemas.VideoDeleted(id=job.id).model_dump())

    @router.get("/models", response_model=schemas.ModelList)
    async def list_models():
        model = schemas.ModelObject(id=settings.model_id, task=settings.task)
        return JSONResponse(schemas.ModelList(data=[model]).model_dump())

    app.include_router(router)

    @app.get("/health")
    async def health():
        if not worker.alive:
            return JSONResponse({"status": "error", "message": "the worker thread has stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/", include_in_schema=False)
    def index():
        page = static_dir / "index.html"
        if page.is_file():
            return FileResponse(page, media_type="text/html")
        return HTMLResponse(
            "<!doctype html><title>kandinsky5</title><p>kandinsky5 serve: the web page is not installed; "
            'the API is under <a href="/docs">/v1</a>.</p>'
        )

    if static_dir.is_dir():
        app.mount("/static", StaticFiles(directory=static_dir), name="static")
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        return JSONResponse(error_body(err.message, err.param), status_code=err.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError):
        param, message = first_error(err.errors())
        return JSONResponse(error_body(message, param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        message = err.detail if isinstance(err.detail, str) else json.dumps(err.detail)
        if err.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        return JSONResponse(error_body(message), status_code=err.status_code, headers=err.headers)

    @app.exception_handler(Exception)
    async def server_error(request: Request, err: Exception):
        message = f"internal error: {type(err).__name__}: {' '.join(str(err).split())}"[:300]
        return JSONResponse(error_body(message, kind=SERVER_ERROR), status_code=500)


def first_error(errors) -> tuple[str | None, str]:
    """The field and a one-line message of pydantic's first error."""
    if not errors:
        return None, "invalid request"
    error = errors[0]
    location = [str(part) for part in error.get("loc", ()) if part not in ("body", "query", "path")]
    param = location[0] if location else None
    message = error.get("msg", "invalid value")
    if error.get("type") == "extra_forbidden":
        message = "unknown parameter"
    return param, f"{param}: {message}" if param else message


# ---------------------------------------------------------------------------------------------- creating a job


async def read_create_body(request: Request) -> tuple[dict, bytes | None]:
    """The fields of a create request and its image's bytes (``None``: none), from JSON or a form."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        try:
            fields = json.loads(await request.body())
        # ValueError: JSONDecodeError, UnicodeDecodeError, and an integer of over 4300 digits (Python's limit);
        # RecursionError: nesting deeper than the decoder's recursion limit (`[[[[...` of a few kB)
        except (ValueError, RecursionError) as err:
            raise ApiError(400, f"the body is not valid JSON ({' '.join(str(err).split())[:200]})") from err
        if not isinstance(fields, dict):
            raise ApiError(400, "the body must be a JSON object")
        if "input_reference" in fields:
            raise ApiError(
                400, "input_reference: send the image as a file in a multipart/form-data body", "input_reference"
            )
        return fields, None
    if content_type not in FORM_TYPES:
        raise ApiError(400, "the body must be application/json or multipart/form-data")
    form = await request.form(max_files=1, max_fields=MAX_FORM_FIELDS)
    fields: dict = {}
    image_bytes = None
    for name, value in form.multi_items():
        if name in fields or (name == "input_reference" and image_bytes is not None):
            raise ApiError(400, f"{name}: given more than once", name)
        if isinstance(value, UploadFile):
            if name != "input_reference":
                raise ApiError(400, f"{name}: only input_reference may be a file", name)
            image_bytes = await value.read()
        elif name == "input_reference":
            raise ApiError(400, "input_reference: must be an uploaded image file", "input_reference")
        else:
            fields[name] = value
    await form.close()
    return fields, image_bytes


def submit(settings: ServeSettings, store: JobStore, fields: dict, image_bytes: bytes | None) -> Job:
    """Validate a create request and queue it (see :func:`validate`); the new job."""
    values, image = validate(settings, fields, image_bytes)
    job_id = new_job_id()
    input_path = None
    if image is not None:
        from kandinsky5.io.atomic import atomic_path

        path = store.input_path(job_id)
        with atomic_path(path) as temporary:
            image.save(temporary, format="PNG")
        input_path = store.relative(path)
    try:
        return store.insert(id=job_id, model=settings.model_id, input_path=input_path, **values)
    except BaseException:
        store.remove_files(job_id)
        raise


def validate(settings: ServeSettings, fields: dict, image_bytes: bytes | None):
    """The stored values of a create request and its image (``None`` for text-to-video), checked as a pipeline
    call would check them: the request is built with ``GenerationRequest.build`` on the loaded model's facts.
    Raises :class:`ApiError` (400) naming the field."""
    from kandinsky5.cli.main import MAX_SEED, UsageError, frames_for_seconds, size_for_image
    from kandinsky5.pipelines.request import RequestError

    try:
        params = VideoCreateParams.model_validate(fields)
    except ValidationError as err:
        param, message = first_error(err.errors())
        raise ApiError(400, message, param) from err
    if params.model is not None and params.model.lower() not in settings.model_names:
        raise ApiError(400, f"model: this server serves {settings.model_id}, not {params.model!r}", "model")
    if params.seconds is not None and params.num_frames is not None:
        raise ApiError(400, "seconds: give seconds or num_frames, not both", "seconds")
    image = decode_image(image_bytes) if image_bytes is not None else None
    if image is not None and not settings.image_to_video:
        raise ApiError(
            400,
            f"input_reference: {settings.model_id} is a text-to-video model; an image needs an image-to-video model",
            "input_reference",
        )
    if image is None and settings.image_to_video:
        raise ApiError(
            400,
            f"input_reference: {settings.model_id} is an image-to-video model: upload the first frame as the file "
            "input_reference (multipart/form-data)",
            "input_reference",
        )
    width = height = None
    if params.size is not None:
        width, height = parse_size(params.size)
    elif image is not None:
        height, width = size_for_image(image, settings.variant)
    num_frames = params.num_frames
    if params.seconds is not None:
        try:
            num_frames = frames_for_seconds(params.seconds, settings.fps)
        except UsageError as err:
            raise ApiError(400, f"seconds must be a positive number, got {params.seconds}", "seconds") from err
        except OverflowError as err:  # 1e308 seconds: infinitely many frames
            raise ApiError(400, f"seconds: {params.seconds} is too long", "seconds") from err
    seed = params.seed
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise ApiError(400, f"seed: must be within 0..{MAX_SEED}, got {seed}", "seed")
    if seed is None:
        seed = secrets.randbelow(DEFAULT_SEED_BOUND)
    try:
        request = generation_request(
            settings,
            prompt=params.prompt,
            negative_prompt=params.negative_prompt,
            height=height,
            width=width,
            num_frames=num_frames,
            num_inference_steps=params.num_inference_steps,
            guidance_scale=params.guidance_scale,
            expand_prompt=params.expand_prompt,
            image=image,
        )
    except RequestError as err:
        field = field_of_parameter(err.parameter, params)
        raise ApiError(400, f"{field}: {err}", field) from err
    cache = params.cache or settings.default_cache
    try:
        step_cache_config(settings, cache, request)
    except UsageError as err:
        reason = str(err).removeprefix("--cache magcache: ")
        raise ApiError(400, f"cache: {cache} is not available here ({reason})", "cache") from err
    values = dict(
        prompt=params.prompt,
        negative_prompt=params.negative_prompt,
        width=request.width,
        height=request.height,
        num_frames=request.num_frames,
        fps=settings.fps,
        num_inference_steps=request.num_inference_steps,
        guidance_scale=request.guidance_scale,
        seed=seed,
        mode=settings.task,
        cache=cache,
        expand_prompt=request.expand_prompt,
    )
    return values, image


def field_of_parameter(parameter: str, params: VideoCreateParams) -> str:
    """The create-request field a ``RequestError`` parameter comes from."""
    if parameter == "num_frames" and params.seconds is not None:
        return "seconds"
    for field, parameters in PARAMETER_OF_FIELD.items():
        if parameter in parameters:
            return field
    return parameter


def parse_size(size: str) -> tuple[int, int]:
    """``"WIDTHxHEIGHT"`` (e.g. ``"768x512"``) -> ``(width, height)``."""
    width, separator, height = size.strip().lower().partition("x")
    # ASCII digits only (str.isdigit takes "²", which int() refuses), and few (int() refuses over 4300)
    if not (separator and SIZE_NUMBER.fullmatch(width) and SIZE_NUMBER.fullmatch(height)):
        raise ApiError(400, f"size: expected WIDTHxHEIGHT in pixels, e.g. 768x512, got {size[:40]!r}", "size")
    return int(width), int(height)


def decode_image(data: bytes):
    """The uploaded image, decoded and checked (at most ``MAX_IMAGE_PIXELS``, counted before decoding), as RGB
    with its EXIF orientation applied. Raises :class:`ApiError` naming ``input_reference``."""
    import warnings

    import PIL.Image

    from kandinsky5.io import load_image
    from kandinsky5.io.preprocess import MAX_IMAGE_PIXELS

    if not data:
        raise ApiError(400, "input_reference: the uploaded file is empty", "input_reference")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            image = PIL.Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise ApiError(
                    400,
                    f"input_reference: an image of {width * height:,} pixels is too large (at most "
                    f"{MAX_IMAGE_PIXELS:,}); downscale it first",
                    "input_reference",
                )
            image.load()
            return load_image(image)
    except ApiError:
        raise
    except PIL.UnidentifiedImageError as err:
        raise ApiError(400, "input_reference: not an image (no format PIL reads)", "input_reference") from err
    except Exception as err:  # PIL raises many kinds for broken files
        reason = " ".join(f"{type(err).__name__}: {err}".split())[:200]
        raise ApiError(
            400, f"input_reference: not an image this server can read ({reason})", "input_reference"
        ) from err


# ---------------------------------------------------------------------------------------------- events


def sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data, allow_nan=False)}\n\n"


async def event_stream(store: JobStore, hub: EventHub, job_id: str):
    """A job's server-sent events: its status now, then every progress, preview and status event, until a final
    status (completed, failed, cancelled)."""
    subscription = hub.subscribe(job_id)  # before the first read: nothing between them is missed
    try:
        job = store.get(job_id)
        if job is None:
            return
        yield sse("status", video_object(job, store.queue_position(job)))
        if job.finished:
            return
        while True:
            try:
                event, data = await asyncio.wait_for(subscription.get(), EVENTS_KEEPALIVE_S)
            except TimeoutError:
                job = store.get(job_id)
                if job is None or job.finished:  # a status event lost to a race: end all the same
                    if job is not None:
                        yield sse("status", video_object(job, None))
                    return
                yield ": keep-alive\n\n"
                continue
            if event == END_OF_STREAM:
                return
            yield sse(event, data)
            if event == "status" and data["status"] in (CANCELLED, "completed", "failed"):
                return
    finally:
        subscription.close()
