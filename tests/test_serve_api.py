"""``kandinsky5 serve``'s API against real servers (uvicorn subprocesses on loopback ports) on tiny checkpoints.

One text-to-video server with a token and one image-to-video server without, each shared by the module's tests.
Values are checked, not only status codes: a job's fields against what was sent, the MP4's frames (read back with
PyAV) against the job, the bytes of a range request against the whole file, the order of the list's pages.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
from serve_helpers import TINY_VIDEO, Server, job_log, png_bytes, tiny_checkpoint, video_frames, wait_for, wait_for_job

TOKEN = "test-token-0123456789"
# steps that keep a tiny job running for seconds (about 10 ms a step), until it is cancelled
LONG_STEPS = 20_000
# The text-to-video server's tiny checkpoint is named after Lite sft 5 s: it is taken for that variant (its
# defaults, its official MagCache ratios), as a downloaded official checkpoint would be.
T2V_FOLDER = "Kandinsky-5.0-T2V-Lite-sft-5s-Diffusers"
T2V_MODEL = "kandinskylab/Kandinsky-5.0-T2V-Lite-sft-5s-Diffusers"


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """A text-to-video server with a token and an image-to-video one without, started side by side."""
    root = tmp_path_factory.mktemp("serve")
    # a MagCache threshold high enough to skip model calls of a random-weight model
    t2v = Server(tiny_checkpoint(root / T2V_FOLDER), root / "data-t2v", "--cache-threshold", "10", token=TOKEN)
    i2v = Server(tiny_checkpoint(root / "tiny-i2v", task="i2v"), root / "data-i2v")
    try:
        for server in (t2v.launch(), i2v.launch()):
            server.wait_ready()
        yield t2v, i2v
    finally:
        for server in (t2v, i2v):
            server.terminate()
        for server in (t2v, i2v):
            server.stop()


@pytest.fixture(scope="module")
def t2v(servers):
    return servers[0]


@pytest.fixture(scope="module")
def i2v(servers):
    return servers[1]


@pytest.fixture
def client(t2v):
    with t2v.client() as client:
        yield client


def submit(client: httpx.Client, **fields) -> dict:
    response = client.post("/v1/videos", json={"prompt": "a red fox in the snow", **TINY_VIDEO, **fields})
    assert response.status_code == 200, response.text
    return response.json()


def assert_error(response: httpx.Response, status: int, param: str | None) -> str:
    """The error's message, after checking its status and shape (``param`` names the field)."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param"}, error
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    if param is not None and status == 400:
        assert param in error["message"], error
    return error["message"]


# ---------------------------------------------------------------------------------------------- basics


def test_health_models_and_page(t2v, i2v, client):
    assert httpx.get(t2v.url + "/health").json() == {"status": "ok"}  # open without the token
    models = client.get("/v1/models").json()
    assert models == {"object": "list", "data": [{"id": T2V_MODEL, "object": "model", "task": "t2v"}]}
    with i2v.client() as other:
        assert other.get("/v1/models").json()["data"][0]["task"] == "i2v"
    page = httpx.get(t2v.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")


def test_a_tokenless_server_answers_only_loopback_host_names(i2v, t2v):
    # a page on another site whose DNS name was rebound to 127.0.0.1 sends its own name as the Host
    assert_error(httpx.get(i2v.url + "/v1/models", headers={"Host": "attacker.example"}), 400, None)
    assert httpx.get(i2v.url + "/v1/models", headers={"Host": "localhost"}).status_code == 200
    with t2v.client() as client:  # with a token, any name (a reverse proxy's) is fine
        assert client.get("/v1/models", headers={"Host": "videos.example"}).status_code == 200


def serve_args(*argv: str):
    from kandinsky5.cli.main import OneLineErrorParser
    from kandinsky5.cli.serve import add_serve_parser

    parser = OneLineErrorParser(prog="kandinsky5")
    add_serve_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", *argv])


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["--host", "0.0.0.0"], "--token"),
        (["--host", "192.168.1.20", "--port", "8080"], "--insecure-no-token"),
        (["--token", "t", "--insecure-no-token"], "contradict"),
        (["--port", "70000"], "--port"),
    ],
)
def test_serve_refuses_a_bad_address_before_loading(tmp_path, argv, expected, monkeypatch):
    from kandinsky5.cli.main import UsageError
    from kandinsky5.cli.serve import cmd_serve

    monkeypatch.delenv("KANDINSKY5_TOKEN", raising=False)
    args = serve_args("--model", str(tmp_path / "no-such-model"), "--data-dir", str(tmp_path / "data"), *argv)
    with pytest.raises(UsageError, match=expected):
        cmd_serve(args)
    assert not (tmp_path / "data").exists()  # refused before anything was made


