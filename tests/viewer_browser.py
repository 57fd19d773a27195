"""Driving the web viewer in tests: Debian's Chromium under Playwright, headless, against the whole
`latent-verbalizer serve` stack on coca_tiny with API keys on (tests/service_stack.py). A viewer test
module takes the fixtures `stack` and `browser` (one of each per module) as
`stack = viewer_browser.stack`, and the helpers by import."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
from PIL import Image, ImageDraw
from playwright.sync_api import Browser, Page, expect, sync_playwright
from service_stack import API_KEY, TINY, free_port, redis_server, service, service_env, wait_for_workers

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
JOB_TIMEOUT_MS = 120_000
SEEDED_KEY = f"sessionStorage.setItem('lv.apiKey', {json.dumps(API_KEY)})"
IMAGE_LOADED = "s => { const i = document.querySelector(s); return Boolean(i && i.complete && i.naturalWidth > 0) }"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """The serve stack on coca_tiny, one per test module -> (base URL, an httpx client with the key)."""
    tmp = tmp_path_factory.mktemp("viewer")
    with redis_server(tmp) as url:
        port = free_port()
        with service(["serve", "--port", str(port), *TINY], service_env(url, tmp), tmp / "serve.log", port) as api:
            wait_for_workers(url)
            yield f"http://127.0.0.1:{port}", api


@pytest.fixture(scope="module")
def browser():
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is not installed: run `make system-deps` (apt-get install chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def new_page(browser: Browser, base_url: str, with_key: bool = True) -> tuple[Page, list[str]]:
    """A fresh browser context (own localStorage/sessionStorage) at laptop size; JS errors are collected."""
    context = browser.new_context(viewport={"width": 1440, "height": 900}, base_url=base_url)
    if with_key:
        context.add_init_script(SEEDED_KEY)
    page = context.new_page()
    page.set_default_timeout(15_000)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
    # Refused requests (the 401 before the key, the 415 of a bad upload) are logged by Chromium as
    # "Failed to load resource"; those are expected. Anything else logged as an error is a bug.
    page.on("console", lambda m: errors.append(f"console: {m.text}")
            if m.type == "error" and "Failed to load resource" not in m.text else None)
    return page, errors


def submit_files(page: Page, files: list[dict]) -> str:
    """Pick files through the file input, submit, wait for the job view; -> the job id."""
    page.set_input_files("#files", files=files)
    page.click("#submit-button")
    page.wait_for_url("**/#job/*")
    job_id = page.evaluate("location.hash").removeprefix("#job/")
    assert len(job_id) == 32
    return job_id


def wait_succeeded(page: Page) -> None:
    status = page.locator("#job-status")
    expect(status).to_have_attribute("data-status", "succeeded", timeout=JOB_TIMEOUT_MS)


def scene_png(size=(160, 120)) -> bytes:
    """A small landscape (sky, sun, hills) rather than noise, so the screenshot shows a real thumbnail."""
    w, h = size
    img = Image.new("RGB", size)
    draw = ImageDraw.Draw(img)
    for y in range(h):
        t = y / h
        draw.line([(0, y), (w, y)], fill=(int(90 + 120 * t), int(150 + 80 * t), 235))
    draw.ellipse([w * 0.68, h * 0.12, w * 0.86, h * 0.36], fill=(255, 214, 90))
    draw.polygon([(0, h), (0, h * 0.62), (w * 0.35, h * 0.45), (w * 0.7, h * 0.66), (w, h * 0.55), (w, h)],
                 fill=(70, 140, 70))
    draw.rectangle([w * 0.2, h * 0.62, w * 0.32, h * 0.8], fill=(150, 60, 50))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()
