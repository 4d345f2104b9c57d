"""Fuzzing ``kandinsky5 serve``: over a thousand malformed or random requests against one real server (a uvicorn
subprocess with a token, on a tiny checkpoint).

Every answer is checked: never a 5xx; a 4xx that the app gives is JSON ``{"error": {"message", "type", "param"}}``.
Requests that are not HTTP at all (a NUL byte in the request line, a Content-Length that is no number) are refused
by uvicorn's HTTP parser before the app sees them, with its own plain-text 400: for those only "no 5xx" holds.
Between the batches ``/health`` answers; at the end a real job still completes, the server's log has no traceback
and nothing was written outside the data folder.

The cases come from a seeded ``random.Random`` (the same every run) and fixed lists: bad JSON (truncated, wrong
top-level types, deep nesting, huge strings and numbers, NaN and Infinity, NUL bytes, lone surrogates, bad UTF-8),
wrong types and extreme values for every field, random objects, path tricks in ids on every ``/v1/videos/{id}``
route and method, bad multipart bodies, bad tokens, unknown routes and methods, bodies over the limit (413) and
broken HTTP.

No job runs but the test's own: a long job (the blocker) holds the worker while the cases are sent, and a create
request that turns out valid (the fuzzed field took a value the API accepts) is cancelled and removed at once,
before the worker is free to start it.
"""

from __future__ import annotations

import json
import random
import re
import socket
import string
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from serve_helpers import TINY_VIDEO, Server, job_log, png_bytes, tiny_checkpoint, wait_for_job

from kandinsky5.serve.app import MAX_BODY_BYTES

TOKEN = "fuzz-token-0123456789abcdef"
SEED = 13
# keeps the worker busy (about 10 ms a step) for longer than the fuzzing takes; cancelled at the end
BLOCKER_STEPS = 20_000
# a valid request of a tiny video; the fuzzed bodies change one thing in it
BASE = {"prompt": "a red fox in the snow", **TINY_VIDEO, "num_inference_steps": 1}
CREATE_FIELDS = (
    "prompt",
    "negative_prompt",
    "seconds",
    "num_frames",
    "size",
    "seed",
    "num_inference_steps",
    "guidance_scale",
    "cache",
    "expand_prompt",
    "model",
)
# the fields that take any text
FREE_TEXT_FIELDS = ("prompt", "negative_prompt")
NUMBER_FIELDS = ("seconds", "num_frames", "seed", "num_inference_steps", "guidance_scale")
# An id of the right form that no job has; an id of no job and the routes that take an id.
UNKNOWN_ID = "video_" + "0" * 32
ID_ROUTES = (("GET", ""), ("GET", "/content"), ("GET", "/preview"), ("GET", "/events"), ("DELETE", ""))
# the sentinel that path tricks try to reach or create outside the data folder
ESCAPE_NAME = "kandinsky5-fuzz-escape"
ID_TRICKS = (
    "..",
    "../",
    "../..",
    "../../jobs.sqlite3",
    f"../../../../../../tmp/{ESCAPE_NAME}",
    "..%2f..%2fjobs.sqlite3",
    "%2e%2e",
    "%2e%2e%2f%2e%2e%2fjobs.sqlite3",
    "%252e%252e%252fjobs.sqlite3",
    "..%5c..%5cjobs.sqlite3",
    "..\\..\\jobs.sqlite3",
    "/etc/passwd",
    "%2fetc%2fpasswd",
    f"%2ftmp%2f{ESCAPE_NAME}",
    "C:%5cWindows%5cwin.ini",
    "video_" + "0" * 31 + "%00",
    "%00",
    f"video_{'a' * 32}%00.mp4",
    "video_" + "a" * 4000,
    "a" * 8000,
    "VIDEO_" + "A" * 32,
    "video_" + "g" * 32,
    "video_" + "0" * 33,
    "vid%C3%A9o_" + "0" * 31,
    "%ff%fe%fd",
    "%",
    "%%20",
    "~root",
    ";rm%20-rf",
    "video_" + "0" * 32 + "%3Fx=1",
    "video_" + "0" * 32 + "%23frag",
    "*",
    UNKNOWN_ID,
    UNKNOWN_ID + "/",
    UNKNOWN_ID + "/..",
    UNKNOWN_ID + "/content/..",
    "jobs.log",
    "lock",
    f"videos%2f{UNKNOWN_ID}.mp4",
)
JSON_HEADERS = {"content-type": "application/json"}
ERROR_TYPES = ("invalid_request_error",)
# the batches (after_batch's names): all of them send over 500 requests
CATEGORIES = {"json", "fields", "form", "random", "ids", "routes", "multipart", "auth", "oversized", "http"}
SERVER_LOG_FAILURES = ("Traceback", "Exception in ASGI application", "ASGI callable returned without", "ERROR")


# ---------------------------------------------------------------------------------------------- raw HTTP


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes


def raw_exchange(port: int, data: bytes, close_write: bool = False, timeout: float = 20.0) -> RawResponse | None:
    """Send ``data`` as it is on a new connection and read until the server closes it (the requests say
    ``Connection: close``); the parsed response, or ``None`` when the server closed without one. ``close_write``:
    shut the sending side after ``data`` (a client that stops in the middle of its body)."""
    chunks = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
            if close_write:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):  # refused before the whole body was sent
            pass
        while True:
            try:
                chunk = sock.recv(1 << 16)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return parse_raw_response(b"".join(chunks))


def parse_raw_response(data: bytes) -> RawResponse | None:
    if not data:
        return None
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        decoded, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            decoded, rest = decoded + rest[:size], rest[size + 2 :]
        body = decoded
    return RawResponse(status, headers, body)


def raw_request(method: str, target: str | bytes, headers: dict | None = None, body: bytes = b"") -> bytes:
    """The bytes of an HTTP/1.1 request, the target as given (no normalising, no quoting)."""
    if isinstance(target, str):
        target = target.encode("latin-1")
    lines = [method.encode("latin-1") + b" " + target + b" HTTP/1.1", b"Host: 127.0.0.1", b"Connection: close"]
    headers = dict(headers or {})
    if body and not any(name.lower() in ("content-length", "transfer-encoding") for name in headers):
        headers["Content-Length"] = str(len(body))
    for name, value in headers.items():
        value = value if isinstance(value, bytes) else value.encode("latin-1")
        lines.append(name.encode("latin-1") + b": " + value)
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


# ---------------------------------------------------------------------------------------------- the fuzzer


class Fuzzer:
    """Sends cases to the server and checks every answer; counts them; cancels and removes any job that a create
    request queued (its id in ``slipped``)."""

    def __init__(self, server: Server, root: Path):
        self.server = server
        self.root = root
        self.client = server.client()
        self.sent = 0
        self.slipped: list[str] = []
        self.statuses: dict[int, int] = {}
        self.categories: set[str] = set()
        self.outside_before: set[str] = set()  # the files under root outside the data folder, before
        self.blocker: str | None = None  # the id of the job that holds the worker
        self.started = 0.0  # time.monotonic() when the fuzzing began

    # -- checks

    def check(self, case: str, status: int, body: bytes, method: str = "GET", from_app: bool = True) -> None:
        """No 5xx; an app's 4xx is the JSON error shape. ``from_app=False``: the request may be refused by the HTTP
        parser (plain text)."""
        self.sent += 1
        self.statuses[status] = self.statuses.get(status, 0) + 1
        assert status < 500, f"{case}: {status} {body[:400]!r}"
        if 400 <= status < 500 and method != "HEAD" and (from_app or body.startswith(b"{")):
            try:
                error = json.loads(body)["error"]
            except (ValueError, KeyError, TypeError) as err:
                raise AssertionError(f"{case}: {status} with a body not in the error shape: {body[:400]!r}") from err
            assert set(error) == {"message", "type", "param"}, f"{case}: {error}"
            assert isinstance(error["message"], str) and error["message"], f"{case}: {error}"
            assert error["type"] in ERROR_TYPES, f"{case}: {error}"
            assert error["param"] is None or isinstance(error["param"], str), f"{case}: {error}"

    def send(self, case: str, method: str, path: str, expect: tuple[int, ...] | None = None, **kwargs):
        """An httpx request (the server's token unless ``headers`` says otherwise); checked; the response."""
        response = self.client.request(method, path, **kwargs)
        self.check(case, response.status_code, response.content, method)
        if expect is not None:
            assert response.status_code in expect, f"{case}: {response.status_code} {response.text[:400]}"
        if method == "POST" and path == "/v1/videos" and response.status_code == 200:
            self.remove(response.json()["id"])
        return response

    def send_raw(
        self,
        case: str,
        data: bytes,
        method: str = "GET",
        expect: tuple[int, ...] | None = None,
        from_app: bool = True,
        close_write: bool = False,
    ) -> RawResponse | None:
        """Raw bytes on a new connection; checked. ``None``: the server closed without answering (allowed only with
        ``close_write``, a client that went away)."""
        response = raw_exchange(self.server.port, data, close_write=close_write)
        if response is None:
            assert close_write, f"{case}: the server closed the connection without answering"
            self.sent += 1
            return None
        self.check(case, response.status, response.body, method, from_app=from_app)
        if 300 <= response.status < 400:  # a trailing slash taken off: to this server, never elsewhere
            assert urlsplit(response.headers["location"]).netloc == "127.0.0.1", f"{case}: {response.headers}"
        if expect is not None:
            assert response.status in expect, f"{case}: {response.status} {response.body[:400]!r}"
        return response

    def create(self, case: str, body: dict, expect=(400,)) -> httpx.Response:
        """``POST /v1/videos`` with a JSON body; a valid one (200) is allowed and removed at once."""
        return self.send(case, "POST", "/v1/videos", expect=(*expect, 200), json=body)

    def create_raw_json(self, case: str, content: bytes, expect=(400,)) -> httpx.Response:
        return self.send(case, "POST", "/v1/videos", expect=(*expect, 200), content=content, headers=JSON_HEADERS)

    def remove(self, job_id: str) -> None:
        """Cancel a job that slipped through (it waits behind the blocker), then delete it."""
        self.slipped.append(job_id)
        cancelled = self.client.delete(f"/v1/videos/{job_id}")
        assert cancelled.status_code == 200, cancelled.text
        assert self.client.get(f"/v1/videos/{job_id}").json()["status"] == "cancelled"
        assert self.client.delete(f"/v1/videos/{job_id}").status_code == 200  # removed

    def healthy(self) -> None:
        response = httpx.get(self.server.url + "/health", timeout=10)
        assert response.json() == {"status": "ok"}, f"{response.status_code} {response.text}\n{self.log()}"

    def log(self) -> str:
        return self.server.log_tail(60)


