"""The HTTP API of ``kandinsky5 serve`` (FastAPI): OpenAI-style video and image jobs over the job store and the
worker.

Routes (``/v1`` ones need the token when the server has one: ``Authorization: Bearer TOKEN``, or the cookie
``kandinsky5_token``, which browsers send with ``EventSource`` and ``<video>`` requests that cannot carry a header):

- ``POST /v1/videos`` (a video model): JSON or a multipart form (the image as the file ``input_reference``);
  validated by building the same ``GenerationRequest`` as the command line before anything is queued; the job
  object.
- ``POST /v1/images/generations`` (a text-to-image model; JSON or a form) and ``POST /v1/images/edits`` (an editing
  model; a multipart form with the file ``image``): OpenAI's Images API. Validated the same way and queued as a
  job like any other (listed, streamed, cancelled by the routes below), then the request waits for it (at most
  ``--image-timeout`` seconds, then 504; the job goes on) and answers OpenAI's ``{"created", "data": [{"url"} |
  {"b64_json"}]}`` (with the job's ``id`` and ``size``). ``?wait=false`` answers the job object at once (202).
- ``GET /v1/videos``: ``limit`` (1..100, default 20), ``after`` (an id: the page after it), ``order`` (``desc``,
  newest first, or ``asc``); ``{"object": "list", "data", "has_more", "first_id", "last_id"}``.
- ``GET /v1/videos/{id}`` (any job); ``/content`` (``video/mp4``, byte ranges; an image job's PNG number
  ``?index=k``, from 0); ``/preview`` (JPEG); ``/events``
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
from kandinsky5.serve.schemas import (
    MAX_IMAGES,
    SERVER_ERROR,
    ImageCreateParams,
    VideoCreateParams,
    content_url,
    error_body,
    video_object,
)
from kandinsky5.serve.store import (
    CANCELLED,
    COMPLETED,
    FAILED,
    ID_PREFIX,
    IMAGE_ID_PREFIX,
    Job,
    JobStore,
    new_job_id,
    valid_job_id,
)
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
IMAGE_PARAMETER_OF_FIELD = {"size": ("height", "width"), "image": ("image",), "n": ("num_videos_per_prompt",)}
# the image file of an edit request (OpenAI's SDK sends "image[]" for a list of images; one is taken)
EDIT_FILE_FIELDS = ("image", "image[]")
TASK_NAMES = {"t2v": "text-to-video", "i2v": "image-to-video", "t2i": "text-to-image", "i2i": "image-editing"}
# the create route of each task
CREATE_ROUTES = {
    "t2v": "POST /v1/videos",
    "i2v": "POST /v1/videos (with the first frame as the file input_reference)",
    "t2i": "POST /v1/images/generations",
    "i2i": "POST /v1/images/edits (with the image as the file image)",
}
# A waiting image request looks at its job this often even without an event (and sees a client that went away).
IMAGE_WAIT_POLL_S = 1.0
LOOPBACK_NAMES = frozenset({"localhost"})
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
MAX_FORM_FIELDS = 32
# a width or a height of a size: 1 to 6 ASCII digits
SIZE_NUMBER = re.compile(r"[0-9]{1,6}")


class ApiError(Exception):
    """An error answered as ``{"error": {...}}`` with ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = schemas.INVALID_REQUEST):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.kind = kind


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
        check_endpoint(settings, ("t2v", "i2v"))
        fields, image_bytes = await read_create_body(request)
        job = await run_in_threadpool(submit, settings, store, fields, image_bytes)
        worker.wake()
        return JSONResponse(as_object(job))

    async def create_images(request: Request, wait: bool, editing: bool):
        check_endpoint(settings, ("i2i",) if editing else ("t2i",))
        file_fields = EDIT_FILE_FIELDS if editing else ()
        fields, image_bytes = await read_create_body(request, file_fields)
        if editing and image_bytes is None:
            raise ApiError(
                400, "image: upload the image to edit as the file image (a multipart/form-data body)", "image"
            )
        job, response_format = await run_in_threadpool(submit_images, settings, store, fields, image_bytes)
        worker.wake()
        if not wait:
            return JSONResponse(as_object(job), status_code=202)
        job = await wait_for_images(request, job.id)
        return JSONResponse(await run_in_threadpool(images_response, store, job, response_format, request))

    @router.post("/images/generations", response_model=schemas.ImagesResponse)
    async def create_image(request: Request, wait: bool = True):
        return await create_images(request, wait, editing=False)

    @router.post("/images/edits", response_model=schemas.ImagesResponse)
    async def edit_image(request: Request, wait: bool = True):
        return await create_images(request, wait, editing=True)

    async def wait_for_images(request: Request, job_id: str) -> Job:
        """The job once it has finished: completed (else an :class:`ApiError`: failed 500, cancelled or deleted
        410, still running after ``settings.image_timeout_s`` 504, the server stopping 503)."""
        subscription = hub.subscribe(job_id)  # before the first read: a status event between them is not missed
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.image_timeout_s
        try:
            while True:
                job = store.get(job_id)
                if job is None or job.status == CANCELLED:
                    raise ApiError(410, f"image job {job_id} was cancelled before it completed")
                if job.status == COMPLETED:
                    return job
                if job.status == FAILED:
                    raise ApiError(500, f"image job {job_id} failed: {job.error}", kind=SERVER_ERROR)
                remaining = deadline - loop.time()
                if remaining <= 0:
                    position = store.queue_position(job)
                    where = f"queued (position {position})" if position is not None else "running"
                    raise ApiError(
                        504,
                        f"image job {job_id} is still {where} after {settings.image_timeout_s:g} s; it goes on: "
                        f"GET /v1/videos/{job_id} until it is completed, then its outputs",
                        kind=SERVER_ERROR,
                    )
                try:
                    event, _ = await asyncio.wait_for(subscription.get(), min(IMAGE_WAIT_POLL_S, remaining))
                except TimeoutError:
                    if await request.is_disconnected():  # no one to answer; the job goes on
                        raise ApiError(400, "the client went away") from None
                    continue
                if event == END_OF_STREAM:
                    raise ApiError(
                        503,
                        f"the server is stopping; image job {job_id} stays queued and runs at its next start",
                        kind=SERVER_ERROR,
                    )
        finally:
            subscription.close()

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
    def get_content(video_id: str, index: int = Query(0, ge=0, lt=MAX_IMAGES)):
        job = job_or_404(video_id)
        if index >= (job.num_outputs if job.makes_images else 1):
            raise ApiError(404, f"index: {job.id} has no output {index} (it has {job.num_outputs})", "index")
        path = store.output_paths(job)[index]
        if job.status != "completed" or not path.is_file():
            raise ApiError(404, f"video {job.id} has no content: it is {job.status}", "video_id")
        if job.makes_images:
            return FileResponse(
                path, media_type="image/png", filename=f"{job.id}-{index}.png", content_disposition_type="inline"
            )
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
        deleted = "image.deleted" if job.makes_images else "video.deleted"
        return JSONResponse(schemas.VideoDeleted(id=job.id, object=deleted).model_dump())

    @router.get("/models", response_model=schemas.ModelList)
    async def list_models():
        model = schemas.ModelObject(id=settings.model_id, task=settings.task)
        if settings.makes_images:
            model.sizes = [f"{size.width}x{size.height}" for size in image_sizes()]
            model.max_images = MAX_IMAGES
        return JSONResponse(schemas.ModelList(data=[model]).model_dump(exclude_none=True))

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
        return JSONResponse(error_body(err.message, err.param, err.kind), status_code=err.status, headers=headers)

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


