"""``kandinsky5 serve`` with an image model: OpenAI's Images API (``POST /v1/images/generations`` and
``/v1/images/edits``) on the job queue, against real servers (uvicorn subprocesses) on the tiny text-to-image and
editing checkpoints.

Values are compared: the PNGs a server answers (by URL and in base64) are the pipeline's own images for the same
seed, pixel for pixel, and the job the request queued is in the jobs API with its images. Bad requests get one 400
naming the field before anything is queued. In-process (no model): the 504 of a request whose job waits too long,
the table of an older data folder gaining the new column, and crash recovery of image jobs.
"""

from __future__ import annotations

import base64
import io
import os
import threading
import time

import httpx
import numpy as np
import PIL.Image
import pytest
import torch
from serve_helpers import Server, png_bytes, tiny_checkpoint, wait_for

STEPS = 2
PROMPT = "a red fox in fresh snow"
EDIT_PROMPT = "make the fox blue"
# steps that keep a tiny 1024-class image running for many seconds, until it is cancelled
LONG_STEPS = 5_000


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-images")
    return tiny_checkpoint(root / "tiny-t2i", task="t2i"), tiny_checkpoint(root / "tiny-i2i", task="i2i")


@pytest.fixture(scope="module")
def servers(folders):
    """A text-to-image server and an editing one, started side by side."""
    t2i_folder, i2i_folder = folders
    t2i = Server(t2i_folder, t2i_folder.parent / "data-t2i")
    i2i = Server(i2i_folder, i2i_folder.parent / "data-i2i")
    try:
        for server in (t2i.launch(), i2i.launch()):
            server.wait_ready()
        yield t2i, i2i
    finally:
        for server in (t2i, i2i):
            server.terminate()
        for server in (t2i, i2i):
            server.stop()


@pytest.fixture(scope="module")
def t2i(servers):
    return servers[0]


@pytest.fixture(scope="module")
def i2i(servers):
    return servers[1]


def reference_images(folder, *args, **kwargs) -> list[np.ndarray]:
    """The pipeline's own images (uint8 arrays) for ``args`` and ``kwargs``, in this process, with the server's
    dtype (float32 on a CPU) and torch threads (one core less than the process may use)."""
    import kandinsky5

    pipe = kandinsky5.Kandinsky5Pipeline.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) - 1))
    try:
        return [np.asarray(image) for image in pipe(*args, **kwargs).image]
    finally:
        torch.set_num_threads(threads)


def png_pixels(data: bytes) -> np.ndarray:
    image = PIL.Image.open(io.BytesIO(data))
    assert image.format == "PNG" and image.mode == "RGB"
    return np.asarray(image)


