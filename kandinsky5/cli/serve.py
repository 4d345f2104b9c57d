"""``kandinsky5 serve``: an OpenAI-style video API, or for an image model OpenAI's Images API
(kandinsky5/serve/app.py), over one pipeline loaded at start, with a job queue persisted in ``--data-dir``
(kandinsky5/serve/store.py) and one generation worker (kandinsky5/serve/worker.py).

As ``generate`` does, it checks everything it can before loading the model: the address (a host other than the
loopback needs ``--token`` or ``--insecure-no-token``; the port is bound before loading), the data folder (one
server per folder), the model, the device and the memory, speed and cache options. Then it recovers what a
server that stopped abruptly left (a running job is queued again; one whose video was written is completed),
loads the pipeline once and serves until SIGINT or SIGTERM; the running job then stops after its current step and
goes back to the queue, to resume at the next start.

Threads: the worker runs the model in its own thread; HTTP requests are answered by uvicorn's event loop and a
thread pool, and only read SQLite. On a CPU device torch gets one core less than the process may use (at least
one), so that the API stays responsive while a job runs; on a GPU torch's CPU threads are left as they are.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from contextlib import contextmanager

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_DATA_DIR = "./kandinsky5-data"
# The token may come from the environment instead of the command line (which other users can read in `ps`).
TOKEN_ENV = "KANDINSKY5_TOKEN"
# generate's options that serve takes as they are: video quality, speed, step cache (the default of a request's
# `cache`; --cache-threshold / --cache-ratios configure it). Device, offload and quantization come from their
# helpers.
GENERATE_OPTIONS = ("quality", "attention_backend", "compile", "fuse_qkv", "cache", "cache_threshold", "cache_ratios")
# Seconds uvicorn waits for open connections (event streams) when stopping.
GRACEFUL_SHUTDOWN_S = 3
# stands in for the prompt of the request that plans memory and checks the cache options before loading
PLACEHOLDER_PROMPT = "(serve)"
# The seconds POST /v1/images/... waits for its job by default (OpenAI's client gives up after 600).
DEFAULT_IMAGE_TIMEOUT_S = 600.0


def add_serve_parser(sub) -> None:
    """The ``serve`` subcommand (``sub``: ``build_parser``'s subparsers)."""
    from kandinsky5.cli.main import add_device_options
    from kandinsky5.cli.plan import add_quantize_options

    serve = sub.add_parser(
        "serve",
        help="serve an OpenAI-style video or image API (and a web page) with a persisted job queue",
        description="Loads the model once and generates the jobs submitted to POST /v1/videos (a video model) or "
        "POST /v1/images/generations and /v1/images/edits (an image model) one at a time, in order; the queue, "
        "the videos and the images live in --data-dir and survive a restart. --cache sets the default of a "
        "request's `cache` field. Needs the serve extra: pip install 'kandinsky5[serve]'.",
    )
    serve.add_argument(
        "--model",
        required=True,
        help="short name (see `kandinsky5 models`), hub id or local checkpoint directory; text- or image-to-video, "
        "text-to-image or image editing",
    )
    serve.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST})")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any free)")
    serve.add_argument(
        "--data-dir", default=DEFAULT_DATA_DIR, help=f"the queue, videos and logs (default {DEFAULT_DATA_DIR})"
    )
    serve.add_argument(
        "--token",
        default=None,
        help=f"require `Authorization: Bearer TOKEN` on /v1 (default: ${TOKEN_ENV} if set)",
    )
    serve.add_argument(
        "--insecure-no-token",
        action="store_true",
        help="allow a host other than the loopback without a token (anyone who reaches it can use it)",
    )
    serve.add_argument(
        "--image-timeout",
        type=float,
        default=DEFAULT_IMAGE_TIMEOUT_S,
        metavar="SECONDS",
        help="how long POST /v1/images/... waits for its job before answering 504 (the job goes on; default "
        f"{DEFAULT_IMAGE_TIMEOUT_S:g})",
    )
    for action in _generate_actions(GENERATE_OPTIONS):
        serve._add_action(action)
    add_quantize_options(serve)
    add_device_options(
        serve,
        "auto (default): the fastest mode that fits the GPU's free memory for the model's default size (see "
        "`kandinsky5 plan`; none on a CPU); model, blocks, sequential: as for generate",
    )


def _generate_actions(dests: tuple[str, ...]) -> list[argparse.Action]:
    """``generate``'s argparse actions of ``dests``, shared so that both commands define each option once."""
    from kandinsky5.cli.main import add_generate_parser

    subparsers = argparse.ArgumentParser(add_help=False).add_subparsers()
    add_generate_parser(subparsers)
    generate = subparsers.choices["generate"]
    actions = [action for action in generate._actions if action.dest in dests]
    missing = set(dests) - {action.dest for action in actions}
    if missing:
        raise RuntimeError(f"generate has no options {sorted(missing)} to share with serve")
    return actions