async def read_create_body(
    request: Request, file_fields: tuple[str, ...] = ("input_reference",)
) -> tuple[dict, bytes | None]:
    """The fields of a create request and its image's bytes (``None``: none), from JSON or a form; the image
    comes as a file of a form, under one of ``file_fields`` (none: no file may come)."""
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
        for name in file_fields:
            if name in fields:
                raise ApiError(400, f"{name}: send the image as a file in a multipart/form-data body", name)
        return fields, None
    if content_type not in FORM_TYPES:
        raise ApiError(400, "the body must be application/json or multipart/form-data")
    # an edit may carry two files: the image, and a mask that is refused by name
    form = await request.form(max_files=max(1, len(file_fields)), max_fields=MAX_FORM_FIELDS)
    fields: dict = {}
    image_bytes = None
    for name, value in form.multi_items():
        if name in fields or (name in file_fields and image_bytes is not None):
            given = file_fields[0] if name in file_fields else name
            raise ApiError(400, f"{given}: given more than once", given)
        if isinstance(value, UploadFile):
            if name == "mask" and file_fields == EDIT_FILE_FIELDS:
                raise ApiError(400, "mask: masks are not supported (the model edits the whole image)", "mask")
            if name not in file_fields:
                allowed = f"only {file_fields[0]} may be a file" if file_fields else "no file is taken here"
                raise ApiError(400, f"{name}: {allowed}", name)
            image_bytes = await value.read()
        elif name in file_fields:
            raise ApiError(400, f"{file_fields[0]}: must be an uploaded image file", file_fields[0])
        else:
            fields[name] = value
    await form.close()
    return fields, image_bytes