def test_one_server_per_data_folder(t2v, tmp_path):
    from kandinsky5.cli.main import UsageError
    from kandinsky5.cli.serve import cmd_serve

    args = serve_args("--model", str(tmp_path / "no-such-model"), "--data-dir", str(t2v.data_dir))
    with pytest.raises(UsageError, match=f"in use by another server \\(pid {t2v.process.pid}\\)"):
        cmd_serve(args)


def test_token_is_required_on_the_api(t2v):
    with t2v.client(token=None) as anonymous:
        assert_error(anonymous.get("/v1/videos"), 401, None)
        assert_error(anonymous.post("/v1/videos", json={"prompt": "x"}), 401, None)
    with t2v.client(token="wrong") as wrong:
        response = wrong.get("/v1/models")
        assert_error(response, 401, None)
        assert response.headers["www-authenticate"] == "Bearer"
    # browsers' EventSource and <video> cannot send a header: the cookie stands in for it
    with httpx.Client(base_url=t2v.url, cookies={"kandinsky5_token": TOKEN}) as cookie:
        assert cookie.get("/v1/models").status_code == 200


# ---------------------------------------------------------------------------------------------- jobs


def test_json_job_runs_to_the_asked_video(client, t2v):
    sent = dict(
        prompt="a red fox runs through fresh snow",
        negative_prompt="blurry",
        size="96x64",
        num_frames=9,
        seed=1234,
        num_inference_steps=3,
        guidance_scale=2.5,
    )
    job = client.post("/v1/videos", json=sent).json()
    assert job["id"].startswith("video_") and len(job["id"]) == len("video_") + 32
    assert job["object"] == "video" and job["model"] == T2V_MODEL and job["mode"] == "t2v"
    assert job["status"] in ("queued", "in_progress") and 0 <= job["progress"] <= 100
    for name in ("prompt", "size", "num_frames", "seed", "num_inference_steps", "guidance_scale"):
        assert job[name] == sent[name], name
    assert job["seconds"] == "0.333333"  # 9 frames span 8/24 s
    assert isinstance(job["created_at"], int) and abs(job["created_at"] - time.time()) < 60

    done = wait_for_job(client, job["id"])
    assert done["status"] == "completed", done
    assert done["progress"] == 100 and done["error"] is None and done["queue_position"] is None
    assert done["completed_at"] >= done["created_at"]

    content = client.get(f"/v1/videos/{job['id']}/content")
    assert content.status_code == 200 and content.headers["content-type"] == "video/mp4"
    assert content.headers["accept-ranges"] == "bytes"
    frames = video_frames(content.content)
    assert len(frames) == 9 and frames[0].shape == (64, 96, 3)
    assert content.content == (t2v.data_dir / "videos" / f"{job['id']}.mp4").read_bytes()

    partial = client.get(f"/v1/videos/{job['id']}/content", headers={"Range": "bytes=100-1099"})
    assert partial.status_code == 206
    assert partial.headers["content-range"] == f"bytes 100-1099/{len(content.content)}"
    assert partial.content == content.content[100:1100]
    tail = client.get(f"/v1/videos/{job['id']}/content", headers={"Range": "bytes=-200"})
    assert tail.status_code == 206 and tail.content == content.content[-200:]


