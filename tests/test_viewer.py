"""The web viewer (services/gateway/static/) in a real browser: Playwright driving Debian's Chromium,
headless, against the whole `latent-verbalizer serve` stack on coca_tiny with API keys on, and once
against the default stack (the shipped demo model). The page is used as a person would: the key
prompt, the file input, the options form, the job view, the results."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import tarfile
from pathlib import Path

import pytest
import viewer_browser
from PIL import Image
from playwright.sync_api import expect
from service_stack import API_KEY, free_port, image_bytes, redis_server, service, service_env, wait_for_workers
from viewer_browser import (
    IMAGE_LOADED,
    JOB_TIMEOUT_MS,
    new_page,
    scene_png,
    submit_files,
    wait_succeeded,
)

from latent_verbalizer.services.demo.evaluate import png_bytes
from latent_verbalizer.services.demo.synth import Scene, SceneObject, render
from latent_verbalizer.shared.settings import DEMO_MODEL, DEMO_PRETRAINED
from latent_verbalizer.shared.taxonomy import load_taxonomy

stack = viewer_browser.stack  # fixtures: one serve stack and one browser per module
browser = viewer_browser.browser

README_SHOT = Path(__file__).resolve().parents[1] / "docs" / "viewer.png"
LAYERS = [0, 1, 2, 3]  # coca_tiny's vision blocks
DEMO_LAST_LAYER = 5  # the demo model has 6 vision blocks
RUN: dict[str, str] = {}  # what one test leaves for the next: the id of the job it ran


@pytest.fixture()
def page(browser, stack):
    page, errors = new_page(browser, stack[0])
    yield page
    page.context.close()
    assert not errors, errors


DEMO_SCENES = [  # for the README's picture
    Scene((SceneObject("red", "circle", "large", 18, 24, 27), SceneObject("blue", "square", "small", 46, 40, 18)),
          "striped"),
    Scene((SceneObject("yellow", "triangle", "large", 32, 30, 28),), "black"),
]


def test_default_stack_shows_the_demo_model_captioning_scenes(browser, tmp_path):
    """The default stack (the shipped demo model, embedded categorizer) as the README shows it: the
    last layer names both scenes exactly. LV_UPDATE_SCREENSHOTS=1 rewrites docs/viewer.png from it."""
    files = [{"name": f"scene-{i}.png", "mimeType": "image/png", "buffer": png_bytes(render(scene, 7, i))}
             for i, scene in enumerate(DEMO_SCENES)]
    with redis_server(tmp_path) as url:
        port = free_port()
        env = service_env(url, tmp_path, LV_MODEL=DEMO_MODEL, LV_PRETRAINED=DEMO_PRETRAINED)
        with service(["serve", "--port", str(port)], env, tmp_path / "serve.log", port):
            wait_for_workers(url)
            page, errors = new_page(browser, f"http://127.0.0.1:{port}")
            page.goto("/")
            expect(page.locator("#model-info")).to_contain_text(DEMO_MODEL)
            submit_files(page, files)
            wait_succeeded(page)
            for selector in ("#figure-img", "#entropy-img"):
                page.wait_for_function(IMAGE_LOADED, arg=selector)
            last = page.locator(f'.ladder-row[data-layer="{DEMO_LAST_LAYER}"] .caption')
            assert [c.inner_text().strip() for c in last.all()] == [scene.caption for scene in DEMO_SCENES]
            if os.environ.get("LV_UPDATE_SCREENSHOTS") == "1":
                page.mouse.move(0, 0)
                page.evaluate("document.activeElement.blur(); window.scrollTo(0, 0)")
                page.screenshot(path=str(README_SHOT), full_page=True)
            page.context.close()
            assert not errors, errors


def test_asks_for_the_api_key_then_fills_in_the_server_defaults(browser, stack):
    page, errors = new_page(browser, stack[0], with_key=False)
    page.goto("/")
    dialog = page.locator("#key-dialog")
    expect(dialog).to_be_visible()
    expect(page.locator("#api-key")).to_be_focused()
    page.fill("#api-key", "not-the-key")
    page.keyboard.press("Enter")
    expect(page.locator("#key-error")).to_contain_text("invalid API key")
    page.fill("#api-key", API_KEY)
    page.click("#key-save")
    expect(dialog).to_be_hidden()
    page.keyboard.press("Tab")  # keyboard users meet the skip link first
    expect(page.locator(".skip-link")).to_be_focused()
    expect(page.locator("#model-info")).to_contain_text("coca_tiny")
    expect(page.locator("#model-info")).to_contain_text("4 layers")
    expect(page.locator("#workers-info")).to_have_text(  # the stack's three workers, each ready (or busy)
        re.compile(r"Workers: encode (ready|busy) · decode (ready|busy) · categorize (ready|busy)"))
    assert page.evaluate("sessionStorage.getItem('lv.apiKey')") == API_KEY
    # The options panel holds the server's defaults (GET /v1/options) and the model's bounds.
    page.click("#options-panel > summary")
    expect(page.locator("#opt-seq_len")).to_have_value("30")
    expect(page.locator("#opt-min_seq_len")).to_have_value("")  # blank: the model's own default
    expect(page.locator("#opt-strategy")).to_have_value("greedy")
    expect(page.locator("#opt-categorize")).to_be_checked()
    expect(page.locator("#opt-backend")).to_have_value("embedded")
    assert page.get_attribute("#opt-seq_len", "max") == "32"
    assert "0–3" in page.get_attribute("#opt-layers", "placeholder")
    # The hint's example is one this model takes (and the example rule holds for any depth).
    example = re.search(r"“(.+)”", page.inner_text("#hint-layers")).group(1)
    assert example == "0-1, -1"
    page.fill("#opt-layers", example)
    page.locator("#opt-layers").blur()
    expect(page.locator("#error-layers")).to_be_empty()
    bad = page.evaluate("""async () => { const f = await import('/form.js'); const bad = [];
        for (let n = 1; n <= 64; n++) if (f.parseLayers(f.layersExample(n), n).error) bad.push(n); return bad; }""")
    assert bad == []
    page.fill("#opt-layers", "0-2, 9")
    page.locator("#opt-layers").blur()
    expect(page.locator("#error-layers")).to_contain_text("No layer 9")
    # Every form control has a label (screen readers, click targets).
    unlabelled = page.evaluate("""[...document.querySelectorAll('input, select, textarea')]
        .filter(el => !el.labels.length && !el.getAttribute('aria-label')).map(el => el.id || el.name)""")
    assert unlabelled == []
    page.context.close()
    assert not errors, errors


def test_uploaded_image_gets_a_layer_ladder_with_chips_and_figures(page, stack, tmp_path):
    page.goto("/")
    expect(page.locator("#model-info")).to_contain_text("coca_tiny")
    job_id = submit_files(page, [{"name": "meadow.png", "mimeType": "image/png", "buffer": scene_png()}])
    expect(page.locator("#job-heading")).to_be_focused()
    wait_succeeded(page)
    RUN["job"] = job_id

    cards = page.locator(".image-card")
    expect(cards).to_have_count(1)
    card = cards.first
    expect(card.locator("h3")).to_have_text("meadow")
    rows = card.locator(".ladder-row")
    expect(rows).to_have_count(len(LAYERS))
    assert [int(r.get_attribute("data-layer")) for r in rows.all()] == LAYERS
    for row in rows.all():
        assert row.locator(".caption").inner_text().strip(), "a ladder row without a caption"
        assert row.locator(".chip").count() > 0, "a ladder row without category chips"
        assert row.locator(".entropy-value").inner_text().endswith("bits")
    # Each chip is named by its phrase and its class, for screen readers too.
    first_chip = card.locator(".chip").first
    assert first_chip.get_attribute("data-label") and first_chip.locator(".chip-class").inner_text()

    # The thumbnail is the file picked in this tab; both figures come from the server (with the key).
    thumb = card.locator("img.thumb")
    assert thumb.get_attribute("src").startswith("blob:")
    for selector in ("#figure-img", "#entropy-img", ".image-card img.thumb"):
        page.wait_for_function(IMAGE_LOADED, arg=selector)

    # Stage progress reached the total, each bar under its label, on a wide and on a phone-sized window;
    # the job is in this browser's recent list.
    for stage in ("encoded", "captioned", "categorized"):
        expect(page.locator(f"#stage-{stage}")).to_have_js_property("value", 1)
    for width in (1400, 420):
        page.set_viewport_size({"width": width, "height": 900})
        for stage in ("encoded", "captioned", "categorized"):
            line = page.locator(f'.job-stage[data-stage="{stage}"] .job-stage-line').bounding_box()
            bar = page.locator(f"#stage-{stage}").bounding_box()
            assert line["height"] > 10 and bar["y"] >= line["y"] + line["height"] - 0.5, (width, stage, line, bar)
    page.set_viewport_size({"width": 1440, "height": 900})
    expect(page.locator(f'#recent-list a[href="#job/{job_id}"]')).to_contain_text("meadow.png")
    recent = json.loads(page.evaluate("localStorage.getItem('lv.recentJobs')"))
    assert recent[0]["id"] == job_id and recent[0]["status"] == "succeeded"

    # Downloads go through the API with the bearer key.
    links = page.locator(".downloads a")
    assert {a.get_attribute("download").split("-", 1)[1] for a in links.all()} >= {
        "results.jsonl", "distribution.csv", "figure.png"}
    with page.expect_download() as download:
        links.filter(has_text="Results").click()
    lines = Path(download.value.path()).read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["meadow"]
    with page.expect_download() as download:
        page.locator('.downloads a[download$="-distribution.csv"]').click()
    assert Path(download.value.path()).read_text().startswith("layer,")

    page.mouse.move(0, 0)
    page.evaluate("document.activeElement.blur(); window.scrollTo(0, 0)")
    shot = tmp_path / "viewer-results.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000

    # Coming back later (a new page load: the picked file is gone): the recent list reopens the job.
    page.goto("/")
    expect(page.locator("#welcome")).to_be_visible()
    page.locator(f'#recent-list a[href="#job/{job_id}"]').click()
    expect(page.locator("#job-heading")).to_be_focused()
    wait_succeeded(page)
    expect(page.locator(".image-card .ladder-row")).to_have_count(len(LAYERS))
    expect(page.locator(".image-card .thumb.placeholder")).to_have_count(1)


def test_chip_colours_are_the_figure_colours(page, stack):
    if "job" not in RUN:
        pytest.skip("needs the job of test_uploaded_image_gets_a_layer_ladder_with_chips_and_figures")
    options = stack[1].get("/v1/options").json()
    if "taxonomy" not in options:
        pytest.skip("GET /v1/options does not expose the taxonomy (class colours) yet: chips are neutral")
    taxonomy = load_taxonomy()
    page.goto(f"/#job/{RUN['job']}")
    wait_succeeded(page)
    chips = page.locator(".image-card .chip")
    expect(chips.first).to_be_visible()
    seen = page.evaluate("""[...document.querySelectorAll('.image-card .chip')].map(c =>
        [c.dataset.label, c.dataset.class, getComputedStyle(c).backgroundColor])""")
    assert seen
    for label, cls, background in seen:
        assert cls == taxonomy.merge(label)
        r, g, b = (int(taxonomy.color(cls)[i:i + 2], 16) for i in (1, 3, 5))
        assert background == f"rgb({r}, {g}, {b})", (label, cls, background)
    # The figure's legend names the plotted classes in the same colours.
    legend = page.locator(".figure .legend li")
    expect(legend.first).to_be_visible()


def test_grounding_curves_and_a_mark_per_caption(page, stack):
    """A job with grounding (the default) shows the grounding figure, and in every ladder row the caption's
    image score and rank; a flat mid-gray image is the null input itself, so each of its captions is the
    decoder's prior and is marked so."""
    page.goto("/")
    expect(page.locator("#model-info")).to_contain_text("coca_tiny")
    gray = io.BytesIO()
    Image.new("RGB", (64, 64), (128, 128, 128)).save(gray, "PNG")
    job_id = submit_files(page, [{"name": "meadow.png", "mimeType": "image/png", "buffer": scene_png()},
                                 {"name": "gray.png", "mimeType": "image/png", "buffer": gray.getvalue()}])
    wait_succeeded(page)
    page.wait_for_function(IMAGE_LOADED, arg="#grounding-img")
    expect(page.locator(".downloads a", has_text="Grounding")).to_have_count(2)  # the csv and the figure
    results = {r["id"]: r for r in map(json.loads, stack[1].get(f"/v1/jobs/{job_id}/results").text.splitlines())}
    for name in ("meadow", "gray"):
        card = page.locator(".image-card", has=page.locator("h3", has_text=name))
        rows = card.locator(".ladder-row")
        expect(rows).to_have_count(len(LAYERS))
        for row, layer in zip(rows.all(), results[name]["layers"], strict=True):
            mark = row.locator(".grounding-mark").inner_text()
            assert mark.startswith(f"score {layer['image_score']:.2f}") and f"rank {layer['retrieval_rank']}/2" in mark
            expect(row.locator(".prior-mark")).to_have_count(1 if layer["prior"] else 0)
    assert all(layer["prior"] for layer in results["gray"]["layers"])


