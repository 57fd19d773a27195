"""The viewer's "where" views in a real browser (Playwright, Debian's Chromium) against the `serve` stack on
coca_tiny: a caption word's heatmap over the picture, a dragged box's region ladder beside the whole
image's, and a grid's caption map with its layer slider. One page runs through them in order, as a person
would: one upload (with word maps), then the region job and the grid job it starts (three jobs in all)."""

from __future__ import annotations

import json
import re

import pytest
import viewer_browser
from playwright.sync_api import Page, expect
from viewer_browser import (
    IMAGE_LOADED,
    JOB_TIMEOUT_MS,
    new_page,
    scene_png,
    submit_files,
    wait_succeeded,
)

stack = viewer_browser.stack  # fixtures: one serve stack and one browser per module
browser = viewer_browser.browser

LAYERS = [0, 1, 2, 3]  # coca_tiny's vision blocks
SIZE = (160, 120)  # the uploaded picture; coca_tiny's input is (about) its centre 120 x 120, 4 x 4 patches
# A canvas pixel: [r, g, b, a]. The heatmap veils cells by how little the word read them, and paints
# orange over them by how much (shown over its strongest cell: r 255, g 60, alpha 0.65).
PIXEL = """([sel, fx, fy]) => { const c = document.querySelector(sel);
  return [...c.getContext("2d").getImageData(Math.floor(fx * c.width), Math.floor(fy * c.height), 1, 1).data] }"""
PAINTED = """sel => { const c = document.querySelector(sel);
  const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
  let n = 0; for (let i = 3; i < d.length; i += 4) n += d[i] > 0; return n }"""
HEAT = ".image-card canvas.heat"
RUN: dict[str, str] = {}


@pytest.fixture(scope="module")
def viewer(browser, stack):
    """One page for the module: region and grid jobs upload the image again, from the file this tab picked."""
    page, errors = new_page(browser, stack[0])
    yield page, errors
    page.context.close()
    assert not errors, errors


def word_map(api, job_id: str, image: str, layer: int, word: int, region: int | None = None) -> list[float]:
    """The map the viewer shows for a caption's word: the mean of its tokens' maps (a word's last token
    ends with a space)."""
    params = {"image": image, "layer": layer} | ({} if region is None else {"region": region})
    data = api.get(f"/v1/jobs/{job_id}/attributions/map", params=params).json()
    words, run = [], []
    for i, token in enumerate(data["tokens"]):
        run.append(i)
        if token.endswith(" ") or i == len(data["tokens"]) - 1:
            if any(data["tokens"][p].strip() for p in run):
                words.append(run)
            run = []
    rows = [data["maps"][i] for i in words[word]]
    return [sum(col) / len(rows) for col in zip(*rows)]


def veiled(pixel: list[int]) -> bool:
    """A canvas pixel the heatmap only veils (a patch the word did not read, or outside the model's view)."""
    r, g, b, a = pixel
    return abs(r - 15) <= 2 and abs(g - 20) <= 2 and abs(b - 35) <= 2 and 130 < a < 150


def cell_centre(index: int, grid=(4, 4)) -> tuple[float, float]:
    """Patch `index` (row-major) -> its centre as fractions of the picture."""
    r, c = divmod(index, grid[1])
    x0, y0, x1, y1 = RUN["input_box"]
    return ((x0 + (c + 0.5) * (x1 - x0) / grid[1]) / SIZE[0], (y0 + (r + 0.5) * (y1 - y0) / grid[0]) / SIZE[1])