def file_tree(root: Path, skip: tuple[Path, ...] = ()) -> set[str]:
    """Every path under ``root`` (relative), ``skip``'s subtrees left out."""
    found = set()
    for path in root.rglob("*"):
        if any(path == other or other in path.parents for other in skip):
            continue
        found.add(str(path.relative_to(root)))
    return found


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory):
    """The server with a token, its blocker job running, and the files outside its data folder before."""
    root = tmp_path_factory.mktemp("serve-fuzz")
    server = Server(tiny_checkpoint(root / "tiny-t2v"), root / "data", token=TOKEN)
    server.start()
    fuzzer = Fuzzer(server, root)
    try:
        fuzzer.outside_before = file_tree(root, skip=(server.data_dir, server.log_path))
        blocker = fuzzer.client.post("/v1/videos", json={**BASE, "num_inference_steps": BLOCKER_STEPS})
        assert blocker.status_code == 200, blocker.text
        fuzzer.blocker = blocker.json()["id"]
        wait_for_job(fuzzer.client, fuzzer.blocker, statuses=("in_progress",))
        fuzzer.started = time.monotonic()
        yield fuzzer
    finally:
        fuzzer.client.close()
        server.stop()


@pytest.fixture
def rng(request):
    """A generator seeded by the test's name: each test's cases are the same every run, whatever runs before."""
    return random.Random(f"{SEED}-{request.node.name}")


def after_batch(fuzz: Fuzzer, category: str) -> None:
    fuzz.healthy()
    fuzz.categories.add(category)


# ---------------------------------------------------------------------------------------------- bad JSON


def deep(depth: int, open_: str = "[", close: str = "]") -> bytes:
    return (open_ * depth + close * depth).encode()