def test_refused_upload_shows_the_servers_reason(page):
    page.goto("/")
    expect(page.locator("#model-info")).to_contain_text("coca_tiny")
    page.set_input_files("#files", files=[{"name": "notes.jpg", "mimeType": "image/jpeg",
                                           "buffer": b"shopping list: milk, eggs\n"}])
    page.click("#submit-button")
    error = page.locator("#submit-error")
    expect(error).to_be_visible()
    expect(error).to_contain_text("notes.jpg: not a JPEG, PNG or WebP image")
    assert page.get_attribute("#submit-error", "role") == "alert"
    assert page.evaluate("location.hash") == ""
    expect(page.locator("#submit-button")).to_be_enabled()


def test_large_uncategorized_job_pages_through_images_and_shows_per_image_errors(page):
    page.goto("/")
    expect(page.locator("#model-info")).to_contain_text("coca_tiny")
    page.click("#options-panel > summary")
    page.fill("#opt-layers", "-1")
    page.uncheck("#opt-categorize")
    files = [{"name": f"img-{i}.png", "mimeType": "image/png", "buffer": image_bytes(i)} for i in range(7)]
    # A PNG by its content that does not decode: the job succeeds for the others and names this one.
    files.insert(3, {"name": "broken.png", "mimeType": "image/png", "buffer": image_bytes(99)[:80]})
    submit_files(page, files)
    wait_succeeded(page)
    expect(page.locator("#job-images")).to_contain_text("1 unusable")
    # Not categorized: no class figure, but the entropy figure.
    expect(page.locator("#figure-img")).to_have_count(0)
    page.wait_for_function(IMAGE_LOADED, arg="#entropy-img")
    page.select_option("#page-size", "5")
    pager = page.locator(".pager-top")
    expect(pager.locator(".page-info")).to_have_text("Images 1–5 of 8")
    expect(page.locator(".image-card h3")).to_have_text(["img-0", "img-1", "img-2", "broken", "img-3"])
    expect(pager.get_by_role("button", name="Previous")).to_be_disabled()
    # Only the chosen layer (-1: the last) was captioned.
    assert {r.get_attribute("data-layer") for r in page.locator(".ladder-row").all()} == {"3"}
    broken = page.locator(".image-card", has=page.locator("h3", has_text="broken"))
    expect(broken.locator(".image-error")).to_contain_text("Could not use this image")
    expect(broken.locator(".ladder-row")).to_have_count(0)
    pager.get_by_role("button", name="Next").click()
    expect(pager.locator(".page-info")).to_have_text("Images 6–8 of 8")
    expect(page.locator(".image-card h3")).to_have_text(["img-4", "img-5", "img-6"])
    expect(page.locator("#images-heading")).to_be_focused()
    expect(pager.get_by_role("button", name="Next")).to_be_disabled()
    page.fill("#image-filter", "img-2")
    expect(page.locator(".image-card h3")).to_have_text(["img-2"])
    page.fill("#image-filter", "")
    page.check("#only-failed")
    expect(page.locator(".image-card h3")).to_have_text(["broken"])