def assert_error(response: httpx.Response, status: int, param: str | None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param"} and error["param"] == param, error
    if param is not None and status == 400:
        assert error["type"] == "invalid_request_error" and param in error["message"], error
    return error["message"]


def job_count(client: httpx.Client) -> int:
    return len(client.get("/v1/videos", params={"limit": 100}).json()["data"])


# ---------------------------------------------------------------------------------------------- generations


def test_models_say_the_task_and_sizes(t2i, i2i):
    with t2i.client() as client:
        (model,) = client.get("/v1/models").json()["data"]
    sizes = ["1024x1024", "640x1408", "1408x640", "768x1280", "1280x768", "896x1152", "1152x896"]
    assert model == {"id": "tiny-t2i", "object": "model", "task": "t2i", "sizes": sizes, "max_images": 4}
    with i2i.client() as client:
        assert client.get("/v1/models").json()["data"][0]["task"] == "i2i"


def test_generated_images_are_the_pipelines_own(t2i, folders):
    """n=2 at 1408x640: the URLs' PNGs equal the pipeline's images for the seed, pixel for pixel; the same request
    as b64_json gives the same PNGs; the job is in the jobs API with its images, its files in the data folder."""
    request = {"prompt": PROMPT, "n": 2, "size": "1408x640", "seed": 7, "num_inference_steps": STEPS}
    with t2i.client() as client:
        before = time.time()
        response = client.post("/v1/images/generations", json={**request, "model": "tiny-t2i"})
        assert response.status_code == 200, response.text
        body = response.json()
        assert set(body) == {"created", "data", "id", "size", "output_format"}, body
        assert body["size"] == "1408x640" and body["output_format"] == "png"
        assert before - 2 <= body["created"] <= time.time()
        job_id = body["id"]
        urls = [item["url"] for item in body["data"]]
        assert urls == [f"{t2i.url}/v1/videos/{job_id}/content?index={index}" for index in range(2)]
        served = []
        for url in urls:
            content = client.get(url)
            assert content.status_code == 200 and content.headers["content-type"] == "image/png"
            served.append(content.content)

        job = client.get(f"/v1/videos/{job_id}").json()
        assert job["object"] == "image" and job["mode"] == "t2i" and job["status"] == "completed"
        assert job["n"] == 2 and job["size"] == "1408x640" and job["seed"] == 7 and job["num_frames"] == 1
        assert job["outputs"] == [url.removeprefix(t2i.url) for url in urls]
        files = sorted(path.name for path in (t2i.data_dir / "images").iterdir())
        assert f"{job_id}-0.png" in files and f"{job_id}-1.png" in files
        assert (t2i.data_dir / "images" / f"{job_id}-1.png").read_bytes() == served[1]
        assert_error(client.get(f"/v1/videos/{job_id}/content", params={"index": 2}), 404, "index")

        again = client.post("/v1/images/generations", json={**request, "response_format": "b64_json"})
        assert again.status_code == 200, again.text
        encoded = [base64.b64decode(item["b64_json"]) for item in again.json()["data"]]
        assert again.json()["id"] != job_id and all("url" not in item for item in again.json()["data"])

    assert encoded == served  # the same seed: the same PNG bytes
    expected = reference_images(
        folders[0],
        prompt=PROMPT,
        num_images_per_prompt=2,
        height=640,
        width=1408,
        num_inference_steps=STEPS,
        generator=torch.Generator("cpu").manual_seed(7),
    )
    pixels = [png_pixels(data) for data in served]
    assert [p.shape for p in pixels] == [(640, 1408, 3)] * 2
    assert not np.array_equal(pixels[0], pixels[1])  # two images, not one twice
    for got, want in zip(pixels, expected, strict=True):
        np.testing.assert_array_equal(got, want)


def test_edited_image_is_the_pipelines_own(i2i, folders):
    """An edit without a size takes the image's shape (96x64: 1280x768, the nearest of the model's sizes), as the
    pipeline does; the PNG equals the pipeline's edit for the seed."""
    source = png_bytes(96, 64)
    with i2i.client() as client:
        response = client.post(
            "/v1/images/edits",
            data={"prompt": EDIT_PROMPT, "seed": "3", "num_inference_steps": str(STEPS), "response_format": "b64_json"},
            files={"image": ("source.png", source, "image/png")},
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["size"] == "1280x768" and len(body["data"]) == 1
        job = client.get(f"/v1/videos/{body['id']}").json()
        assert job["mode"] == "i2i" and job["status"] == "completed" and job["n"] == 1
    (got,) = [png_pixels(base64.b64decode(item["b64_json"])) for item in body["data"]]
    (want,) = reference_images(
        folders[1],
        PIL.Image.open(io.BytesIO(source)).convert("RGB"),
        prompt=EDIT_PROMPT,
        num_inference_steps=STEPS,
        generator=torch.Generator("cpu").manual_seed(3),
    )
    assert got.shape == (768, 1280, 3)
    np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------------------------------------- errors


def test_bad_requests_are_refused_before_queuing(t2i, i2i):
    image = {"image": ("source.png", png_bytes(64, 64), "image/png")}
    with t2i.client() as client:
        queued = job_count(client)
        generate = "/v1/images/generations"
        for fields, param in (
            ({"size": "1000x1000"}, "size"),
            ({"size": "big"}, "size"),
            ({"n": 0}, "n"),
            ({"n": 5}, "n"),
            ({"n": True}, "n"),
            ({"response_format": "xml"}, "response_format"),
            ({"model": "another-model"}, "model"),
            ({"quality": "hd"}, "quality"),
            ({"seed": -1}, "seed"),
            ({"prompt": "   "}, "prompt"),
        ):
            assert_error(client.post(generate, json={"prompt": PROMPT, **fields}), 400, param)
        assert_error(client.post(generate, json={"n": 1}), 400, "prompt")
        message = assert_error(client.post(generate, data={"prompt": PROMPT}, files=image), 400, "image")
        assert "no file" in message
        # the wrong endpoint for the model names the one to use
        message = assert_error(client.post("/v1/videos", json={"prompt": PROMPT}), 400, "model")
        assert "text-to-image" in message and "/v1/images/generations" in message
        message = assert_error(client.post("/v1/images/edits", data={"prompt": PROMPT}, files=image), 400, "model")
        assert "text-to-image" in message
        assert job_count(client) == queued

    with i2i.client() as client:
        queued = job_count(client)
        edit = "/v1/images/edits"
        message = assert_error(client.post("/v1/images/generations", json={"prompt": PROMPT}), 400, "model")
        assert "image-editing" in message and "/v1/images/edits" in message
        assert_error(client.post("/v1/videos", json={"prompt": PROMPT}), 400, "model")
        assert_error(client.post(edit, data={"prompt": PROMPT}), 400, "image")  # no image
        assert_error(client.post(edit, json={"prompt": PROMPT}), 400, "image")
        for data in (b"", b"not an image at all", png_bytes(64, 64)[:60]):
            files = {"image": ("source.png", data, "image/png")}
            assert_error(client.post(edit, data={"prompt": PROMPT}, files=files), 400, "image")
        mask = {**image, "mask": ("mask.png", png_bytes(64, 64), "image/png")}
        assert_error(client.post(edit, data={"prompt": PROMPT}, files=mask), 400, "mask")
        assert_error(client.post(edit, data={"prompt": PROMPT, "size": "64x64"}, files=image), 400, "size")
        assert job_count(client) == queued


def test_a_waiting_request_learns_its_job_was_cancelled(t2i):
    """``?wait=false`` answers the queued job (202); a waiting request whose job is deleted gets 410 at once."""
    with t2i.client() as client:
        answers = []
        waiting = threading.Thread(
            target=lambda: answers.append(
                client.post("/v1/images/generations", json={"prompt": PROMPT, "num_inference_steps": LONG_STEPS})
            )
        )
        waiting.start()
        job = wait_for(
            lambda: next((j for j in client.get("/v1/videos").json()["data"] if j["status"] == "in_progress"), None),
            what="the waiting request's job to run",
        )
        queued = client.post("/v1/images/generations?wait=false", json={"prompt": PROMPT, "n": 3})
        assert queued.status_code == 202, queued.text
        assert queued.json()["status"] == "queued" and queued.json()["n"] == 3 and queued.json()["object"] == "image"
        assert client.delete(f"/v1/videos/{queued.json()['id']}").json()["object"] == "image.deleted"
        client.delete(f"/v1/videos/{job['id']}")
        waiting.join(30)
        assert not waiting.is_alive()
    assert_error(answers[0], 410, None)
    assert "cancelled" in answers[0].json()["error"]["message"]


# ---------------------------------------------------------------------------------------------- in process


def test_a_request_whose_job_waits_too_long_gets_504_and_the_job_goes_on(tmp_path):
    """The worker is never started: the job stays queued; the request answers 504 after the timeout, naming it."""
    from fastapi.testclient import TestClient

    from kandinsky5.pipelines.request import ModelFacts
    from kandinsky5.serve.app import create_app
    from kandinsky5.serve.store import JobStore
    from kandinsky5.serve.worker import EventHub, JobLog, ServeSettings, Worker
    from kandinsky5.variants import Task

    store = JobStore(tmp_path)
    settings = ServeSettings(
        model_id="tiny", task="t2i", facts=ModelFacts(task=Task.TEXT_TO_IMAGE), image_timeout_s=0.3
    )
    hub = EventHub(store)
    worker = Worker(store, None, settings, hub, JobLog(tmp_path / "jobs.log"))
    with TestClient(create_app(settings, store, worker, hub), base_url="http://localhost") as client:
        response = client.post("/v1/images/generations", json={"prompt": PROMPT, "n": 2})
        message = assert_error(response, 504, None)
        (job,) = client.get("/v1/videos").json()["data"]
        assert job["id"] in message and "queued (position 1)" in message
        assert job["status"] == "queued" and job["n"] == 2 and job["size"] == "1024x1024"


def test_an_older_data_folder_gains_the_column_and_image_jobs_recover(tmp_path):
    """A table without ``num_outputs`` (an earlier version's) gets it (old jobs: 1); an image job interrupted after
    writing all its PNGs is completed, one with a PNG missing is queued again without the PNG it wrote."""
    import sqlite3

    from kandinsky5.serve.store import IMAGE_ID_PREFIX, SCHEMA, JobStore, new_job_id

    old_schema = SCHEMA.replace(",\n    num_outputs INTEGER NOT NULL DEFAULT 1", "")
    assert "num_outputs" not in old_schema
    with sqlite3.connect(tmp_path / "jobs.sqlite3") as db:
        db.executescript(old_schema)
        db.execute(
            "INSERT INTO jobs (id, model, status, created_at, prompt, width, height, num_frames, fps, "
            "num_inference_steps, guidance_scale, seed, mode, cache) VALUES "
            "('video_" + "1" * 32 + "', 'tiny', 'completed', 1, 'old', 96, 64, 5, 24, 2, 5.0, '1', 't2v', 'none')"
        )
    store = JobStore(tmp_path)
    assert store.get("video_" + "1" * 32).num_outputs == 1

    values = dict(
        model="tiny",
        prompt=PROMPT,
        negative_prompt=None,
        width=1024,
        height=1024,
        num_frames=1,
        fps=24,
        num_inference_steps=2,
        guidance_scale=3.5,
        seed=1,
        mode="t2i",
        cache="none",
        expand_prompt=False,
        input_path=None,
        num_outputs=2,
    )
    written, partial = (store.insert(id=new_job_id(IMAGE_ID_PREFIX), **values).id for _ in range(2))
    for job_id in (written, partial):
        assert store.claim_next().id == job_id
    for index in range(2):
        store.image_path(written, index).write_bytes(b"png")
    store.image_path(partial, 0).write_bytes(b"png")
    recovery = store.recover()
    assert recovery.completed == [written] and recovery.requeued == [partial]
    assert store.get(written).output_path == f"images/{written}-0.png"
    assert sorted(path.name for path in (tmp_path / "images").iterdir()) == [f"{written}-0.png", f"{written}-1.png"]
    store.remove_files(written)
    assert list((tmp_path / "images").iterdir()) == []