def test_bad_json_bodies(fuzz, rng):
    valid = json.dumps(BASE).encode()
    for cut in range(len(valid) - 1):  # every truncation
        fuzz.create_raw_json(f"truncated at {cut}", valid[:cut])
    top_level = [b"", b" ", b"\n\t ", b"[]", b"{}", b"null", b"true", b"false", b"0", b"-1.5e3", b'"prompt"']
    top_level += [b"[" + valid + b"]", valid + b"x", valid + valid, valid + b",", b"\x00", valid + b"\x00"]
    top_level += [b"{'prompt': 'single quotes'}", b'{"prompt": "a fox",}', b'{prompt: "a fox"}', b"\xef\xbb\xbf"]
    top_level += [b'{"prompt": "a fox", "prompt": 5}', b'{"": ""}', b'{"prompt": "\\u"}', b'{"prompt": "\\x41"}']
    for number, content in enumerate(top_level):
        fuzz.create_raw_json(f"top level {number}: {content[:40]!r}", content)
    # nesting: past the decoder's recursion limit (a RecursionError was a 500), and inside a field
    for depth in (100, 1_000, 100_000, 1_000_000):
        fuzz.create_raw_json(f"arrays nested {depth}", deep(depth))
        fuzz.create_raw_json(f"unclosed arrays {depth}", b"[" * depth)
    for depth in (1_000, 100_000):
        fuzz.create_raw_json(f"objects nested {depth}", b'{"a":' * depth + b"1" + b"}" * depth)
        fuzz.create_raw_json(f"prompt nested {depth}", b'{"prompt": ' + deep(depth) + b"}")
    # numbers Python's json reads as floats that are not finite, and integers too long to convert
    for literal in (b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999", b"1" * 5000, b"-" + b"9" * 10_000):
        for field in (*NUMBER_FIELDS, "prompt", "size", "expand_prompt"):
            body = json.dumps({**BASE, field: 0}).replace(f'"{field}": 0', f'"{field}": {literal.decode()}')
            fuzz.create_raw_json(f"{field}={literal[:12]!r}", body.encode())
    # unicode: NUL, lone surrogates, bad and overlong UTF-8, control characters, other encodings
    for text in ("\\u0000", "a\\u0000b", "\\ud800", "\\udfff", "\\udbff\\udfff", "\u202e\u2028", "\U0001f98a" * 1000):
        for field in ("prompt", "negative_prompt", "size", "cache", "model"):
            body = json.dumps({**BASE, field: "PLACEHOLDER", "seed": -1}).replace("PLACEHOLDER", text)
            fuzz.create_raw_json(f"{field} with {text[:12]!r}", body.encode())
    for key in ("pro\\u0000mpt", "\\ud800", "x\\udfff", "\\u0000"):  # NUL and lone surrogates in names
        fuzz.create_raw_json(f"a key {key}", b'{"prompt": "a fox", "' + key.encode() + b'": 1}')
    # a valid request but for a lone surrogate (was a 500: SQLite could not store it)
    for field in ("prompt", "negative_prompt", "model"):
        body = json.dumps({**BASE, field: "PLACEHOLDER"}).replace("PLACEHOLDER", "a\\ud800b")
        fuzz.create_raw_json(f"a lone surrogate in {field}", body.encode())
    for raw in (b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\x00", b"\x01\x1f", b"\n", b"\xf4\x90\x80\x80"):
        fuzz.create_raw_json(f"raw bytes {raw!r} in the prompt", b'{"prompt": "a' + raw + b'", "seed": -1}')
    for encoding, prompt in (
        ("utf-16", "лиса"),
        ("utf-32", "狐"),
        ("utf-16-be", "fox"),
        ("latin-1", "café"),
        ("cp1251", "лиса"),
    ):
        body = json.dumps({**BASE, "prompt": prompt, "seed": -1}, ensure_ascii=False)
        fuzz.create_raw_json(f"encoded as {encoding}", body.encode(encoding))
    # huge strings (the body stays under the limit)
    for field, size in (("size", 5_000_000), ("cache", 2_000_000), ("model", 1_000_000), ("seed", 100_000)):
        fuzz.create(f"{field} of {size} characters", {**BASE, field: "9" * size})
    fuzz.create("a key of a million characters", {**BASE, "k" * 1_000_000: 1})
    fuzz.create("ten thousand unknown keys", {**BASE, **{f"key{n}": n for n in range(10_000)}})
    fuzz.create("a prompt of 2 MB, a bad seed", {**BASE, "prompt": "fox " * 500_000, "seed": -1})
    for number in range(40):  # random bytes
        fuzz.create_raw_json(f"random bytes {number}", rng.randbytes(rng.choice((1, 8, 100, 10_000))))
    after_batch(fuzz, "json")


# ---------------------------------------------------------------------------------------------- fields


# Values of every type and the extremes; most are wrong for every field, a few are right for some (those jobs are
# cancelled at once).
FIELD_VALUES = (
    None,
    True,
    False,
    0,
    -1,
    1,
    1.5,
    -0.0,
    10**12,
    -(10**12),
    2**63,
    2**64,
    2**70,
    10**300,
    1e308,
    -1e308,
    1e-308,
    5e-324,
    "",
    " ",
    "x",
    "5",
    "-1",
    "1e3",
    "0x10",
    "NaN",
    "inf",
    "true",
    "99999x99999",
    "0x0",
    "-16x-16",
    "16x16x16",
    " 96 x 64 ",
    "\uff19\uff16x\uff16\uff14",  # full-width digits
    "\u00b2x\u00b2",  # superscript two: str.isdigit says yes, int() says no
    "\u0669\u0666x\u0666\u0664",  # Arabic-Indic digits
    "9" * 5000 + "x64",
    "96x" + "1" * 100,
    "magcache ",
    "MAGCACHE",
    "\x00",
    [],
    [1, 2],
    ["96x64"],
    {},
    {"prompt": "x"},
)


def test_every_field_with_wrong_types_and_extreme_values(fuzz):
    for field in CREATE_FIELDS:
        for value in FIELD_VALUES:
            if field in FREE_TEXT_FIELDS and isinstance(value, str) and value.strip() and "\x00" not in value:
                continue  # any text is a prompt: that would only queue jobs to cancel
            fuzz.create(f"{field}={value!r:.60}", {**BASE, field: value})
        fuzz.create(f"{field} left out", {name: value for name, value in BASE.items() if name != field})
    # the acceptance's extremes, one at a time and together
    extremes = dict(size="99999x99999", num_frames=10**12, num_inference_steps=-1, guidance_scale=1e308, seed=2**70)
    for field, value in extremes.items():
        fuzz.create(f"extreme {field}={value}", {**BASE, field: value})
    fuzz.create("all the extremes", {**BASE, **extremes})
    fuzz.create("seconds and num_frames", {**BASE, "seconds": 1})
    # the 500s this fuzzing found, now a 400 naming the field
    regressions = [
        ("seconds", b'{"prompt": "x", "seconds": 1e308}'),  # OverflowError: infinitely many frames
        ("size", '{"prompt": "x", "size": "\u00b2x\u00b2"}'.encode()),  # "²".isdigit(), and int("²") fails
        ("size", b'{"prompt": "x", "size": "' + b"9" * 5000 + b'x64"}'),  # int() of over 4300 digits
        ("num_inference_steps", b'{"prompt": "x", "num_inference_steps": 9223372036854775808}'),  # SQLite int64
        ("prompt", rb'{"prompt": "a\ud800"}'),  # a lone surrogate: SQLite could not store it
        (None, rb'{"prompt": "a", "x\ud800": 1}'),  # nor in a field's name
        (None, b"[" * 100_000),  # RecursionError in the JSON decoder
        (None, b'{"prompt": "x", "seed": ' + b"1" * 5000 + b"}"),  # int() of over 4300 digits in the decoder
    ]
    for param, content in regressions:
        response = fuzz.send(
            f"regression {content[:60]!r}", "POST", "/v1/videos", (400,), content=content, headers=JSON_HEADERS
        )
        assert response.json()["error"]["param"] == param, response.text
    after_batch(fuzz, "fields")


def test_form_fields_with_wrong_values(fuzz, rng):
    """The same values as form fields (multipart and urlencoded): strings, as a form has only strings."""
    for _ in range(80):
        field = rng.choice(CREATE_FIELDS)
        value = rng.choice(FIELD_VALUES)
        text = json.dumps(value) if isinstance(value, (list, dict, type(None))) else str(value)
        fields = {**{name: str(value) for name, value in BASE.items()}, field: text}
        if rng.random() < 0.5:
            fuzz.send(f"form {field}={text!r:.60}", "POST", "/v1/videos", expect=(400, 200), data=fields)
        else:
            files = {"unused": ("a.txt", b"x", "text/plain")}  # forces multipart; refused as a file field
            fuzz.send(f"multipart {field}={text!r:.60}", "POST", "/v1/videos", expect=(400,), data=fields, files=files)
    after_batch(fuzz, "form")


def random_json(rng: random.Random, depth: int = 0):
    kind = rng.randrange(9 if depth < 4 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.randint(-(2**80), 2**80) if rng.random() < 0.3 else rng.randint(-10, 600)
    if kind == 3:
        return rng.uniform(-1e6, 1e6) * rng.choice((1, 1e-300, 1e300))
    if kind in (4, 5):
        alphabet = string.printable + "\x00\u00e9\u4e2d\U0001f98a\u202e"
        return "".join(rng.choice(alphabet) for _ in range(rng.choice((0, 1, 5, 40, 300))))
    if kind in (6, 7):
        return {random_key(rng): random_json(rng, depth + 1) for _ in range(rng.randrange(5))}
    return [random_json(rng, depth + 1) for _ in range(rng.randrange(5))]


def random_key(rng: random.Random) -> str:
    if rng.random() < 0.8:
        return rng.choice(CREATE_FIELDS)
    return "".join(rng.choice(string.ascii_letters + "_\x00é") for _ in range(rng.randrange(1, 12)))


def test_random_objects(fuzz, rng):
    for number in range(150):
        body = {random_key(rng): random_json(rng) for _ in range(rng.randrange(1, 8))}
        if rng.random() < 0.5:  # a valid request with some fields changed
            body = {**BASE, **body}
        fuzz.create(f"random object {number}: {json.dumps(body)[:120]}", body)
    after_batch(fuzz, "random")


# ---------------------------------------------------------------------------------------------- ids and routes


def test_path_tricks_in_ids_on_every_route(fuzz, rng):
    # raw requests: the target reaches the server as written (httpx would resolve `..` and quote)
    for trick in ID_TRICKS:
        for method, suffix in ID_ROUTES:
            target = f"/v1/videos/{trick}{suffix}"
            fuzz.send_raw(
                f"{method} {target[:80]}",
                raw_request(method, target, {"Authorization": f"Bearer {TOKEN}"}),
                method,
                expect=(307, 400, 404, 405) if trick.endswith("/") else (400, 404, 405),
            )
        method = rng.choice(("PUT", "PATCH", "POST", "OPTIONS", "HEAD", "TRACE"))
        target = f"/v1/videos/{trick}{rng.choice(('', '/content', '/events'))}"
        request = raw_request(method, target, {"Authorization": f"Bearer {TOKEN}"})
        fuzz.send_raw(f"{method} {target[:80]}", request, method)
    # the same ids without the token: refused before anything is looked up
    for trick in rng.sample(ID_TRICKS, 10):
        fuzz.send_raw(f"no token {trick[:40]}", raw_request("GET", f"/v1/videos/{trick}"), expect=(401, 404))
    # in the list's query
    for trick in rng.sample(ID_TRICKS, 15):
        query = rng.choice(("after", "limit", "order"))
        fuzz.send_raw(
            f"list {query}={trick[:40]}",
            raw_request("GET", f"/v1/videos?{query}={trick}", {"Authorization": f"Bearer {TOKEN}"}),
            expect=(400,),
        )
    for query in ("limit=-1", "limit=1e2", "limit=" + "9" * 5000, "order=", "after=", "limit=1&limit=2", "x=1"):
        fuzz.send("list " + query[:40], "GET", f"/v1/videos?{query}", expect=(200, 400))
    # files of the data folder and of the package through the static route
    for path in ("/static/../app.py", "/static/%2e%2e/app.py", "/static/..%2f..%2fjobs.sqlite3", "/static//etc/passwd"):
        fuzz.send_raw(f"static {path}", raw_request("GET", path), expect=(400, 404))
    after_batch(fuzz, "ids")


def test_unknown_routes_and_methods(fuzz, rng):
    methods = ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD", "TRACE", "PROPFIND", "FOO")
    known = ("/v1/videos", f"/v1/videos/{UNKNOWN_ID}", "/v1/models", "/health", "/", "/v1", "/v2/videos", "/docs")
    for path in known:
        for method in methods:
            fuzz.send_raw(f"{method} {path}", raw_request(method, path, {"Authorization": f"Bearer {TOKEN}"}), method)
    segment_alphabet = string.ascii_letters + string.digits + "-_.~%"
    for _ in range(60):
        segments = ["".join(rng.choice(segment_alphabet) for _ in range(rng.randrange(1, 20))) for _ in range(3)]
        path = "/" + "/".join(rng.choice((["v1"], ["v1", "videos"], [])) + segments[: rng.randrange(1, 4)])
        method = rng.choice(methods)
        fuzz.send_raw(f"random route {method} {path}", raw_request(method, path), method, expect=(400, 401, 404, 405))
    after_batch(fuzz, "routes")


# ---------------------------------------------------------------------------------------------- multipart


def multipart(parts: list[tuple[str, bytes, str | None]], boundary: str = "fuzzboundary") -> bytes:
    """A multipart/form-data body: ``(name, value, filename or None)`` per part."""
    out = b""
    for name, value, filename in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode()
        if filename is not None:
            out += b"Content-Type: application/octet-stream\r\n"
        out += b"\r\n" + value + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def base_parts() -> list[tuple[str, bytes, None]]:
    return [(name, str(value).encode(), None) for name, value in BASE.items()]


def test_bad_multipart_bodies(fuzz, rng):
    form = "multipart/form-data; boundary=fuzzboundary"
    bomb = png_bytes(16, 16)
    bomb = bomb[:16] + (60_000).to_bytes(4, "big") + (60_000).to_bytes(4, "big") + bomb[24:]  # IHDR says 60000²
    images = {
        "text": b"this is not an image",
        "empty": b"",
        "zeros": bytes(10_000),
        "random": rng.randbytes(50_000),
        "truncated png": png_bytes(96, 64)[:60],
        "png header only": b"\x89PNG\r\n\x1a\n",
        "a png bomb": bomb,
        "html": b"<html><script>alert(1)</script></html>",
        "svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="96" height="64"/>',
        "a valid png (a text-to-video server refuses it)": png_bytes(96, 64),
    }
    for name, image in images.items():
        body = multipart([*base_parts(), ("input_reference", image, "../../../etc/passwd")])
        fuzz.send(
            f"input_reference: {name}", "POST", "/v1/videos", (400,), content=body, headers={"content-type": form}
        )
    cases = {
        "no boundary": ("multipart/form-data", multipart(base_parts())),
        "another boundary": ("multipart/form-data; boundary=other", multipart(base_parts())),
        "an empty boundary": ("multipart/form-data; boundary=", multipart(base_parts())),
        "a 1 kB boundary": ("multipart/form-data; boundary=" + "b" * 1000, multipart(base_parts(), "b" * 1000)),
        "no parts": (form, b"--fuzzboundary--\r\n"),
        "an empty body": (form, b""),
        "garbage": (form, rng.randbytes(2000)),
        "no closing boundary": (form, multipart(base_parts())[:-20]),
        "a part without a name": (
            form,
            b"--fuzzboundary\r\nContent-Disposition: form-data\r\n\r\nx\r\n--fuzzboundary--\r\n",
        ),
        "a part without headers": (form, b"--fuzzboundary\r\n\r\nx\r\n--fuzzboundary--\r\n"),
        "a 2 MB field": (form, multipart([*base_parts(), ("negative_prompt", b"n" * 2_000_000, None)])),
        "40 fields": (form, multipart([*base_parts(), *((f"f{n}", b"1", None) for n in range(40))])),
        "two files": (form, multipart([*base_parts(), ("input_reference", b"a", "a"), ("input_reference", b"b", "b")])),
        "a file for the prompt": (form, multipart([("prompt", b"a fox", "prompt.txt")])),
        "input_reference as text": (form, multipart([*base_parts(), ("input_reference", b"a.png", None)])),
        "the prompt twice": (form, multipart([*base_parts(), ("prompt", b"again", None)])),
        "a NUL in a name": (form, multipart([*base_parts(), ("pro\x00mpt", b"x", None)])),
        "bad UTF-8 in the prompt": (form, multipart([("prompt", b"\xff\xfe", None), ("seed", b"-1", None)])),
        "multipart/mixed": ("multipart/mixed; boundary=fuzzboundary", multipart(base_parts())),
        "text/plain": ("text/plain", json.dumps(BASE).encode()),
        "application/xml": ("application/xml", b"<prompt>a fox</prompt>"),
        "application/json; charset=utf-16": ("application/json; charset=utf-16", json.dumps(BASE).encode("utf-16")),
        "no type": ("", json.dumps(BASE).encode()),
        "a latin-1 type": ("application/json\xe9", json.dumps(BASE).encode()),
        "a 4 kB type": ("application/" + "x" * 4000, json.dumps(BASE).encode()),
        "urlencoded garbage": ("application/x-www-form-urlencoded", rng.randbytes(3000)),
        "urlencoded %ff": ("application/x-www-form-urlencoded", b"prompt=%ff%fe&seed=-1"),
        "urlencoded 40 fields": ("application/x-www-form-urlencoded", "&".join(f"f{n}=1" for n in range(40)).encode()),
    }
    for name, (content_type, body) in cases.items():
        headers = {"content-type": content_type} if content_type else {}
        headers = {key: value.encode("latin-1") for key, value in headers.items()}
        fuzz.send(f"multipart: {name}", "POST", "/v1/videos", (400, 200), content=body, headers=headers)
    # truncations of a body whose first part is a file that is no image: never a valid request (without the
    # closing boundary the parser takes the parts it read: a body cut after the file would be valid)
    body = multipart([("input_reference", b"not an image", "x.png"), *base_parts()])
    for cut in sorted(rng.sample(range(1, len(body)), 40)):
        fuzz.send(
            f"multipart cut at {cut}",
            "POST",
            "/v1/videos",
            (400, 200),
            content=body[:cut],
            headers={"content-type": form},
        )
    after_batch(fuzz, "multipart")


# ---------------------------------------------------------------------------------------------- tokens


def test_bad_authorization(fuzz):
    refused = [
        None,
        b"",
        b"Bearer",
        b"Bearer ",
        b"Bearer wrong",
        TOKEN.encode(),
        f"Basic {TOKEN}".encode(),
        f"Token {TOKEN}".encode(),
        f"Bearer {TOKEN}x".encode(),
        f"Bearer {TOKEN[:-1]}".encode(),
        f"Bearer {TOKEN} extra".encode(),
        f"Bearer {TOKEN.upper()}".encode(),
        f"Bearer\t{TOKEN}".encode(),
        b"Bearer \xff\xfe\xfd",
        "Bearer ключ".encode(),
        b"Bearer " + b"a" * 8000,
        b"Bearer " + TOKEN.encode() + b"\x01",
        b"Bearer null",
        b"Bearer undefined",
    ]
    body = json.dumps(BASE).encode()
    for header in refused:  # raw: httpx refuses to send some of these headers
        headers = {"Authorization": header} if header is not None else {}
        for method, path in (("GET", "/v1/models"), ("GET", "/v1/videos"), ("POST", "/v1/videos")):
            content = {"Content-Type": "application/json"} if method == "POST" else {}
            request = raw_request(method, path, {**headers, **content}, body if method == "POST" else b"")
            case = f"authorization {header!r:.40} {method} {path}"
            if header is not None and b"\x01" in header:  # a control character: the parser may refuse it
                fuzz.send_raw(case, request, method, expect=(400, 401), from_app=False)
                continue
            response = fuzz.send_raw(case, request, method, expect=(401,))
            assert response.headers["www-authenticate"] == "Bearer", case
    cookies = ('kandinsky5_token="', "kandinsky5_token=wrong", "kandinsky5_token=" + "\\" * 100, "=;=;=", "a" * 8000)
    for cookie in cookies:
        fuzz.send_raw(f"cookie {cookie[:40]!r}", raw_request("GET", "/v1/models", {"Cookie": cookie}), expect=(401,))
    # the token in another case of scheme, or with spaces around it, is the token: the body then fails
    for header in (f"bearer {TOKEN}", f"BEARER  {TOKEN}  "):
        invalid = json.dumps({**BASE, "seed": -1}).encode()
        request = raw_request("POST", "/v1/videos", {"Authorization": header, **JSON_HEADERS}, invalid)
        response = fuzz.send_raw(f"authorization {header!r}", request, "POST", expect=(400,))
        assert json.loads(response.body)["error"]["param"] == "seed"
    after_batch(fuzz, "auth")


# ---------------------------------------------------------------------------------------------- size, HTTP


def test_bodies_over_the_limit_are_413(fuzz):
    over = MAX_BODY_BYTES + 1
    big = b'{"prompt": "' + b"x" * over + b'"}'
    fuzz.send("a JSON body over the limit", "POST", "/v1/videos", (413,), content=big, headers=JSON_HEADERS)
    form = "multipart/form-data; boundary=fuzzboundary"
    body = multipart([*base_parts(), ("input_reference", b"\x89PNG" + b"\x00" * over, "big.png")])
    fuzz.send(
        "a multipart body over the limit", "POST", "/v1/videos", (413,), content=body, headers={"content-type": form}
    )

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(over // (1 << 20) + 1):
            yield b" " * (1 << 20)

    fuzz.send("a chunked body over the limit", "POST", "/v1/videos", (413,), content=chunks(), headers=JSON_HEADERS)
    # only the header says so: refused before the body is read (the test sends none)
    for length in (over, 10**12, 10**18):
        headers = {
            "Authorization": f"Bearer {TOKEN}",
            "Content-Type": "application/json",
            "Content-Length": str(length),
        }
        response = fuzz.send_raw(f"Content-Length {length}", raw_request("POST", "/v1/videos", headers), "POST")
        assert response.status == 413, response
        anonymous = raw_request("POST", "/v1/videos", {"Content-Length": str(length)})
        assert fuzz.send_raw(f"Content-Length {length} without the token", anonymous, "POST").status == 413
    # at the limit it is read (and refused as JSON)
    body = b'{"prompt": "' + b"x" * (MAX_BODY_BYTES - 30) + b'", "seed": -1}'
    assert len(body) <= MAX_BODY_BYTES
    fuzz.send("a body at the limit", "POST", "/v1/videos", (400,), content=body, headers=JSON_HEADERS)
    after_batch(fuzz, "oversized")


def test_broken_http(fuzz, rng):
    """Requests that are not valid HTTP/1.1, and clients that stop in the middle. uvicorn's parser refuses the
    former (a plain-text 400, the app never runs); the server goes on."""
    auth = f"Authorization: Bearer {TOKEN}\r\n".encode()
    start = b"POST /v1/videos HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n" + auth
    broken = {
        "a NUL in the target": b"GET /v1/videos/video_\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
        "a space in the target": b"GET /v1/videos/a b HTTP/1.1\r\nHost: x\r\n\r\n",
        "no version": b"GET /health\r\n\r\n",
        "HTTP/9.9": b"GET /health HTTP/9.9\r\nHost: x\r\n\r\n",
        "a header without a colon": b"GET /health HTTP/1.1\r\nHost: x\r\nbroken\r\n\r\n",
        "a header with NUL": b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
        "Content-Length abc": start + b"Content-Length: abc\r\n\r\n{}",
        "Content-Length -1": start + b"Content-Length: -1\r\n\r\n{}",
        "Content-Length 10**30": start + b"Content-Length: " + b"1" + b"0" * 30 + b"\r\n\r\n{}",
        "two Content-Lengths": start + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        # (JSON: the app reads the body. An app that answers before reading it, as for a body of no known type,
        # races uvicorn's own 400 for the broken chunk: uvicorn then logs a LocalProtocolError, harmlessly.)
        "bad chunk size": start + b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n",
        "a 100 kB target": b"GET /v1/videos/" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        "a 100 kB header": b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
        "random bytes": rng.randbytes(3000),
        "a TLS hello": bytes.fromhex("16030100a5010000a10303") + rng.randbytes(160),
    }
    for name, data in broken.items():
        fuzz.send_raw(name, data, from_app=False, close_write=True)
    # clients that send less body than they announced, then stop
    valid = json.dumps(BASE).encode()
    for cut in (0, 1, len(valid) // 2, len(valid) - 1):
        data = start + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(valid) + valid[:cut]
        fuzz.send_raw(f"a body cut at {cut} of {len(valid)}", data, "POST", close_write=True, from_app=False)
    body = multipart([*base_parts(), ("input_reference", b"not an image", "x.png")])
    headers = b"Content-Type: multipart/form-data; boundary=fuzzboundary\r\nContent-Length: %d\r\n\r\n" % len(body)
    fuzz.send_raw("a multipart body cut", start + headers + body[:100], "POST", close_write=True, from_app=False)
    after_batch(fuzz, "http")


# ---------------------------------------------------------------------------------------------- after


def test_the_server_survived_and_wrote_only_its_data_folder(fuzz):
    """Runs last: every category ran (over 500 requests), the server answers, no fuzzed job ever started, a real
    job completes, no traceback in the server's log, no file outside the data folder."""
    elapsed = time.monotonic() - fuzz.started
    print(
        f"\nfuzz: {fuzz.sent} requests in {elapsed:.1f} s, statuses {dict(sorted(fuzz.statuses.items()))}, "
        f"{len(fuzz.slipped)} valid create requests cancelled at once"
    )
    if fuzz.categories == CATEGORIES:  # the whole module ran (not one test alone)
        assert fuzz.sent >= 500
    fuzz.healthy()
    client = fuzz.client
    assert client.get(f"/v1/videos/{fuzz.blocker}").json()["status"] == "in_progress"
    assert client.delete(f"/v1/videos/{fuzz.blocker}").status_code == 200
    job = client.post("/v1/videos", json=BASE)
    assert job.status_code == 200, job.text
    done = wait_for_job(client, job.json()["id"])
    assert done["status"] == "completed", done
    assert client.get(f"/v1/videos/{done['id']}/content").content[4:8] == b"ftyp"  # an MP4

    started = [job_id for event, job_id in job_log(fuzz.server.data_dir) if event == "start"]
    assert started == [fuzz.blocker, done["id"]], started  # nothing that slipped through ran
    listed = client.get("/v1/videos", params={"limit": 100}).json()["data"]
    assert {job["id"] for job in listed} == {fuzz.blocker, done["id"]}  # the slipped ones were removed

    server_log = fuzz.server.log_path.read_text(errors="replace")
    for failure in SERVER_LOG_FAILURES:
        assert failure not in server_log, fuzz.log()

    assert file_tree(fuzz.root, skip=(fuzz.server.data_dir, fuzz.server.log_path)) == fuzz.outside_before
    data = fuzz.server.data_dir
    folders = {"videos", "images", "previews", "inputs"}
    top = {"jobs.sqlite3", "jobs.sqlite3-wal", "jobs.sqlite3-shm", "jobs.log", "lock", *folders}
    assert {path.name for path in data.iterdir()} <= top
    job_file = re.compile(r"video_[0-9a-f]{32}\.(mp4|jpg|png)")
    for folder in folders:
        for path in (data / folder).rglob("*"):
            assert job_file.fullmatch(path.name), path
    for place in (Path("/tmp"), Path.cwd(), fuzz.root, data.parent.parent):
        assert not (place / ESCAPE_NAME).exists(), place