def test_multipart_job_with_seconds_and_a_random_seed(client):
    response = client.post(
        "/v1/videos",
        data={"prompt": "a lighthouse in a storm", "seconds": "0.2", "size": "96x64", "num_inference_steps": "2"},
    )
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["num_frames"] == 5 and job["seconds"] == "0.166667"  # 0.2 s at 24 fps: the closest 4k+1 is 5
    assert isinstance(job["seed"], int) and job["seed"] >= 0  # drawn, and recorded
    assert job["guidance_scale"] == 5.0  # the reference's default
    done = wait_for_job(client, job["id"])
    assert done["status"] == "completed" and done["seed"] == job["seed"]
    assert len(video_frames(client.get(f"/v1/videos/{job['id']}/content").content)) == 5


def test_expand_prompt_is_a_request_field(client, t2v):
    job = submit(client, expand_prompt=True, seed=3)
    assert job["expand_prompt"] is True
    assert submit(client, seed=3)["expand_prompt"] is False
    done = wait_for_job(client, job["id"])
    assert done["status"] == "completed" and done["expand_prompt"] is True
    assert_error(client.post("/v1/videos", json={"prompt": "a fox", "expand_prompt": "maybe"}), 400, "expand_prompt")


def test_magcache_per_request(client, t2v, i2v):
    """``cache`` chooses the step cache per job (the model's official ratios, the server's --cache-threshold); the
    next job runs exactly again."""
    cached = submit(client, cache="magcache", num_inference_steps=10, guidance_scale=5.0, seed=3)
    exact = submit(client, model="lite-sft-5s", num_inference_steps=10, guidance_scale=5.0, seed=3)
    assert exact["model"] == T2V_MODEL
    videos = []
    for job in (cached, exact):
        assert wait_for_job(client, job["id"])["status"] == "completed"
        videos.append(video_frames(client.get(f"/v1/videos/{job['id']}/content").content))
    assert len(videos[0]) == len(videos[1]) == 5
    completed = {
        line.split()[2]: line for line in (t2v.data_dir / "jobs.log").read_text().splitlines() if " completed " in line
    }
    skipped, total = completed[cached["id"]].split("cache skipped ")[1].split(" model calls")[0].split(" of ")
    assert int(total) == 20 and 0 < int(skipped) < 20  # 10 steps, 2 calls each (guidance)
    assert "cache" not in completed[exact["id"]]
    # an image-to-video checkpoint of no known variant has no official ratios
    with i2v.client() as other:
        image = {"input_reference": ("first.png", png_bytes(96, 64), "image/png")}
        refused = other.post("/v1/videos", data={"prompt": "x", "cache": "magcache", **TINY_VIDEO}, files=image)
        assert_error(refused, 400, "cache")


def test_list_is_newest_first_and_pages_by_after(client):
    ids = [submit(client, num_inference_steps=1, prompt=f"clip {n}")["id"] for n in range(3)]
    for job_id in ids:
        wait_for_job(client, job_id)
    everything = client.get("/v1/videos", params={"limit": 100}).json()
    assert everything["object"] == "list" and not everything["has_more"]
    listed = [job["id"] for job in everything["data"]]
    assert [job_id for job_id in listed if job_id in ids] == ids[::-1]
    assert listed[:3] == ids[::-1]  # the newest jobs first
    assert everything["first_id"] == listed[0] and everything["last_id"] == listed[-1]

    pages, after = [], None
    while True:
        params = {"limit": 2, **({"after": after} if after else {})}
        page = client.get("/v1/videos", params=params).json()
        assert len(page["data"]) <= 2
        pages.append([job["id"] for job in page["data"]])
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert [job_id for page in pages for job_id in page] == listed

    ascending = client.get("/v1/videos", params={"limit": 100, "order": "asc"}).json()
    assert [job["id"] for job in ascending["data"]] == listed[::-1]
    first = client.get("/v1/videos", params={"limit": 1, "order": "asc", "after": listed[-1]}).json()
    assert [job["id"] for job in first["data"]] == [listed[-2]]
    assert_error(client.get("/v1/videos", params={"limit": 0}), 400, "limit")
    assert_error(client.get("/v1/videos", params={"order": "sideways"}), 400, "order")
    assert_error(client.get("/v1/videos", params={"after": "video_" + "0" * 32}), 400, "after")