def check_endpoint(settings: ServeSettings, tasks: tuple[str, ...]) -> None:
    """A create route of ``tasks`` on a model of another task: 400 naming ``model`` and the route to use."""
    if settings.task not in tasks:
        name = TASK_NAMES[settings.task]
        article = "an" if name[0] in "aeiou" else "a"
        raise ApiError(
            400,
            f"model: {settings.model_id} is {article} {name} model: create with {CREATE_ROUTES[settings.task]}",
            "model",
        )


def submit(settings: ServeSettings, store: JobStore, fields: dict, image_bytes: bytes | None) -> Job:
    """Validate a create request and queue it (see :func:`validate`); the new job."""
    values, image = validate(settings, fields, image_bytes)
    return queue(settings, store, new_job_id(ID_PREFIX), values, image)


def queue(settings: ServeSettings, store: JobStore, job_id: str, values: dict, image) -> Job:
    """Insert a validated job (its input image saved first); the new job."""
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


def parsed_params(settings: ServeSettings, params_class, fields: dict):
    """``fields`` as ``params_class`` (a pydantic model), and the ``model`` they name, if any, the served one."""
    try:
        params = params_class.model_validate(fields)
    except ValidationError as err:
        param, message = first_error(err.errors())
        raise ApiError(400, message, param) from err
    if params.model is not None and params.model.lower() not in settings.model_names:
        raise ApiError(400, f"model: this server serves {settings.model_id}, not {params.model!r}", "model")
    return params


def checked_seed(seed: int | None) -> int:
    """The request's seed, within what a ``torch.Generator`` takes; a random one when none was given."""
    from kandinsky5.cli.main import MAX_SEED

    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise ApiError(400, f"seed: must be within 0..{MAX_SEED}, got {seed}", "seed")
    return secrets.randbelow(DEFAULT_SEED_BOUND) if seed is None else seed


def checked_cache(settings: ServeSettings, asked: str | None, request) -> str:
    """The step cache of a request (the server's default when not asked), available for its size and model."""
    from kandinsky5.cli.main import UsageError

    cache = asked or settings.default_cache
    try:
        step_cache_config(settings, cache, request)
    except UsageError as err:
        reason = str(err).removeprefix("--cache magcache: ")
        raise ApiError(400, f"cache: {cache} is not available here ({reason})", "cache") from err
    return cache


def job_values(settings: ServeSettings, params, request, seed: int, cache: str, **more) -> dict:
    """The stored values of a validated request (``more``: the image jobs' output count)."""
    return dict(
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
        **more,
    )


def validate(settings: ServeSettings, fields: dict, image_bytes: bytes | None):
    """The stored values of a create request and its image (``None`` for text-to-video), checked as a pipeline
    call would check them: the request is built with ``GenerationRequest.build`` on the loaded model's facts.
    Raises :class:`ApiError` (400) naming the field."""
    from kandinsky5.cli.main import UsageError, frames_for_seconds, size_for_image
    from kandinsky5.pipelines.request import RequestError

    params = parsed_params(settings, VideoCreateParams, fields)
    if params.seconds is not None and params.num_frames is not None:
        raise ApiError(400, "seconds: give seconds or num_frames, not both", "seconds")
    image = decode_image(image_bytes, "input_reference") if image_bytes is not None else None
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
    seed = checked_seed(params.seed)
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
    cache = checked_cache(settings, params.cache, request)
    return job_values(settings, params, request, seed, cache), image


def submit_images(settings: ServeSettings, store: JobStore, fields: dict, image_bytes: bytes | None) -> tuple[Job, str]:
    """Validate an image request (see :func:`validate_images`) and queue it; the new job and the response format
    asked for."""
    values, image, response_format = validate_images(settings, fields, image_bytes)
    return queue(settings, store, new_job_id(IMAGE_ID_PREFIX), values, image), response_format


