"""The page of ``kandinsky5 serve`` in a real browser: Chromium (Debian's, /usr/bin/chromium) driven by Playwright,
against a real server (``tests/serve_helpers.py``) with a token, on the tiny random-weight checkpoint.

From the page: the token is asked for, refused when wrong, then remembered; a short job is submitted, its progress
bar moves, its video appears in the gallery and plays; a long job is cancelled; a bad size is refused with the
server's message naming ``size``; the image field appears for an image-to-video model and its file is sent. With
a text-to-image model: the image form, two images made and shown as ``<img>``; an editing model's page wants the
image and sends it. No JavaScript error may occur.

Skipped only when Chromium (or Playwright) is missing outside CI; with ``CI=true`` it must run (``.ci/run`` installs
Chromium). ``KANDINSKY5_SCREENSHOT=docs/serve-page.png`` also saves a screenshot of the page with a finished video
and a running job (how ``docs/serve-page.png`` is made).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
# This machine's closed network otherwise makes Chromium wait on connections it tries to open at start.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
IN_CI = os.environ.get("CI", "").lower() == "true"
SCREENSHOT = os.environ.get("KANDINSKY5_SCREENSHOT")

# The tiny checkpoint runs a step in about 10 ms at this size (more on a busy machine): the short job takes a second
# or two, the long one runs until it is cancelled.
SIZE = "192x128"
FRAMES = 9
SHORT_STEPS = 60
LONG_STEPS = 20_000
BAD_SIZE = "100x100"  # not a multiple of 16 pixels
TOKEN = "browser-test-token"
TOKEN_KEY = "kandinsky5.token"  # the page's localStorage key
# for each wait on the page
TIMEOUT_MS = 30_000


def _chromium() -> Path:
    if not CHROMIUM.exists():
        if IN_CI:
            pytest.fail(f"{CHROMIUM} is missing in CI (.ci/run installs Debian's chromium)")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium) and CI is not set")
    return CHROMIUM


@pytest.fixture(scope="module")
def browser():
    executable = _chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if IN_CI:
            raise
        pytest.skip("playwright is not installed (the test extra: pip install -e '.[test]')")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(executable), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser):
    """A page in a fresh context (its own localStorage and cookies); fails the test on any JavaScript error."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert not errors, errors


@pytest.fixture(scope="module")
def server(browser, tmp_path_factory):
    """A text-to-video server with a token (started after the browser: a missing Chromium skips first)."""
    from serve_helpers import Server, tiny_checkpoint

    root = tmp_path_factory.mktemp("serve-browser")
    server = Server(tiny_checkpoint(root / "tiny"), root / "data", token=TOKEN).start()
    try:
        yield server
    finally:
        server.kill()  # nothing to keep: no need to wait for a graceful stop


@pytest.fixture
def authorised_page(page):
    """A page whose browser already holds the token (as the page keeps it after it was entered once)."""
    page.context.add_init_script(f"localStorage.setItem({json.dumps(TOKEN_KEY)}, {json.dumps(TOKEN)})")
    return page


def submit(page, prompt: str, size: str, steps: int | None = None, frames: int | None = None) -> str | None:
    """Fill the form and submit it; the new job's id (None when the server refused it)."""
    page.fill("#prompt", prompt)
    page.select_option("#size", "custom")
    page.fill("#size-custom", size)
    if frames is not None:
        page.select_option("#length-unit", "frames")
        page.fill("#length", str(frames))
    if steps is not None:
        page.fill("#steps", str(steps))
    before = page.get_attribute("#form-status", "data-job-id")
    page.click("#submit")
    page.wait_for_function(
        """(before) => {
            const status = document.getElementById('form-status');
            return status.dataset.jobId !== before && status.dataset.jobId
                || !document.getElementById('form-error').hidden;
        }""",
        arg=before or "",
    )
    if page.is_visible("#form-error"):
        return None
    return page.get_attribute("#form-status", "data-job-id")


def progress_of(page, job_id: str) -> float | None:
    """The progress bar's value of a job in the queue, None when it has left the queue (or waits, indeterminate)."""
    return page.evaluate(
        """(id) => {
            const bar = document.querySelector(`[data-testid=job][data-job-id="${id}"] progress`);
            return bar && bar.hasAttribute('value') ? bar.value : null;
        }""",
        job_id,
    )


def card(job_id: str, status: str) -> str:
    return f'[data-testid=video-card][data-job-id="{job_id}"][data-status={status}]'