def test_hovering_a_word_overlays_its_heatmap_on_the_picture(viewer, stack):
    page, errors = viewer
    page.goto("/")
    expect(page.locator("#model-info")).to_contain_text("coca_tiny")
    page.click("#options-panel > summary")
    page.check("#opt-attributions")
    page.uncheck("#opt-categorize")
    expect(page.locator("#options-summary")).to_contain_text("word maps")
    RUN["job"] = submit_files(page, [{"name": "meadow.png", "mimeType": "image/png", "buffer": scene_png(SIZE)}])
    wait_succeeded(page)
    page.wait_for_function(IMAGE_LOADED, arg=".image-card img.thumb")
    [record] = map(json.loads, stack[1].get(f"/v1/jobs/{RUN['job']}/results").text.splitlines())
    assert record["size"] == list(SIZE)
    RUN["input_box"] = box = record["input_box"]  # open_clip: shorter side resized to 32 px, centre crop
    assert 18 < box[0] < 21 and box[1] == 0 and 139 < box[2] < 142 and box[3] == SIZE[1]

    heat = page.locator(HEAT)
    expect(heat).to_be_hidden()
    row = page.locator(f'.whole-ladder .ladder-row[data-layer="{LAYERS[-1]}"]')
    word = row.locator(".word").nth(1)
    word.hover()
    expect(heat).to_be_visible()
    expect(word).to_have_class(re.compile(r"\bactive\b"))
    assert page.evaluate(PAINTED, HEAT) > 0
    # The grid lands on the image's pixels: the word's strongest patch is painted brightest, and the
    # strips the centre crop cut off (x < 19 and x > 141) are veiled: the model never saw them.
    values = word_map(stack[1], RUN["job"], "meadow", LAYERS[-1], 1)
    r, g, _, a = page.evaluate(PIXEL, [HEAT, *cell_centre(values.index(max(values)))])
    assert r == 255 and g < 80 and a > 150, (r, g, a)
    for fx in (0.05, 0.95):
        assert veiled(page.evaluate(PIXEL, [HEAT, fx, 0.5]))

    page.mouse.move(0, 0)  # leaving the word clears the map
    expect(heat).to_be_hidden()
    expect(row.locator(".word.active")).to_have_count(0)
    # From the keyboard: focus the caption, arrows move from word to word.
    row.locator(".caption").focus()
    expect(heat).to_be_visible()
    expect(row.locator(".word").first).to_have_class(re.compile(r"\bactive\b"))
    page.keyboard.press("ArrowRight")
    expect(row.locator(".word").nth(1)).to_have_class(re.compile(r"\bactive\b"))
    page.evaluate("document.activeElement.blur()")
    expect(heat).to_be_hidden()
    assert not errors, errors


def drag(page: Page, selector: str, start: tuple[float, float], end: tuple[float, float]) -> None:
    """A mouse drag across the element, between two points given as fractions of its size."""
    box = page.locator(selector).bounding_box()
    page.mouse.move(box["x"] + start[0] * box["width"], box["y"] + start[1] * box["height"])
    page.mouse.down()
    page.mouse.move(box["x"] + end[0] * box["width"], box["y"] + end[1] * box["height"], steps=5)
    page.mouse.up()


def test_dragging_a_box_shows_the_regions_ladder_beside_the_images(viewer, stack):
    page, errors = viewer
    if "job" not in RUN:
        pytest.skip("needs the job of test_hovering_a_word_overlays_its_heatmap_on_the_picture")
    card = page.locator(".image-card")
    expect(card.locator(".drag-hint")).to_contain_text("Drag a box")
    # About the top-left quarter of what the model sees (x 19-141 of 160): a region of 2 x 2 patches.
    drag(page, ".image-card .stage img.thumb", (0.125, 0.0), (0.5, 0.5))
    panel = card.locator(".region-panel")
    expect(panel).to_be_visible()
    expect(panel).to_have_attribute("data-status", "done", timeout=JOB_TIMEOUT_MS)
    region_job = stack[1].get(f"/v1/jobs/{panel.get_attribute('data-job')}").json()
    assert region_job["status"] == "succeeded"
    [region] = region_job["options"]["regions"]
    assert (region["units"], region["x0"], region["y0"], region["x1"], region["y1"]) == ("px", 20, 0, 80, 60)
    expect(panel.locator("h4")).to_have_text("Region 20, 0, 80, 60 px")
    expect(panel.locator(".region-status")).to_contain_text("4 patches")

    # Its ladder has every layer, beside the whole image's (same rows, side by side).
    rows = panel.locator(".ladder-row")
    expect(rows).to_have_count(len(LAYERS))
    assert [int(r.get_attribute("data-layer")) for r in rows.all()] == LAYERS
    assert all(r.locator(".caption").inner_text().strip() for r in rows.all())
    whole = card.locator(".whole-ladder")
    expect(whole.locator(".ladder-row")).to_have_count(len(LAYERS))
    left, right = whole.bounding_box(), panel.bounding_box()
    assert right["x"] >= left["x"] + left["width"] and abs(right["y"] - left["y"]) < 5
    expect(card.locator(".stage-boxes .stage-box")).to_have_count(1)

    # Its words have the region's maps: strongest on one of its 4 patches, nothing on the others.
    rows.first.locator(".word").first.hover()
    heat = page.locator(HEAT)
    expect(heat).to_be_visible()
    values = word_map(stack[1], panel.get_attribute("data-job"), "meadow", LAYERS[0], 0, region=0)
    strongest = values.index(max(values))
    assert strongest in (0, 1, 4, 5) and all(values[i] == 0 for i in range(16) if i not in (0, 1, 4, 5))
    r, g, _, a = page.evaluate(PIXEL, [HEAT, *cell_centre(strongest)])
    assert r == 255 and g < 80 and a > 150, (r, g, a)
    assert veiled(page.evaluate(PIXEL, [HEAT, *cell_centre(15)]))
    page.mouse.move(0, 0)
    expect(heat).to_be_hidden()
    assert not errors, errors


