"""Region captions (issue 15): what a user writes, where it lands in the model's input, the pooler's key
mask, and the captions a run gives for it (coca_tiny: 32x32-px input, 8x8-px patches, a 4x4 grid)."""

import csv
import io
import json

import numpy as np
import pytest
import torch
from open_clip.transform import image_transform
from PIL import Image

from latent_verbalizer.services.cli import main
from latent_verbalizer.services.decoder.grounding import RunEmbeddings
from latent_verbalizer.services.encoder.regions import input_box, key_mask, locate, placement, transform_geometry
from latent_verbalizer.services.encoder.stage import capture_blocks, pool_layers, pool_regions
from latent_verbalizer.services.pipeline import verbalize
from latent_verbalizer.shared.images import ImageItem
from latent_verbalizer.shared.regions import (
    MAX_REGIONS,
    Region,
    RegionError,
    check_coverable,
    parse_region,
    parse_regions,
)

TINY = ["--model", "coca_tiny", "--pretrained", "none", "--device", "cpu"]


def png(seed: int, size: tuple[int, int]) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return buf.getvalue()


def geometry(lm):
    return lm.geometry


# --- what a user writes ---

def test_boxes_in_pixels_and_fractions():
    assert parse_region("10,20,30,40") == Region(x0=10, y0=20, x1=30, y1=40, units="px")
    assert parse_region(" 0, 0, 0.5, 1 ").units == "fraction"
    assert parse_region("0,0,1,1") == Region(x0=0, y0=0, x1=1, y1=1, units="fraction")  # the whole image
    assert parse_region("0,0,1,2").units == "px"  # one number outside [0, 1]: pixels
    cup = parse_region("cup=1.5,2,30,40")
    assert (cup.label, cup.units, cup.x0) == ("cup", "px", 1.5)
    regions = parse_regions(["1,2,3,4", "cup=0,0,0.5,0.5", "5,6,7,8"], include_cls=True)
    assert [r.label for r in regions] == ["r0", "cup", "r2"] and all(r.include_cls for r in regions)


def test_a_region_object_without_units_follows_the_text_rule():
    for box in ({"x0": 0, "y0": 0, "x1": 0.5, "y1": 1}, {"x0": 10, "y0": 20, "x1": 30, "y1": 40}):
        (as_object,) = parse_regions([box])
        (as_text,) = parse_regions([",".join(str(box[k]) for k in ("x0", "y0", "x1", "y1"))])
        assert as_object == as_text
    assert parse_regions([{"x0": 0, "y0": 0, "x1": 1, "y1": 1, "units": "px"}])[0].units == "px"  # as given
    with pytest.raises(RegionError, match="x1"):
        parse_regions([{"x0": 0, "y0": 0, "y1": 1}])


def test_grid_cells_tile_the_image():
    cells = parse_regions(["grid:2x3"])
    assert [c.label for c in cells] == ["r0c0", "r0c1", "r0c2", "r1c0", "r1c1", "r1c2"]
    assert {c.units for c in cells} == {"input"}  # fractions of what the model sees of the image
    assert sum((c.x1 - c.x0) * (c.y1 - c.y0) for c in cells) == pytest.approx(1)
    assert (cells[0].x0, cells[0].y0, cells[-1].x1, cells[-1].y1) == (0, 0, 1, 1)
    assert cells[1].x0 == cells[0].x1 and cells[3].y0 == cells[0].y1


@pytest.mark.parametrize("text, reason", [
    ("1,2,3", "'1,2,3': expected x0,y0,x1,y1"),
    ("a,b,c,d", "'a,b,c,d': expected"),
    ("30,0,10,10", "x0 < x1 and y0 < y1"),
    ("0,0,nan,1", "finite number"),
    ("my cup=1,2,3,4", "a name is 1-40 letters"),
    ("grid:0x3", "'grid:0x3': a grid is grid:RxC"),
    ("grid:3", "'grid:3'"),
])
def test_bad_regions_are_named(text, reason):
    with pytest.raises(RegionError, match="region") as e:
        parse_regions([text])
    assert reason in str(e.value)