def test_delete_removes_a_finished_video(client, t2v):
    job = submit(client, num_inference_steps=1)
    wait_for_job(client, job["id"])
    video = t2v.data_dir / "videos" / f"{job['id']}.mp4"
    assert video.is_file()
    deleted = client.delete(f"/v1/videos/{job['id']}")
    assert deleted.json() == {"id": job["id"], "object": "video.deleted", "deleted": True}
    assert not video.exists()
    assert_error(client.get(f"/v1/videos/{job['id']}"), 404, "video_id")
    assert_error(client.get(f"/v1/videos/{job['id']}/content"), 404, "video_id")
    assert_error(client.delete(f"/v1/videos/{job['id']}"), 404, "video_id")


def test_delete_cancels_a_running_job_and_the_worker_goes_on(client, t2v):
    job = submit(client, num_inference_steps=LONG_STEPS)
    queued = submit(client, num_inference_steps=LONG_STEPS)  # cancelled while it waits

    def running():
        current = client.get(f"/v1/videos/{job['id']}").json()
        return current if current["status"] == "in_progress" and current["progress"] > 5 else None

    wait_for(running, what="the long job to be sampling")
    assert client.get(f"/v1/videos/{queued['id']}").json()["queue_position"] >= 1
    preview = wait_for(lambda: (r := client.get(f"/v1/videos/{job['id']}/preview")).status_code == 200 and r)
    assert preview.headers["content-type"] == "image/jpeg" and preview.content[:2] == b"\xff\xd8"

    assert client.delete(f"/v1/videos/{queued['id']}").json()["deleted"] is True
    assert client.delete(f"/v1/videos/{job['id']}").json()["deleted"] is True
    for cancelled in (job, queued):
        current = client.get(f"/v1/videos/{cancelled['id']}").json()
        assert current["status"] == "cancelled" and current["queue_position"] is None
    data = t2v.data_dir
    wait_for(lambda: ("cancelled", job["id"]) in job_log(data), what="the worker to stop the job")
    for folder, suffix in (("videos", "mp4"), ("previews", "jpg")):
        assert not (data / folder / f"{job['id']}.{suffix}").exists()
    assert ("start", queued["id"]) not in job_log(data)
    assert_error(client.get(f"/v1/videos/{job['id']}/preview"), 404, "video_id")

    after = submit(client, num_inference_steps=1)  # the worker serves the next job
    assert wait_for_job(client, after["id"])["status"] == "completed"
    # a cancelled job is removed by a second DELETE
    assert client.delete(f"/v1/videos/{job['id']}").json()["deleted"] is True
    assert client.get(f"/v1/videos/{job['id']}").status_code == 404


def read_events(response: httpx.Response) -> list[tuple[str, dict]]:
    """The server-sent events of a stream until it ends."""
    events, name, data = [], None, []
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            data.append(line.removeprefix("data: "))
        elif line == "" and name is not None:
            events.append((name, json.loads("\n".join(data))))
            name, data = None, []
    return events