def test_grid_mode_shows_a_caption_per_cell_at_the_sliders_layer(viewer, stack):
    page, errors = viewer
    if "job" not in RUN:
        pytest.skip("needs the job of test_hovering_a_word_overlays_its_heatmap_on_the_picture")
    card = page.locator(".image-card")
    rows, cols = card.locator('[aria-label="Grid rows"]'), card.locator('[aria-label="Grid columns"]')
    expect(rows).to_have_value("3")
    expect(cols).to_have_value("3")
    # coca_tiny sees 4 x 4 patches: a 3 x 3 grid's centre cell holds no patch more than half, so 2 x 2.
    rows.fill("2")
    cols.fill("2")
    card.get_by_role("button", name="Caption map").click()
    panel = card.locator(".grid-panel")
    expect(panel).to_have_attribute("data-status", "done", timeout=JOB_TIMEOUT_MS)
    grid_job = panel.get_attribute("data-job")
    [record] = map(json.loads, stack[1].get(f"/v1/jobs/{grid_job}/results").text.splitlines())
    assert [r["region"]["label"] for r in record["regions"]] == ["r0c0", "r0c1", "r1c0", "r1c1"]

    cells = panel.locator(".grid-cell")
    expect(cells).to_have_count(4)
    slider = panel.get_by_label("Layer")
    expect(slider).to_have_value(str(len(LAYERS) - 1))  # the last layer first
    expect(panel.locator("output")).to_have_text(f"Layer {LAYERS[-1]}")

    def shown(layer_index: int) -> None:
        expect(cells.locator(".cell-caption")).to_have_text(
            [r["layers"][layer_index]["caption"] for r in record["regions"]])

    shown(-1)
    slider.fill("0")
    expect(panel.locator("output")).to_have_text(f"Layer {LAYERS[0]}")
    shown(0)
    # The cells tile what the model sees, on the picture.
    picture = panel.locator(".grid-picture").bounding_box()
    first = cells.first.bounding_box()
    x0, _, x1, _ = RUN["input_box"]
    assert abs(first["x"] - picture["x"] - picture["width"] * x0 / SIZE[0]) < 2
    assert abs(first["width"] - picture["width"] * (x1 - x0) / 2 / SIZE[0]) < 2
    assert not errors, errors


def test_without_the_file_regions_are_off_and_say_why(viewer):
    """A reload forgets the picked file (as for shards read on the server): word maps still show, over the
    image's shape, but region and grid jobs, which upload the file again, are off with the reason."""
    page, errors = viewer
    if "job" not in RUN:
        pytest.skip("needs the job of test_hovering_a_word_overlays_its_heatmap_on_the_picture")
    page.goto("/")
    page.goto(f"/#job/{RUN['job']}")
    wait_succeeded(page)
    card = page.locator(".image-card")
    expect(card.locator(".thumb.placeholder")).to_have_count(1)
    run = card.get_by_role("button", name="Caption map")
    expect(run).to_be_disabled()
    assert "does not hold its file" in run.get_attribute("title")
    expect(card.locator(".drag-hint")).to_contain_text("need the image's file in this tab")
    card.locator(".whole-ladder .word").first.hover()
    expect(page.locator(HEAT)).to_be_visible()
    assert not errors, errors


def test_a_jobs_own_regions_show_one_ladder_at_a_time(viewer, stack):
    """Regions asked through the API (or the CLI's --region) show in the card: pick one, see its ladder and
    its box on the image's shape."""
    page, errors = viewer
    api = stack[1]
    created = api.post("/v1/jobs", files=[("files", ("meadow.png", scene_png(SIZE), "image/png"))],
                       data={"options": json.dumps({"categorize": False, "regions": ["sun=100,10,150,50",
                                                                                     "house=20,60,80,110"]})})
    assert created.status_code == 202, created.text
    page.goto(f"/#job/{created.json()['id']}")
    wait_succeeded(page)
    panel = page.locator(".image-card .region-panel")
    expect(panel.locator(".ladder-row")).to_have_count(len(LAYERS))
    pick = panel.get_by_label("Region", exact=True)
    expect(pick.locator("option")).to_have_text(["sun: 100, 10, 150, 50 px", "house: 20, 60, 80, 110 px"])
    expect(page.locator(".stage-box-label")).to_have_text("sun")
    [record] = map(json.loads, api.get(f"/v1/jobs/{created.json()['id']}/results").text.splitlines())
    pick.select_option(label="house: 20, 60, 80, 110 px")
    expect(page.locator(".stage-box-label")).to_have_text("house")
    expect(panel.locator(".ladder-row .caption")).to_have_text(
        [layer["caption"] for layer in record["regions"][1]["layers"]])
    assert not errors, errors