def test_region_limits():
    with pytest.raises(RegionError, match="the label 'a' is used twice"):
        parse_regions(["a=1,2,3,4", "a=5,6,7,8"])
    with pytest.raises(RegionError, match=f"at most {MAX_REGIONS}"):
        parse_regions(["grid:9x9"])
    # A fraction box no image can make cover half a patch is known before any image is seen.
    with pytest.raises(RegionError, match=r"region 'r0' \(0.5,0.5,0.6,0.6 fraction\) covers no whole 8x8-px patch"):
        check_coverable(parse_regions(["0.5,0.5,0.6,0.6"]), (32, 32), (8, 8))
    check_coverable(parse_regions(["0.5,0.5,0.6,0.9", "grid:4x4"]), (32, 32), (8, 8))  # a wide or tall image could
    with pytest.raises(RegionError, match="region 'r0c1' .* on any image"):  # 6.4-px cells: r0c0 holds patch 0 whole
        check_coverable(parse_regions(["grid:5x5"]), (32, 32), (8, 8))


# --- where it lands in the model's input ---

def test_placement_of_a_non_square_image(tiny):
    """coca_tiny: shortest side to 32 px, then a 32x32 center crop. A 160x100 image becomes 51x32
    (torchvision: int(32 * 160 / 100)), cropped from x = round(19 / 2) = 10."""
    p = placement(tiny.preprocess, 160, 100)
    assert p.input_size == (32, 32)
    assert p.scale == pytest.approx((51 / 160, 32 / 100)) and p.shift == pytest.approx((-10, 0))
    assert input_box(tiny.preprocess, 160, 100) == pytest.approx((10 * 160 / 51, 0, 42 * 160 / 51, 100))
    assert input_box(tiny.preprocess, 100, 160) == pytest.approx((0, 10 * 160 / 51, 100, 42 * 160 / 51))
    assert input_box(tiny.preprocess, 32, 32) == (0, 0, 32, 32)


def test_placement_is_what_the_preprocessing_does(tiny):
    """A horizontal ramp (red = x) through the model's own transform: each input column holds the image's
    column the placement maps it to (up to the resampling filter's rounding)."""
    w, h = 200, 90
    ramp = np.zeros((h, w, 3), dtype=np.uint8)
    ramp[..., 0] = np.arange(w)[None, :]
    pixels = tiny.preprocess(Image.fromarray(ramp))  # [3, 32, 32], normalised
    mean, std = tiny.preprocess.transforms[-1].mean, tiny.preprocess.transforms[-1].std
    red = (pixels[0, 16] * std[0] + mean[0]) * 255  # the middle row
    p = placement(tiny.preprocess, w, h)
    centres = (torch.arange(32) + 0.5 - p.shift[0]) / p.scale[0] - 0.5  # input column centre -> image column
    assert torch.allclose(red[2:-2], centres[2:-2].float(), atol=1.0)


def test_key_mask_geometry(tiny):
    # A 64x48 image becomes 42x32 (x scale 42/64), cropped from x = 5: its top-right quarter is input x 16..37,
    # y 0..16, which holds patch columns 2 and 3 of rows 0 and 1 whole.
    top_right = parse_regions(["0.5,0,1,0.5"])
    mask = key_mask(top_right, [(64, 48)], geometry(tiny))  # [1, 1, 17]
    assert mask.shape == (1, 1, 17) and not mask[0, 0, 0]  # the class token is left out by default
    seen = mask[0, 0, 1:].view(4, 4)
    assert seen.tolist() == [[False, False, True, True], [False, False, True, True], [False] * 4, [False] * 4]
    with_cls = parse_regions(["0.5,0,1,0.5"], include_cls=True)
    assert key_mask(with_cls, [(64, 48)], geometry(tiny))[0, 0, 0]


def test_grid_cells_share_out_the_patches(tiny):
    """A grid tiles what the model sees (the input box): on any image every patch of the input is read by
    exactly one cell of a grid whose cells are whole patches, and by at most one of any grid."""
    for size in [(96, 64), (64, 96), (32, 32), (33, 200)]:
        for grid, cells in [("grid:4x4", 16), ("grid:2x2", 4), ("grid:1x4", 4)]:
            mask = key_mask(parse_regions([grid]), [size], geometry(tiny))[0]  # [cells, 17]
            assert mask.shape == (cells, 17) and mask[:, 1:].sum(0).tolist() == [1] * 16, (size, grid)
        # 3x3 cells on the demo model's 8x8 grid: no patch read twice, every cell reads some (not every patch is
        # more than half inside one cell). On coca_tiny's 4x4 grid the middle cell would read none.
        demo = transform_geometry(image_transform(64, is_train=False), 64, 8)
        mask = key_mask(parse_regions(["grid:3x3"]), [size], demo)[0]  # [9, 65]
        assert mask[:, 1:].sum(0).max() == 1 and mask[:, 1:].any(1).all()
    located = locate(parse_regions(["grid:2x2"]), (96, 64), geometry(tiny))
    assert located.input_box == (16, 0, 80, 64) and located.boxes[3] == (48, 32, 80, 64)