def validate_images(settings: ServeSettings, fields: dict, image_bytes: bytes | None):
    """The stored values of an image request (generation, or editing with the uploaded image), its image and its
    ``response_format``, checked by building the request with ``GenerationRequest.build`` on the model's facts. A
    ``size`` must be one of the model's sizes (absent or ``auto``: the model's default, for editing the image's
    shape). Raises :class:`ApiError` (400) naming the field."""
    from kandinsky5.pipelines.image import IMAGE_FRAMES
    from kandinsky5.pipelines.request import RequestError

    params = parsed_params(settings, ImageCreateParams, fields)
    image = decode_image(image_bytes, "image") if image_bytes is not None else None
    width = height = None
    if params.size is not None and params.size.strip().lower() != "auto":
        width, height = parse_size(params.size)
        sizes = image_sizes()
        if (width, height) not in {(size.width, size.height) for size in sizes}:
            names = ", ".join(f"{size.width}x{size.height}" for size in sizes)
            raise ApiError(400, f"size: {width}x{height} is not one of this model's sizes ({names}) nor auto", "size")
    seed = checked_seed(params.seed)
    count = params.n or 1
    try:
        request = generation_request(
            settings,
            prompt=params.prompt,
            negative_prompt=params.negative_prompt,
            height=height,
            width=width,
            num_frames=IMAGE_FRAMES,
            num_inference_steps=params.num_inference_steps,
            guidance_scale=params.guidance_scale,
            image=image,
            num_videos_per_prompt=count,
        )
    except RequestError as err:
        field = next((f for f, names in IMAGE_PARAMETER_OF_FIELD.items() if err.parameter in names), err.parameter)
        raise ApiError(400, f"{field}: {err}", field) from err
    cache = checked_cache(settings, params.cache, request)
    return job_values(settings, params, request, seed, cache, num_outputs=count), image, params.response_format


def images_response(store: JobStore, job: Job, response_format: str, request: Request) -> dict:
    """OpenAI's answer for a completed image job: each image's URL (absolute, on this server) or its PNG in
    base64."""
    import base64

    if response_format == "b64_json":
        try:
            images = [path.read_bytes() for path in store.output_paths(job)]
        except FileNotFoundError:  # deleted since it completed
            raise ApiError(410, f"image job {job.id} was deleted after it completed") from None
        data = [{"b64_json": base64.b64encode(image).decode("ascii")} for image in images]
    else:
        base = str(request.base_url).rstrip("/")
        data = [{"url": base + content_url(job, index)} for index in range(job.num_outputs)]
    return schemas.ImagesResponse(
        created=job.created_at, data=data, id=job.id, size=f"{job.width}x{job.height}"
    ).model_dump(exclude_none=True)


def image_sizes():
    """The image models' sizes (``kandinsky5.resolutions.IMAGE_RESOLUTIONS``: height, width)."""
    from kandinsky5.resolutions import IMAGE_RESOLUTIONS

    return IMAGE_RESOLUTIONS


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


def decode_image(data: bytes, param: str):
    """The uploaded image, decoded and checked (at most ``MAX_IMAGE_PIXELS``, counted before decoding), as RGB
    with its EXIF orientation applied. Raises :class:`ApiError` naming ``param`` (the file's field)."""
    import warnings

    import PIL.Image

    from kandinsky5.io import load_image
    from kandinsky5.io.preprocess import MAX_IMAGE_PIXELS

    if not data:
        raise ApiError(400, f"{param}: the uploaded file is empty", param)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            image = PIL.Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise ApiError(
                    400,
                    f"{param}: an image of {width * height:,} pixels is too large (at most "
                    f"{MAX_IMAGE_PIXELS:,}); downscale it first",
                    param,
                )
            image.load()
            return load_image(image)
    except ApiError:
        raise
    except PIL.UnidentifiedImageError as err:
        raise ApiError(400, f"{param}: not an image (no format PIL reads)", param) from err
    except Exception as err:  # PIL raises many kinds for broken files
        reason = " ".join(f"{type(err).__name__}: {err}".split())[:200]
        raise ApiError(400, f"{param}: not an image this server can read ({reason})", param) from err


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
