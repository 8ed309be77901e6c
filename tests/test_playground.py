"""The playground page (GET /) in a real headless Chromium (Debian's, driven by Playwright) against
a real uvicorn server on the tiny Z-Image pipeline: previews as they stream, the final images and
their downloads, Stop, errors, and the API-key field."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Page, expect, sync_playwright

from omni_trt.models.sizes import SizeLimits
from omni_trt.server.playground import CSP, STATIC
from serving import counting_steps, live_server, wait_until

CHROMIUM = os.environ.get("OMNI_TRT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# Without the background-networking flags Chromium keeps dialing out, which a closed network refuses.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Set OMNI_TRT_SCREENSHOT=docs/playground.png to refresh the README's screenshot.
SCREENSHOT = os.environ.get("OMNI_TRT_SCREENSHOT")

# Records every change of a figure's state and image with the value it replaced, as it happens
# (a MutationObserver's oldValue), so the order previews -> final is read off the DOM itself.
RECORD = """
window.__changes = [];
new MutationObserver((records) => {
  for (const r of records) {
    const fig = r.target.closest && r.target.closest("figure");
    if (fig) window.__changes.push({index: Number(fig.dataset.index), attr: r.attributeName, old: r.oldValue});
  }
}).observe(document, {subtree: true, attributes: true, attributeOldValue: true, attributeFilter: ["data-state", "src"]});
"""


# `runtime` and `server` (tiny-z on it) are conftest.py's.


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no chromium at {CHROMIUM} (Debian: apt-get install chromium; .ci/run installs it)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)  # a fresh profile each launch
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 960, "height": 900})
    page = context.new_page()
    page.add_init_script(RECORD)
    page.problems = []  # console errors and uncaught exceptions (a CSP violation is one)
    page.on("console", lambda m: m.type == "error" and page.problems.append(m.text))
    page.on("pageerror", lambda e: page.problems.append(str(e)))
    yield page
    context.close()


def png(data: bytes) -> np.ndarray:
    assert data.startswith(b"\x89PNG")
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def fill(page: Page, prompt: str, size: str, steps: int, partials: int, n: int = 1, seed: int | None = None) -> None:
    """The form, by its labels (each field must have one)."""
    page.get_by_label("Prompt", exact=True).fill(prompt)
    page.get_by_label("Size").select_option(size)
    page.get_by_label("Steps").fill(str(steps))
    page.get_by_label("Number of images").select_option(str(n))
    page.get_by_label("Partial images").select_option(str(partials))
    if seed is not None:
        page.get_by_label("Seed").fill(str(seed))


def card_loaded(page: Page) -> None:
    expect(page.locator("#size option[value='64x64']")).to_have_count(1)


# ---- without a browser ----


def test_the_page_is_open_has_its_csp_and_stays_out_of_the_schema(runtime):
    with live_server(lambda: runtime, api_key="sekret") as live, live.client() as c:
        r = c.get("/")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert r.headers["content-security-policy"] == CSP and "script-src 'self'" in CSP and "unsafe-inline" not in CSP
        assert "<script src=\"/static/app.js\"" in r.text and "<script>" not in r.text  # no inline script: the CSP forbids it
        js = c.get("/static/app.js")
        assert js.status_code == 200 and "javascript" in js.headers["content-type"] and "sseEvents" in js.text
        assert c.get("/static/style.css").headers["content-type"].startswith("text/css")
        assert c.get("/static/nothing.js").json()["error"]["code"] == 404
        assert c.get("/v1/models").status_code == 401  # how the page learns it needs a key
        card = c.get("/v1/models", headers={"Authorization": "Bearer sekret"}).json()["data"][0]
        assert card["size_limits"] == {"multiple_of": 16, "min_width": 64, "max_width": 2048, "min_height": 64, "max_height": 2048}
        assert "/" not in c.get("/openapi.json").json()["paths"]


def test_size_limits_are_the_described_ranges_as_numbers():
    engine = SizeLimits(16, 64, 2048, min_width=64, max_width=128, min_height=96, max_height=256, source="engine")
    assert engine.bounds() == {"multiple_of": 16, "min_width": 64, "max_width": 128, "min_height": 96, "max_height": 256}
    assert "width 64..128 and height 96..256" in engine.describe()


def test_the_package_ships_every_static_file():
    from setuptools.config.pyprojecttoml import read_configuration  # tomllib is 3.11+

    config = read_configuration(Path(__file__).parents[1] / "pyproject.toml", expand=False)
    globs = config["tool"]["setuptools"]["package-data"]["omni_trt.server"]
    shipped = {p for g in globs for p in (STATIC.parent).glob(g)}
    assert {"index.html", "app.js", "style.css"} <= {p.name for p in STATIC.iterdir()}
    assert set(STATIC.iterdir()) <= shipped


# ---- in Chromium ----


def test_previews_stream_in_before_the_final_images_and_each_downloads(server, page, tmp_path):
    page.goto(server.url + "/")
    card_loaded(page)
    expect(page.locator("#model")).to_contain_text("tiny-z (z-image, torch on cpu)")
    expect(page.locator("#key-form")).to_be_hidden()  # no key on this server
    assert page.get_by_label("Steps").input_value() == "9"  # Z-Image-Turbo's default, from the card
    assert page.get_by_label("Size").input_value() == "1024x1024"
    # The first screen holds a prompt the demo model draws (README: its grammar): one click makes a real picture.
    assert page.get_by_label("Prompt", exact=True).input_value() == "a yellow triangle on a black background"
    sizes = page.locator("#size option").evaluate_all("os => os.map(o => o.value)")
    assert sizes[0] == "64x64" and "auto" in sizes and "2048x2048" in sizes and "1024x768" in sizes

    fill(page, "a red fox in the snow", "64x64", steps=6, partials=2, n=2, seed=7)
    page.get_by_label("Prompt", exact=True).press("Control+Enter")  # the keyboard path
    expect(page.locator("figure[data-state='final']")).to_have_count(2)
    expect(page.get_by_role("button", name="Generate")).to_be_enabled()

    changes = page.evaluate("window.__changes")
    for i in (0, 1):
        figure = page.locator(f"figure[data-index='{i}']")
        states = [c["old"] for c in changes if c["index"] == i and c["attr"] == "data-state"] + [figure.get_attribute("data-state")]
        assert states == ["waiting", "preview", "preview", "final"], states
        srcs = [c["old"] for c in changes if c["index"] == i and c["attr"] == "src"] + [figure.locator("img").get_attribute("src")]
        assert srcs[0] is None and len(srcs) == 4, [s and s[:40] for s in srcs]
        previews, final = srcs[1:3], srcs[3]
        for src in previews:
            assert src.startswith("data:image/png;base64,") and src != final
            assert png(base64.b64decode(src.split(",", 1)[1])).shape == (64, 64, 3)
        assert figure.locator("img").evaluate("img => img.complete && img.naturalWidth") == 64  # the final one decoded
    assert page.locator("#images").get_attribute("data-previews") == "4"
    expect(page.locator("#progress")).to_have_text(re.compile(
        r"4 previews · 2 of 2 images · first event after [\d.]+ s · done in [\d.]+ s · usage: \d+ input tokens, 32 output tokens"))

    # The download is the image the same request makes unstreamed.
    link = page.locator("figure[data-index='0'] a")
    expect(link).to_have_attribute("download", "omni-trt-7-1.png")
    assert page.locator("figure[data-index='1'] a").get_attribute("download") == "omni-trt-7-2.png"
    with page.expect_download() as got:
        link.click()
    downloaded = png(Path(got.value.path()).read_bytes())
    body = {"prompt": "a red fox in the snow", "size": "64x64", "num_inference_steps": 6, "seed": 7, "n": 2}
    plain = httpx.post(server.url + "/v1/images/generations", json=body, timeout=60).json()
    assert np.array_equal(downloaded, png(base64.b64decode(plain["data"][0]["b64_json"])))
    assert page.problems == []  # no CSP violation, no script error

    shot = page.screenshot(path=SCREENSHOT or str(tmp_path / "playground.png"), full_page=True)
    assert shot.startswith(b"\x89PNG")
    # A narrow screen: the page reflows to one column instead of scrolling sideways.
    page.set_viewport_size({"width": 360, "height": 800})
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")


def test_stop_aborts_the_request_and_the_server_stops_its_work(server, runtime, page):
    page.goto(server.url + "/")
    card_loaded(page)
    fill(page, "never made", "64x64", steps=6, partials=1)
    with counting_steps(runtime) as steps:
        runtime._lock.acquire()  # hold the pipeline: the worker takes the request and waits on it until Stop
        try:
            page.get_by_role("button", name="Generate").click()
            wait_until(lambda: server.state.scheduler.in_flight == 1, 30, "the worker to take the request")
            page.get_by_role("button", name="Stop").click()
            expect(page.locator("#progress")).to_have_text("Stopped: the server stops the work.")
            cancelled = 'omni_requests_cancelled_total{reason="disconnect",where="running"} 1.0'
            wait_until(lambda: cancelled in httpx.get(server.url + "/metrics").text, 30, "the server to see the client leave")
        finally:
            runtime._lock.release()
            wait_until(server.state.scheduler.idle, 30, "the worker to finish")
    assert steps == [], "a request stopped before its first step must run none"
    expect(page.get_by_role("button", name="Generate")).to_be_enabled()
    expect(page.locator("#error")).to_be_hidden()


def test_errors_before_and_during_the_stream_are_shown_readably(runtime, page):
    with live_server(lambda: runtime, request_timeout_s=1.0, keepalive_s=0.2) as live:
        page.goto(live.url + "/")
        card_loaded(page)
        # Before the stream: the JSON 400, as its message.
        fill(page, "x" * 20_000, "64x64", steps=2, partials=0)
        page.get_by_role("button", name="Generate").click()
        expect(page.get_by_role("alert")).to_contain_text(re.compile(r"^400: prompt .*characters"))
        # During it: the request waits past its deadline (the worker held), and the stream ends
        # with `event: error`, a 504.
        page.get_by_label("Prompt", exact=True).fill("too late")
        runtime._lock.acquire()
        try:
            page.get_by_role("button", name="Generate").click()
            expect(page.get_by_role("alert")).to_contain_text(re.compile(r"^504: the request took longer than this server's limit of 1 s"))
        finally:
            runtime._lock.release()
        expect(page.locator("figure[data-state='waiting']")).to_have_count(1)
        expect(page.get_by_role("button", name="Generate")).to_be_enabled()


def test_the_key_field_appears_when_the_server_needs_one(runtime, page):
    with live_server(lambda: runtime, api_key="sekret") as live:
        page.goto(live.url + "/")  # the page itself needs no key
        expect(page.locator("#model")).to_have_text("This server needs an API key.")
        expect(page.get_by_label("API key")).to_be_visible()
        page.get_by_label("API key").fill("wrong")
        page.get_by_label("API key").press("Enter")
        expect(page.get_by_role("alert")).to_have_text("401: missing or invalid API key: send 'Authorization: Bearer <key>'")
        page.get_by_label("Prompt", exact=True).fill("a fox")
        page.get_by_role("button", name="Generate").click()
        expect(page.get_by_role("alert")).to_contain_text("401: missing or invalid API key")
        expect(page.get_by_label("API key")).to_be_focused()  # where to fix it

        page.get_by_label("API key").fill("sekret")
        page.get_by_role("button", name="Use key").click()
        card_loaded(page)
        expect(page.get_by_role("alert")).to_be_hidden()
        fill(page, "a fox", "64x64", steps=2, partials=1)
        page.get_by_role("button", name="Generate").click()
        expect(page.locator("figure[data-state='final'] a[download]")).to_have_count(1)
        assert page.evaluate("sessionStorage.getItem('omni-trt-api-key')") == "sekret"  # this tab only
        assert "sekret" not in page.content()  # never written into the document


def test_the_cache_switch_shows_steps_computed_and_reused(page, tmp_path):
    """A server with a step cache: the switch appears, each final image says its steps computed and
    reused, and switched off every step runs."""
    from omni_trt.runtime.pipeline import LoadOptions, load_pipeline
    from omni_trt.runtime.stepcache import parse_cache_config
    from omni_trt.demo import ensure_demo_model

    # Given ratios (a flat curve): no calibration at load, and every step after the first may be reused.
    config = parse_cache_config("mag_cache", '{"mag_ratios": [1, 1, 1, 1, 1, 1], "mag_retention_ratio": 0}')
    rt = load_pipeline(str(ensure_demo_model()), LoadOptions(device="cpu", cache=config))
    with live_server(lambda: rt, served_model_name="demo") as live:
        page.goto(live.url + "/")
        expect(page.locator("#size option[value='64x64']")).to_have_count(1)
        switch = page.get_by_label("Step cache")
        expect(switch).to_be_checked()
        fill(page, "a red circle on a blue background", "64x64", steps=6, partials=0, seed=1)
        page.get_by_role("button", name="Generate").click()
        caption = page.locator("figure[data-index='0'] figcaption span")
        expect(caption).to_have_text(re.compile(r"final, 64x64, steps computed (\d) / reused [1-5]$"))
        switch.uncheck()
        page.get_by_role("button", name="Generate").click()
        expect(caption).to_have_text("final, 64x64, steps computed 6 / reused 0")
        assert page.problems == []


def test_an_edit_only_model_asks_for_an_image_before_anything_is_sent(page, tiny_dir, tmp_path):
    """The card says whether input images are required; for an edit-only model (Qwen-Image-Edit)
    the form will not submit without one, and with one it edits through /v1/images/edits."""
    from omni_trt.runtime.pipeline import LoadOptions, load_pipeline

    rt = load_pipeline(str(tiny_dir("qwen-image-edit")), LoadOptions(device="cpu"))
    picture = tmp_path / "in.png"
    Image.fromarray(np.full((64, 64, 3), (200, 40, 40), np.uint8)).save(picture)
    with live_server(lambda: rt) as live:
        assert httpx.get(live.url + "/v1/models").json()["data"][0]["input_images"] == "required"
        page.goto(live.url + "/")
        card_loaded(page)
        inputs = page.get_by_label("Images to edit")
        expect(inputs).to_have_js_property("required", True)
        expect(page.locator("#inputs-hint")).to_contain_text("Required")
        fill(page, "make it blue", "64x64", steps=2, partials=0, seed=3)
        page.get_by_role("button", name="Generate").click()
        assert inputs.evaluate("el => el.validity.valueMissing") is True
        expect(page.locator("figure")).to_have_count(0)  # nothing was sent: the browser held the form
        inputs.set_input_files(str(picture))
        page.get_by_role("button", name="Generate").click()
        expect(page.locator("figure[data-state='final'] a[download]")).to_have_count(1, timeout=60_000)
        assert page.problems == []


def test_a_model_that_generates_leaves_input_images_optional(server, page):
    assert httpx.get(server.url + "/v1/models").json()["data"][0]["input_images"] == "optional"
    page.goto(server.url + "/")
    card_loaded(page)
    expect(page.get_by_label("Images to edit")).to_have_js_property("required", False)