def test_events_stream_progress_previews_and_the_final_status(client):
    steps = 150  # over a second: several previews (at most two a second)
    job = submit(client, num_inference_steps=steps)
    with client.stream("GET", f"/v1/videos/{job['id']}/events") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = read_events(response)  # returns: the stream ends after the final status
    names = [name for name, _ in events]
    assert names[0] == "status" and names[-1] == "status", names
    final = events[-1][1]
    assert final["status"] == "completed" and final["id"] == job["id"] and final["progress"] == 100
    progress = [data for name, data in events if name == "progress"]
    assert progress, names
    steps_seen = [data["step"] for data in progress]
    assert steps_seen == sorted(steps_seen) and steps_seen[-1] == steps
    assert [data["progress"] for data in progress] == sorted(data["progress"] for data in progress)
    assert all(data["total_steps"] == steps and data["id"] == job["id"] for data in progress)
    assert {data["phase"] for data in progress} >= {"denoise", "decode", "write"}
    previews = [data for name, data in events if name == "preview"]
    assert previews, names
    assert previews[-1]["url"] == f"/v1/videos/{job['id']}/preview?step={previews[-1]['step']}"
    assert [p["step"] for p in previews] == sorted(p["step"] for p in previews)
    image = client.get(previews[-1]["url"])
    assert image.status_code == 200 and image.content[:2] == b"\xff\xd8"  # the last preview stays
    import io

    import PIL.Image

    assert PIL.Image.open(io.BytesIO(image.content)).size == (96, 64)

    # a finished job's stream: its status, and the end
    with client.stream("GET", f"/v1/videos/{job['id']}/events") as response:
        assert [name for name, _ in read_events(response)] == ["status"]


def test_requests_stay_fast_while_a_job_runs(client):
    """A job object within 50 ms at the 99th percentile while the worker samples (200 requests)."""
    job = submit(client, num_inference_steps=LONG_STEPS)
    wait_for(lambda: client.get(f"/v1/videos/{job['id']}").json()["progress"] > 5, what="the job to be sampling")
    times = []
    for _ in range(200):
        start = time.perf_counter()
        assert client.get(f"/v1/videos/{job['id']}").json()["status"] == "in_progress"
        times.append(time.perf_counter() - start)
    client.delete(f"/v1/videos/{job['id']}")
    times.sort()
    assert times[197] < 0.050, f"p50 {times[100] * 1000:.1f} ms, p99 {times[197] * 1000:.1f} ms"


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "fields,param",
    [
        ({"size": "100x64"}, "size"),
        ({"size": "big"}, "size"),
        ({"prompt": None}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"num_frames": 0}, "num_frames"),
        ({"num_frames": True}, "num_frames"),
        ({"seconds": -1}, "seconds"),
        ({"seconds": 1, "num_frames": 5}, "seconds"),
        ({"guidance_scale": "lots"}, "guidance_scale"),
        ({"seed": -1}, "seed"),
        ({"cache": "sometimes"}, "cache"),
        ({"model": "another-model"}, "model"),
        ({"colour": "red"}, "colour"),
        ({"input_reference": "a.png"}, "input_reference"),
    ],
)
def test_bad_values_are_400_naming_the_field(client, fields, param):
    body = {"prompt": "a fox", **TINY_VIDEO, **fields}
    body = {name: value for name, value in body.items() if value is not None}
    assert_error(client.post("/v1/videos", json=body), 400, param)


def test_bad_bodies_and_unknown_ids(client, t2v):
    assert_error(
        client.post("/v1/videos", content=b"{not json", headers={"content-type": "application/json"}), 400, None
    )
    assert_error(client.post("/v1/videos", content=b"prompt", headers={"content-type": "text/plain"}), 400, None)
    image = {"input_reference": ("first.png", png_bytes(96, 64), "image/png")}
    message = assert_error(client.post("/v1/videos", data={"prompt": "x"}, files=image), 400, "input_reference")
    assert "text-to-video" in message
    too_big = b"x" * (21 * 1024 * 1024)
    response = client.post("/v1/videos", content=too_big, headers={"content-type": "application/json"})
    assert response.status_code == 413 and "MB" in response.json()["error"]["message"]
    for path in ("/v1/videos/video_" + "0" * 32, "/v1/videos/../../jobs.sqlite3", "/v1/videos/nope/content"):
        assert client.get(path).status_code == 404, path
    assert_error(client.get("/v1/videos/video_" + "a" * 32 + "/preview"), 404, "video_id")
    assert_error(client.delete("/v1/videos/video_" + "a" * 32), 404, "video_id")
    # another site's page cannot submit jobs through a visitor's browser
    cross = client.post("/v1/videos", json={"prompt": "x"}, headers={"Origin": "http://example.com"})
    assert cross.status_code == 403
    before = {p.name for p in (t2v.data_dir / "inputs").iterdir()}
    assert before == set()  # nothing of a refused request was kept