def test_a_region_covering_no_patch_fails_alone_and_is_named(tiny):
    located = locate(parse_regions(["0,0,3,3", "far=100,100,200,200", "0,0,12,12", "grid:2x2"]), (64, 64),
                     geometry(tiny))
    assert "region 'r0' (0,0,3,3 px) covers no whole 8x8-px patch of the model's input" in located.errors[0]
    assert "region 'far'" in located.errors[1]  # outside the image: clipped to nothing
    assert located.errors[2:] == [None] * 5
    assert located.patches == [0, 0, 1, 4, 4, 4, 4] and located.boxes[2] == (0, 0, 12, 12)
    assert located.mask[:2].all() and not located.mask[2:, 0].any()  # a failed region's placeholder: every position


# --- the pooler's key mask ---

def test_every_key_seen_is_the_unmasked_computation(tiny, pixels):
    visual = tiny.model.visual
    hidden = capture_blocks(visual, pixels[:3], [0, 2, 3])  # [3, 3, 17, C]
    everything = torch.ones(3, 2, 17, dtype=torch.bool)
    latents, _ = pool_regions(visual, hidden, everything)  # [3, 3, 2, Q-1, D]
    assert torch.allclose(latents[:, :, 0], pool_layers(visual, hidden), atol=1e-5)
    assert torch.equal(latents[:, :, 0], latents[:, :, 1])


def test_a_masked_key_has_no_influence(tiny, pixels):
    visual = tiny.model.visual
    hidden = capture_blocks(visual, pixels[:2], [1, 3])  # [2, 2, 17, C]
    mask = key_mask(parse_regions(["0,0,16,16"]), [(32, 32)] * 2, geometry(tiny))  # the top-left 2x2 patches
    assert mask[0, 0].nonzero().flatten().tolist() == [1, 2, 5, 6]
    before, _ = pool_regions(visual, hidden, mask)
    g = torch.Generator().manual_seed(0)
    changed = hidden.clone()
    changed[:, :, 0] += 3 * torch.randn(changed[:, :, 0].shape, generator=g)  # the class token
    changed[:, :, 16] += 3 * torch.randn(changed[:, :, 16].shape, generator=g)  # the bottom-right patch
    after, _ = pool_regions(visual, changed, mask)
    assert torch.allclose(before, after, atol=1e-6)
    changed[:, :, 6] += 3 * torch.randn(changed[:, :, 6].shape, generator=g)  # a patch the region reads
    assert not torch.allclose(before, pool_regions(visual, changed, mask)[0], atol=1e-2)


# --- the captions ---

def items(*sizes):
    return [ImageItem(id=f"img{i}", source=f"img{i}.png", data=png(i, s)) for i, s in enumerate(sizes)]


def test_the_whole_image_with_its_class_token_is_the_whole_image_caption(tiny):
    regions = parse_regions(["0,0,1,1", "left=0,0,0.5,1"], include_cls=True)
    results = list(verbalize(tiny, items((40, 30), (30, 40)), regions=regions))
    for r in results:
        assert r.error is None and len(r.regions) == 2
        whole = r.regions[0]
        assert whole.region.label == "r0" and whole.patches == 16 and whole.box == [0, 0, r.size[0], r.size[1]]
        assert [c.tokens for c in whole.layers] == [c.tokens for c in r.layers]  # token for token, every layer
        assert [c.layer for c in r.regions[1].layers] == [0, 1, 2, 3]