def cmd_serve(args) -> int:
    from kandinsky5.cli.main import interrupted_during, load_pipeline

    _check_extra()
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None
    check_address(args, token)
    check_image_timeout(args)
    store = open_store(args.data_dir)
    model = resolve_served_model(args)
    default_request = model["request"]
    device, dtype = model["device"], model["dtype"]
    sock = bind(args.host, args.port)

    from kandinsky5.serve.worker import JobLog

    log = JobLog(store.root / "jobs.log")
    recovery = store.recover()
    for outcome in ("completed", "requeued", "failed"):
        for job_id in getattr(recovery, outcome):
            log.write(f"recovered-{outcome}", job_id)

    with interrupted_during("loading the model"):
        pipe = load_pipeline(args, default_request, device, dtype)
    threads = limit_torch_threads(device)

    from kandinsky5.pipelines.request import ModelFacts
    from kandinsky5.serve.app import create_app, is_loopback
    from kandinsky5.serve.store import QUEUED
    from kandinsky5.serve.worker import EventHub, ServeSettings, Worker

    settings = ServeSettings(
        model_id=model["id"],
        task=model["task"],
        facts=ModelFacts.of_pipeline(pipe),
        variant=args.variant,
        fps=model["fps"],
        quality=args.quality,
        default_cache=args.cache,
        cache_threshold=args.cache_threshold,
        cache_ratios=args.cache_ratios,
        model_names=frozenset(model["names"]),
        image_timeout_s=args.image_timeout,
    )
    hub = EventHub(store)
    worker = Worker(store, pipe, settings, hub, log, device=device, torch_threads=threads)
    # without a token, a loopback server answers only requests addressed to a loopback name (DNS rebinding)
    loopback_only = is_loopback(args.host) and token is None
    app = create_app(settings, store, worker, hub, token=token, loopback_only=loopback_only)

    server = make_server(app, hub, worker)
    host, port = sock.getsockname()[:2]
    where = f"[{host}]" if ":" in host else host
    queued = store.count(QUEUED)
    print(
        f"kandinsky5: serving {settings.model_id} ({settings.task}) on http://{where}:{port}/ on {device}"
        + (f" ({threads} torch threads)" if threads else "")
        + f"; data in {store.root}, {queued} job(s) queued"
        + ("; token required" if token else ""),
        file=sys.stderr,
        flush=True,
    )
    worker.start()
    try:
        with signals_raised_again_ignored():
            server.run(sockets=[sock])
    finally:  # also on a second Ctrl-C while the worker stops (the job is then recovered at the next start)
        worker.stop()
        sock.close()
    queued = store.count(QUEUED)
    print(f"kandinsky5: server stopped; {queued} queued job(s) run at the next start", file=sys.stderr)
    return 0


def make_server(app, hub, worker):
    """A uvicorn server for ``app`` whose SIGINT / SIGTERM also ends the event streams (uvicorn would otherwise
    wait for them) and asks the worker to stop after its current step."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            worker.request_stop()
            hub.close_all()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app, log_level="info", access_log=False, lifespan="off", timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S
    )
    return Server(config)


@contextmanager
def signals_raised_again_ignored():
    """uvicorn handles SIGINT and SIGTERM while it runs, then raises the signal again for the handler it found;
    here that handler does nothing (the command ends normally once the worker has stopped). The handlers come back
    after, so that a second signal while the worker stops interrupts the command."""
    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(signum)
        if handler != signal.SIG_IGN:
            previous[signum] = signal.signal(signum, lambda number, frame: None)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)


def _check_extra() -> None:
    from kandinsky5.cli.main import UsageError

    try:
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise UsageError(
            f"serve needs the serve extra ({err.name} is missing): pip install 'kandinsky5[serve]'"
        ) from err


def check_address(args, token: str | None) -> None:
    """The port is a port; a host other than the loopback needs a token, or the user's explicit consent."""
    from kandinsky5.cli.main import UsageError
    from kandinsky5.serve.app import is_loopback

    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be within 0..65535, got {args.port}")
    if token is not None and args.insecure_no_token:
        raise UsageError("--token and --insecure-no-token contradict each other; give one")
    if token is not None and not token.strip():
        raise UsageError("--token must not be empty")
    if not is_loopback(args.host) and token is None and not args.insecure_no_token:
        raise UsageError(
            f"--host {args.host} is reachable from other machines: give --token TOKEN (or ${TOKEN_ENV}), or "
            "--insecure-no-token to serve without one"
        )


def check_image_timeout(args) -> None:
    import math

    from kandinsky5.cli.main import UsageError

    if not (math.isfinite(args.image_timeout) and args.image_timeout > 0):
        raise UsageError(f"--image-timeout must be a positive number of seconds, got {args.image_timeout}")


