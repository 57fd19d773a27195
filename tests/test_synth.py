"""The synthetic scene generator: deterministic per (seed, index), manifest consistent with the images."""

from __future__ import annotations

import numpy as np
from PIL import Image

from latent_verbalizer.services.cli import main
from latent_verbalizer.services.demo.scoring import named_objects, score
from latent_verbalizer.services.demo.synth import (
    COLORS,
    IMAGE_SIZE,
    MANIFEST,
    Scene,
    SceneObject,
    read_manifest,
    render,
    sample_scene,
    scenes,
    variant,
    write_dataset,
)


def test_same_seed_same_scenes_and_pixels():
    a = [(s, np.asarray(img)) for _, s, img in scenes(seed=3, n=5)]
    b = [(s, np.asarray(img)) for _, s, img in scenes(seed=3, n=5)]
    assert [s for s, _ in a] == [s for s, _ in b]
    assert all(np.array_equal(x, y) for (_, x), (_, y) in zip(a, b))


def test_scene_depends_on_seed_and_index_only():
    assert sample_scene(3, 4) == next(s for i, s, _ in scenes(seed=3, n=1, start=4))
    assert [sample_scene(3, i) for i in range(10)] != [sample_scene(4, i) for i in range(10)]


def test_scenes_follow_the_grammar():
    for i in range(200):
        s = sample_scene(0, i)
        assert 1 <= len(s.objects) <= 3
        xs = [o.x for o in s.objects]
        assert xs == sorted(xs) and len(set(xs)) == len(xs)
        assert s.caption.endswith(f" on a {s.background} background")
        assert named_objects(s.caption) == [(o.color, o.shape) for o in s.objects]
        assert score(s.caption, s) == {"color": True, "shape": True, "color_shape": True}


def test_variants_share_background_and_colours_only():
    base = sample_scene(0, 0)
    variants = [variant(base, 0, 0, k) for k in (1, 2, 3)]
    assert variants == [variant(base, 0, 0, k) for k in (1, 2, 3)]
    for v in variants:
        assert v.background == base.background
        assert [o.color for o in v.objects] == [o.color for o in base.objects]
    assert len({v.caption for v in [base, *variants]}) == 4


def test_manifest_matches_images(tmp_path):
    assert main(["synth", "--n", "6", "--seed", "5", "--out", str(tmp_path)]) == 0
    rows = read_manifest(tmp_path / MANIFEST)
    assert len(rows) == 6 and len({r["file"] for r in rows}) == 6
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(r["file"] for r in rows)
    for i, row in enumerate(rows):
        scene = Scene.from_dict(row)
        assert (row["seed"], row["index"]) == (5, i)
        assert scene == sample_scene(5, i) and row["caption"] == scene.caption
        img = Image.open(tmp_path / row["file"])
        assert img.size == (IMAGE_SIZE, IMAGE_SIZE) and img.mode == "RGB"
        assert np.array_equal(np.asarray(img), np.asarray(render(scene, 5, i)))
        for o in scene.objects:  # the object's colour is painted at its centre
            centre = np.asarray(img)[o.y, o.x].astype(int)
            assert np.abs(centre - np.array(COLORS[o.color])).max() <= 20, (row["file"], o)


def test_write_dataset_prefix_is_stable(tmp_path):
    write_dataset(tmp_path / "a", 2, seed=9)
    write_dataset(tmp_path / "b", 4, seed=9)
    assert read_manifest(tmp_path / "a" / MANIFEST) == read_manifest(tmp_path / "b" / MANIFEST)[:2]


def test_score_needs_every_object():
    scene = Scene(objects=(SceneObject("red", "circle", "large", 20, 30, 25),
                           SceneObject("blue", "cross", "small", 45, 20, 17)), background="gray")
    assert score("a large red circle left of a small blue cross on a gray background", scene)["color_shape"]
    assert score("a small blue cross left of a large red circle", scene)["color_shape"]  # order is free
    wrong = score("a large blue circle left of a small red cross on a gray background", scene)
    assert wrong == {"color": True, "shape": True, "color_shape": False}
    assert not score("a large red circle on a gray background", scene)["color"]
    assert not score("a red circle left of a blue cross left of a blue cross", scene)["shape"]