def test_region_captions_are_grounded_as_captions(tiny):
    """Grounding on: a region's caption is scored against its whole image, compared with the gray image's
    caption and with its own deepest caption; the retrieval rank stays the whole image's."""
    embeddings = RunEmbeddings()
    regions = parse_regions(["0,0,1,1", "0,0,0.5,0.5"], include_cls=True)
    results = list(verbalize(tiny, items((40, 30), (32, 32)), grounding=embeddings, regions=regions))
    assert len(embeddings.ids) == 2
    for r in results:
        for own, whole in zip(r.layers, r.regions[0].layers):
            assert own.caption == whole.caption and whole.image_score == pytest.approx(own.image_score, abs=1e-5)
        for region in r.regions:
            for c in region.layers:
                assert -1 <= c.image_score <= 1 and c.prior is not None and 0 <= c.prior_overlap <= 1
                assert c.retrieval_rank is None
            assert region.layers[-1].last_layer_similarity == pytest.approx(1, abs=1e-5)


def test_sampled_region_captions_have_their_own_keys(tiny):
    """Seeded sampling: a region's caption depends on its own key, not on the batch it shares."""
    from latent_verbalizer.shared.schemas import DecodeParams

    params = DecodeParams(strategy="sample", seed=3)
    regions = parse_regions(["a=0,0,1,1", "b=0,0,1,1"], include_cls=True)  # the same region twice
    result = next(verbalize(tiny, items((32, 32)), params=params, regions=regions))
    alone = next(verbalize(tiny, items((32, 32)), params=params, regions=regions[1:]))
    assert [c.tokens for c in alone.regions[0].layers] == [c.tokens for c in result.regions[1].layers]


def test_cli_regions_and_grid(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "small.png").write_bytes(png(0, (40, 30)))
    (tmp_path / "in" / "large.png").write_bytes(png(1, (400, 300)))
    out = tmp_path / "out"
    code = main(["verbalize", str(tmp_path / "in"), "--out", str(out), *TINY, "--no-grounding",
                 "--region", "0,0,30,30", "--region", "cup=0,0,0.5,0.5", "--regions", "grid:2x2"])
    assert code == 0
    results = {r["id"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    # 30x30 px of a 400x300 image is 3.2 px of the input: that region fails on that image, named; the image's
    # captions and its other regions stand.
    large = results["large"]
    assert "error" not in large and [c["layer"] for c in large["layers"]] == [0, 1, 2, 3]
    assert "region 'r0' (0,0,30,30 px) covers no whole 8x8-px patch" in large["regions"][0]["error"]
    assert large["regions"][0]["layers"] == [] and all(len(r["layers"]) == 4 for r in large["regions"][1:])
    small = results["small"]
    # 40x30 -> 42x32 (scale 1.05 across), cropped from x = 5: the input shows x 5/1.05 .. 37/1.05 of the image.
    assert small["size"] == [40, 30] and small["input_box"] == pytest.approx([5 / 1.05, 0, 37 / 1.05, 30])
    assert [r["region"]["label"] for r in small["regions"]] == ["r0", "cup", "r0c0", "r0c1", "r1c0", "r1c1"]
    for region in small["regions"]:
        assert [c["layer"] for c in region["layers"]] == [0, 1, 2, 3]
        assert all(c["caption"] and c["tokens"] for c in region["layers"])
        assert region["patches"] > 0 and len(region["box"]) == 4
    with open(out / "regions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == (6 + 5) * 4 and {r["id"] for r in rows} == {"small", "large"}
    cup = small["regions"][1]["layers"][0]["caption"]
    small_rows = [r for r in rows if r["id"] == "small"]
    assert (small_rows[4]["region"], small_rows[4]["layer"], small_rows[4]["caption"]) == ("cup", "0", cup)


@pytest.mark.parametrize("args, reason", [
    (["--region", "1,2,3"], "region '1,2,3': expected x0,y0,x1,y1"),
    (["--regions", "grid:2by2"], "region 'grid:2by2'"),
    (["--region", "0.4,0.4,0.5,0.5"], "covers no whole 8x8-px patch of the model's 32x32-px input on any image"),
    (["--region-cls"], "--region-cls applies to regions"),
])
def test_cli_bad_regions(tmp_path, capsys, args, reason):
    (tmp_path / "a.png").write_bytes(png(0, (32, 32)))
    assert main(["verbalize", str(tmp_path / "a.png"), "--out", str(tmp_path / "out"), *TINY, *args]) == 2
    assert reason in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before any image was read