def open_store(data_dir: str):
    """The job store of ``data_dir`` (created if needed), held by this process."""
    import sqlite3

    from kandinsky5.cli.main import UsageError
    from kandinsky5.serve.store import DataDirInUse, JobStore

    try:
        store = JobStore(data_dir)
        store.acquire_lock()
    except DataDirInUse as err:
        raise UsageError(f"--data-dir: {err}") from err
    except (OSError, sqlite3.Error) as err:
        raise UsageError(f"--data-dir {data_dir}: {type(err).__name__}: {err}") from err
    return store


def resolve_served_model(args) -> dict:
    """Everything about ``--model`` and the device checked before loading, as ``generate`` checks it; sets
    ``args.variant``, ``args.task`` (the pipeline class ``load_pipeline`` loads), ``args.offload`` (``auto``
    resolved for the model's default request), ``args.cache_config`` (``None``: the worker sets each job's cache)
    and ``args.no_progress``. Returns the model's id, names, task and fps, the default request (it plans memory),
    the device and the dtype."""
    from pathlib import Path

    import PIL.Image

    from kandinsky5.cli.main import (
        DEFAULT_FPS,
        UsageError,
        _check_runtime_options,
        _device_and_dtype,
        _resolve_model,
        _task_and_attention,
        cache_config,
        check_quantize_options,
    )
    from kandinsky5.cli.plan import resolve_generate_offload
    from kandinsky5.pipelines.request import GenerationRequest, ModelFacts, RequestError

    args.variant, checkpoint = _resolve_model(args)
    task, nabla = _task_and_attention(args.variant, checkpoint)
    if task is None and checkpoint is None:  # a hub id of no known variant: its model_index.json tells
        from kandinsky5.loading.hub import resolve_checkpoint

        checkpoint = resolve_checkpoint(args.model)
        task, nabla = _task_and_attention(None, checkpoint)
    if task is None:
        raise UsageError(f"--model: {args.model}'s model_index.json names no Kandinsky 5 pipeline")
    args.task = task
    if not 0 <= args.quality <= 10:
        raise UsageError(f"--quality must be within 0..10, got {args.quality}")
    device, dtype = _device_and_dtype(args)
    _check_runtime_options(args, device)
    check_quantize_options(args, device, dtype)
    facts = ModelFacts(variant=args.variant, nabla=nabla, task=task)
    image = PIL.Image.new("RGB", (64, 64)) if task.takes_image else None
    # an image is one frame; an editing model's default size is its square one (the placeholder's shape)
    frames = {"num_frames": 1} if task.makes_images else {}
    try:
        request = GenerationRequest.build(facts, prompt=PLACEHOLDER_PROMPT, image=image, output_type="np", **frames)
    except RequestError as err:
        raise UsageError(f"--model: the model's default request is invalid ({err})") from err
    # the --cache options, checked: the default cache works for the model's default request; --cache-threshold
    # and --cache-ratios configure MagCache for the requests that ask for it, even when it is not the default
    magcache_settings = args.cache_threshold is not None or args.cache_ratios is not None
    cache_config(argparse.Namespace(**{**vars(args), "cache": "magcache"}) if magcache_settings else args, request)
    args.cache_config = None
    args.no_progress = True
    resolve_generate_offload(args, request, device, dtype)

    variant = args.variant
    local = Path(args.model).expanduser()
    model_id = variant.repo_id if variant is not None else (local.name if local.is_dir() else args.model)
    names = {model_id.lower(), str(args.model).lower()}
    if variant is not None:
        names |= {variant.repo_id.lower(), variant.short_name.lower(), *variant.names}
    return dict(
        id=model_id,
        names=names,
        task=str(task),
        fps=variant.fps if variant is not None else DEFAULT_FPS,
        request=request,
        device=device,
        dtype=dtype,
    )


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (before loading, so that a taken port costs nothing); uvicorn listens on it
    once the model is loaded (until then connections are refused, not left waiting)."""
    from kandinsky5.cli.main import UsageError

    try:
        family, kind, proto = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][:3]
        # proto IPPROTO_TCP (not 0): asyncio sets TCP_NODELAY only on such sockets, and without it every small
        # response waits ~40 ms for the client's delayed acknowledgement
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
    except OSError as err:
        raise UsageError(f"cannot listen on {host}:{port}: {err.strerror or err}") from err
    sock.set_inheritable(True)
    return sock


def limit_torch_threads(device) -> int | None:
    """On a CPU device, torch's threads: one core less than the process may use (at least one), left to the
    HTTP server; the number set (``None`` on a GPU, where torch's CPU threads mostly wait)."""
    if device.type != "cpu":
        return None
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores - 1)
    torch.set_num_threads(threads)
    return threads