def test_page_asks_for_the_token_and_remembers_it(page, server):
    page.goto(server.url + "/")
    page.wait_for_selector("#auth:not([hidden])")
    page.fill("#token", "not-the-token")
    page.click("#token-save")
    page.wait_for_selector("#auth-error:not([hidden])")
    assert "refused" in page.text_content("#auth-error")
    page.fill("#token", TOKEN)
    page.click("#token-save")
    page.wait_for_selector("#auth", state="hidden")
    page.wait_for_function("document.getElementById('model').textContent.includes('text-to-video')")
    assert page.is_hidden("#image-field")
    assert page.evaluate(f"localStorage.getItem({json.dumps(TOKEN_KEY)})") == TOKEN

    page.reload()
    page.wait_for_function("document.getElementById('model').textContent.includes('text-to-video')")
    assert page.is_hidden("#auth")


def test_page_submits_plays_cancels_and_reports_errors(authorised_page, server):
    page = authorised_page
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('model').textContent.includes('text-to-video')")

    # A size the model cannot represent: the server's message, naming the field, next to the form.
    assert submit(page, "A size the model refuses", BAD_SIZE, steps=2, frames=FRAMES) is None
    message = page.text_content("#form-error")
    assert page.get_attribute("#form-error", "data-param") == "size", message
    assert message.startswith("size") and "16" in message, message
    assert page.get_attribute("#size-custom", "aria-invalid") == "true"

    short = submit(page, "A red fox runs through fresh snow at dawn", SIZE, steps=SHORT_STEPS, frames=FRAMES)
    assert short, page.text_content("#form-error")
    assert page.is_hidden("#form-error")
    long = submit(page, "A lighthouse in a storm, waves crashing", SIZE, steps=LONG_STEPS, frames=FRAMES)
    assert long, page.text_content("#form-error")

    # The short job's progress bar moves until the job leaves the queue for the gallery.
    seen: list[float] = []
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while not page.query_selector(card(short, "completed")):
        assert time.monotonic() < deadline, f"the short job did not complete; progress seen: {seen}"
        failed = page.query_selector(f"{card(short, 'failed')} [data-testid=job-error]")
        assert failed is None, f"the short job failed: {failed.text_content()}"
        value = progress_of(page, short)
        if value is not None and (not seen or value != seen[-1]):
            seen.append(value)
        page.wait_for_timeout(30)
    assert seen == sorted(seen), seen
    assert len(set(seen)) >= 2 or seen[-1:] == [100], seen

    # Its video plays in the page, and can be downloaded.
    video = f"{card(short, 'completed')} video"
    page.wait_for_function(f"document.querySelector('{video}').readyState >= 2")
    played = page.evaluate(
        """async (selector) => {
            const video = document.querySelector(selector);
            video.muted = true;
            const start = video.currentTime;
            await video.play();
            await new Promise((resolve) => setTimeout(resolve, 250));
            return {start, now: video.currentTime, width: video.videoWidth, height: video.videoHeight};
        }""",
        video,
    )
    assert played["now"] > played["start"], played
    # The token's cookie authorises the plain URL (a <video> cannot send the header), so it streams in ranges.
    assert page.get_attribute(video, "src") == f"v1/videos/{short}/content"
    assert f"{played['width']}x{played['height']}" == SIZE, played
    assert page.get_attribute(f"{card(short, 'completed')} [data-testid=download]", "download") == f"{short}.mp4"

    # The long job runs: its bar moves (and, for the screenshot, a preview shows).
    running = f'[data-testid=job][data-job-id="{long}"][data-status=in_progress]'
    page.wait_for_selector(running)
    page.wait_for_function(
        f"document.querySelector('{running} progress').value > 0 "
        f"&& !document.querySelector('{running} [data-testid=preview]').hidden"
    )
    if SCREENSHOT:
        page.evaluate(f"document.querySelector('{video}').pause()")
        Path(SCREENSHOT).parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=SCREENSHOT, full_page=True)

    # Cancelled from the page: it leaves the queue and shows as cancelled.
    page.click(f"{running} [data-testid=cancel]")
    page.wait_for_selector(card(long, "cancelled"))
    assert page.query_selector(f'[data-testid=job][data-job-id="{long}"]') is None
    assert page.text_content("#queue-count") == ""