def shard(images: dict[str, bytes]) -> bytes:
    """A webdataset .tar shard: <key>.png members."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, data in images.items():
            info = tarfile.TarInfo(f"{key}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_dropped_shard_is_captioned_with_thumbnails_from_the_shard(page):
    page.goto("/")
    expect(page.locator("#model-info")).to_contain_text("coca_tiny")
    data = shard({"cat": image_bytes(30, size=(48, 40)), "dog": image_bytes(31, size=(40, 48))})
    # Drag-and-drop: a drop event carrying the file, as the browser fires it.
    page.evaluate("""b64 => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], "pets.tar", {type: "application/x-tar"}));
        const zone = document.querySelector("#dropzone");
        zone.dispatchEvent(new DragEvent("dragover", {dataTransfer: transfer, bubbles: true, cancelable: true}));
        zone.dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
    }""", base64.b64encode(data).decode())
    expect(page.locator("#file-list")).to_contain_text("1 shard")
    page.click("#submit-button")
    page.wait_for_url("**/#job/*")
    wait_succeeded(page)
    expect(page.locator(".image-card h3")).to_have_text(["cat", "dog"])
    expect(page.locator(".image-card").first.locator(".ladder-row")).to_have_count(len(LAYERS))
    for n in (1, 2):
        thumb = f".image-card:nth-child({n}) img.thumb"
        page.locator(thumb).scroll_into_view_if_needed()  # thumbnails load lazily, as they come into view
        page.wait_for_function(IMAGE_LOADED, arg=thumb)


def test_cancel_a_running_job(page):
    page.goto("/")
    expect(page.locator("#model-info")).to_contain_text("coca_tiny")
    page.click("#options-panel > summary")
    # Beam search over long captions keeps coca_tiny's decoder busy for seconds.
    page.select_option("#opt-strategy", "beam")
    page.fill("#opt-num_beams", "8")
    page.fill("#opt-seq_len", "32")
    page.fill("#opt-min_seq_len", "31")
    page.uncheck("#opt-categorize")
    expect(page.locator("#opt-backend")).to_be_disabled()
    files = [{"name": f"slow-{i}.png", "mimeType": "image/png", "buffer": image_bytes(20 + i)} for i in range(4)]
    submit_files(page, files)
    expect(page.locator("#stage-categorized")).to_have_count(0)  # categorize off: two stages
    cancel = page.locator("#cancel-job")
    expect(cancel).to_be_visible()
    cancel.click()
    expect(page.locator("#job-status")).to_have_attribute("data-status", "cancelled", timeout=JOB_TIMEOUT_MS)
    expect(cancel).to_be_hidden()
    expect(page.locator(".image-card")).to_have_count(0)