# ---------------------------------------------------------------------------------------------- image-to-video


def test_image_to_video_upload(i2v):
    with i2v.client() as client:
        image = {"input_reference": ("first.png", png_bytes(96, 64), "image/png")}
        fields = {"prompt": "a flag in the wind", "size": "96x64", "num_frames": "5", "num_inference_steps": "2"}
        response = client.post("/v1/videos", data=fields, files=image)
        assert response.status_code == 200, response.text
        job = response.json()
        assert job["mode"] == "i2v" and job["size"] == "96x64" and job["num_frames"] == 5
        assert (i2v.data_dir / "inputs" / f"{job['id']}.png").is_file()
        done = wait_for_job(client, job["id"])
        assert done["status"] == "completed", done
        frames = video_frames(client.get(f"/v1/videos/{job['id']}/content").content)
        assert len(frames) == 5 and frames[0].shape == (64, 96, 3)

        # without a size, the trained size closest to the image's shape (a wide image: a wide video)
        wide = {"input_reference": ("wide.png", png_bytes(192, 96), "image/png")}
        sized = client.post(
            "/v1/videos", data={"prompt": "x", "num_frames": "5", "num_inference_steps": "1"}, files=wide
        )
        width, height = map(int, sized.json()["size"].split("x"))
        assert width > height
        client.delete(f"/v1/videos/{sized.json()['id']}")

        broken = {"input_reference": ("broken.png", b"\x89PNG not really", "image/png")}
        assert_error(client.post("/v1/videos", data=fields, files=broken), 400, "input_reference")
        empty = {"input_reference": ("empty.png", b"", "image/png")}
        assert_error(client.post("/v1/videos", data=fields, files=empty), 400, "input_reference")
        message = assert_error(client.post("/v1/videos", data=fields), 400, "input_reference")
        assert "image-to-video" in message
        assert_error(client.post("/v1/videos", json={"prompt": "x", **TINY_VIDEO}), 400, "input_reference")
        assert {p.stem for p in (i2v.data_dir / "inputs").iterdir()} <= {job["id"]}


def test_a_failed_job_says_why_and_the_worker_goes_on(i2v):
    with i2v.client() as client:

        def post(steps: int) -> dict:
            image = {"input_reference": ("first.png", png_bytes(96, 64), "image/png")}
            fields = {"prompt": "a flag", **TINY_VIDEO, "num_inference_steps": str(steps)}
            return client.post("/v1/videos", data=fields, files=image).json()

        blocker = post(LONG_STEPS)
        wait_for_job(client, blocker["id"], statuses=("in_progress",))
        doomed, after = post(1), post(1)
        (i2v.data_dir / "inputs" / f"{doomed['id']}.png").unlink()  # lost before the job runs
        client.delete(f"/v1/videos/{blocker['id']}")
        failed = wait_for_job(client, doomed["id"])
        assert failed["status"] == "failed" and failed["completed_at"] is not None
        assert f"{doomed['id']}.png" in failed["error"]["message"] and "\n" not in failed["error"]["message"]
        assert_error(client.get(f"/v1/videos/{doomed['id']}/content"), 404, "video_id")
        assert wait_for_job(client, after["id"])["status"] == "completed"
        assert ("failed", doomed["id"]) in job_log(i2v.data_dir)