def test_image_field_follows_the_model(authorised_page, server, tmp_path):
    """An image-to-video model (its /v1/models answer rewritten in the browser) gets the image field; the page
    wants an image before sending, then sends the file: this text-to-video server's refusal names it."""
    from serve_helpers import png_bytes

    page = authorised_page

    def image_to_video(route):
        body = route.fetch().json()
        for model in body["data"]:
            model["task"] = "i2v"
        route.fulfill(json=body)

    page.route("**/v1/models", image_to_video)
    page.goto(server.url + "/")
    page.wait_for_selector("#image-field:not([hidden])")
    assert "image-to-video" in page.text_content("#model")
    assert page.text_content("label[for=input-reference]").startswith("First frame image")

    assert submit(page, "No image given", "96x64", steps=2, frames=5) is None
    assert page.get_attribute("#form-error", "data-param") == "input_reference"

    image = tmp_path / "first-frame.png"
    image.write_bytes(png_bytes(96, 64))
    page.set_input_files("#input-reference", str(image))
    assert submit(page, "The first frame comes to life", "96x64", steps=2, frames=5) is None
    assert page.get_attribute("#form-error", "data-param") == "input_reference"
    assert "text-to-video" in page.text_content("#form-error")


# ---------------------------------------------------------------------------------------------- an image model

IMAGE_SIZES = ["1024x1024", "640x1408", "1408x640", "768x1280", "1280x768", "896x1152", "1152x896"]


@pytest.fixture(scope="module")
def image_server(browser, tmp_path_factory):
    """A text-to-image server without a token."""
    from serve_helpers import Server, tiny_checkpoint

    root = tmp_path_factory.mktemp("serve-browser-images")
    server = Server(tiny_checkpoint(root / "tiny-t2i", task="t2i"), root / "data").start()
    try:
        yield server
    finally:
        server.kill()


def test_image_model_page_makes_and_shows_images(page, image_server):
    """The image form (the model's sizes, the number of images, no length), a submission of two images, and the
    finished job in the gallery as two <img> of the size asked for, served by the jobs API."""
    page.goto(image_server.url + "/")
    page.wait_for_function("document.getElementById('model').textContent.includes('text-to-image')")
    assert page.text_content("#create-title") == "New image" and page.text_content("#gallery-title") == "Images"
    assert page.is_visible("#count") and page.is_hidden("#length") and page.is_hidden("#image-field")
    options = page.eval_on_selector_all("#size option", "nodes => nodes.map(node => node.value)")
    assert options == ["", *IMAGE_SIZES]

    page.fill("#prompt", "A red fox in fresh snow")
    page.select_option("#size", "1408x640")
    page.fill("#count", "2")
    page.fill("#steps", "2")
    page.click("#submit")
    page.wait_for_function("document.getElementById('form-status').dataset.jobId")
    job_id = page.get_attribute("#form-status", "data-job-id")
    assert job_id.startswith("image_"), page.text_content("#form-error")

    images = f"{card(job_id, 'completed')} img[data-testid=image]"
    page.wait_for_function(
        f"[...document.querySelectorAll('{images}')].filter(i => i.complete && i.naturalWidth).length === 2"
    )
    shown = page.eval_on_selector_all(
        images, "nodes => nodes.map(n => [n.getAttribute('src'), n.naturalWidth, n.naturalHeight])"
    )
    assert shown == [[f"v1/videos/{job_id}/content?index={k}", 1408, 640] for k in range(2)]
    assert "2 images" in page.text_content(f"{card(job_id, 'completed')} [data-testid=params]")


def test_editing_model_page_wants_and_sends_the_image(page, image_server, tmp_path):
    """An editing model (its /v1/models answer rewritten in the browser) gets the image to edit; the page wants one
    before sending, then sends it to /v1/images/edits: this text-to-image server's refusal names the model."""
    from serve_helpers import png_bytes

    def editing(route):
        body = route.fetch().json()
        for model in body["data"]:
            model["task"] = "i2i"
        route.fulfill(json=body)

    page.route("**/v1/models", editing)
    page.goto(image_server.url + "/")
    page.wait_for_selector("#image-field:not([hidden])")
    assert page.text_content("#create-title") == "Edit an image"
    assert page.text_content("label[for=input-reference]").startswith("Image to edit")
    assert page.eval_on_selector("#size option", "node => node.textContent") == "From the image"

    page.fill("#prompt", "Make the fox blue")
    page.click("#submit")
    page.wait_for_selector("#form-error:not([hidden])")
    assert page.get_attribute("#form-error", "data-param") == "image"

    image = tmp_path / "source.png"
    image.write_bytes(png_bytes(96, 64))
    page.set_input_files("#input-reference", str(image))
    with page.expect_response("**/v1/images/edits?wait=false") as answer:
        page.click("#submit")
    assert answer.value.status == 400
    page.wait_for_function("document.getElementById('form-error').dataset.param === 'model'")
    assert "text-to-image" in page.text_content("#form-error")
