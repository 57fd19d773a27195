"""The scoring behind bench/spatial_eval.py: object boxes, a region caption naming its object and no other,
and the pointing game on hand-made heatmaps."""

from __future__ import annotations

import numpy as np
import pytest

from latent_verbalizer.services.demo.evaluate import scene_items
from latent_verbalizer.services.demo.scoring import region_score
from latent_verbalizer.services.demo.spatial import caption_words, object_box, peak, pointing_hits
from latent_verbalizer.services.demo.synth import Scene, SceneObject, sample_scene

RED_CIRCLE = SceneObject("red", "circle", "large", 15, 20, 26)  # box 2.5..28.5 x 7.5..33.5
BLUE_SQUARE = SceneObject("blue", "square", "small", 44, 40, 18)  # box 35.5..53.5 x 31.5..49.5
RED_CROSS = SceneObject("red", "cross", "small", 52, 12, 16)  # box 44.5..60.5 x 4.5..20.5
SCENE = Scene(objects=(RED_CIRCLE, BLUE_SQUARE, RED_CROSS), background="gray")
WHOLE_IMAGE = (0.0, 0.0, 64.0, 64.0)


def test_object_box_grows_about_the_centre_and_is_clipped_to_the_image():
    assert object_box(BLUE_SQUARE) == (35.5, 31.5, 53.5, 49.5)
    x0, y0, x1, y1 = object_box(BLUE_SQUARE, 1.2)
    assert (x0 + x1) / 2 == 44.5 and (y0 + y1) / 2 == 40.5 and round(x1 - x0, 6) == round(y1 - y0, 6) == 21.6
    assert object_box(RED_CIRCLE, 1.2)[:2] == (0.0, pytest.approx(4.9))  # 15.5 - 15.6 < 0: clipped at the left
    assert object_box(RED_CROSS, 5.0) == (12.5, 0.0, 64.0, 52.5)


def test_a_region_caption_names_its_object_and_no_other():
    def verdict(caption: str, scene: Scene = SCENE) -> tuple[bool, bool, bool, bool]:
        v = region_score(caption, RED_CIRCLE, scene)
        return v["right"], v["own"], v["other"], v["single"]

    assert verdict("a large red circle on a gray background") == (True, True, False, True)
    assert verdict("a red circle left of a green triangle") == (True, True, False, False)  # not in the scene
    assert verdict("a red circle left of a red circle") == (True, True, False, False)  # named twice
    assert verdict("a large red circle left of a small blue square") == (False, True, True, False)
    assert verdict("a small blue circle on a gray background") == (False, False, False, False)  # wrong colour
    assert verdict("a large red square") == (False, False, False, False)
    assert verdict("a red cross") == (False, False, True, False)  # the other red object
    twins = Scene(objects=(RED_CIRCLE, SceneObject("red", "circle", "small", 45, 40, 17)), background="white")
    assert verdict("a large red circle left of a small red circle", twins) == (True, True, False, False)


def test_caption_words_keep_their_tokens_positions():
    pieces = ["a ", "large ", "red ", "cir", "cle ", "on ", "a ", "gray ", "back", "ground"]
    words = caption_words(pieces)
    assert [w for w, _ in words] == ["a", "large", "red", "circle", "on", "a", "gray", "background"]
    assert dict(words)["circle"] == [3, 4] and words[-1] == ("background", [8, 9])


def maps_peaking_at(*cells: tuple[int, int], grid: int = 8) -> np.ndarray:
    """One normalised 8x8 heatmap per token, each peaking at its (row, column)."""
    maps = np.full((len(cells), grid, grid), 0.5 / (grid * grid - 1), dtype=np.float32)
    for s, (i, j) in enumerate(cells):
        maps[s, i, j] = 0.5
    return maps


def test_peak_is_the_largest_patch_centre_in_image_px():
    assert peak(maps_peaking_at((2, 5))[0], WHOLE_IMAGE) == (44.0, 20.0)
    assert peak(maps_peaking_at((2, 5))[0], (10.0, 0.0, 26.0, 32.0)) == (21.0, 10.0)  # a crop's 2x4 px patches


def test_pointing_game_counts_words_of_exactly_one_object():
    # "red" names two objects (skipped), "circle" and "blue" and "square" one each, "large" is no colour or shape.
    pieces = ["a ", "large ", "red ", "circle ", "left ", "of ", "a ", "blue ", "square "]
    cells = [(0, 0), (0, 0), (1, 6), (2, 1), (0, 0), (0, 0), (0, 0), (5, 5), (0, 7)]
    # circle: patch (2, 1) centre (12, 20) inside; blue: (5, 5) centre (44, 44) inside; square: (0, 7) far off.
    assert pointing_hits(pieces, maps_peaking_at(*cells), SCENE, WHOLE_IMAGE) == [True, True, False]


def test_pointing_game_allows_one_patch_of_slack():
    # The blue square's box is 35.5..53.5 x 31.5..49.5; grown by one 8-px patch: 27.5..61.5 x 23.5..57.5.
    hits = {cell: pointing_hits(["blue "], maps_peaking_at(cell), SCENE, WHOLE_IMAGE)[0]
            for cell in [(3, 4), (6, 7), (3, 2), (2, 4), (7, 7)]}  # patch centres (36, 28) (60, 52) (20, 28) ...
    assert hits == {(3, 4): True, (6, 7): True, (3, 2): False, (2, 4): False, (7, 7): False}


def test_scene_items_keep_the_first_scenes_with_enough_objects():
    items, truth = scene_items(seed=7, n=5, min_objects=2)
    indices = [int(item.id.rsplit("_", 1)[1]) for item in items]
    wanted = [i for i in range(100) if len(sample_scene(7, i).objects) >= 2][:5]
    assert indices == wanted and [truth[item.id] for item in items] == [sample_scene(7, i) for i in wanted]
    assert [item.id for item in scene_items(seed=7, n=3)[0]] == [f"scene_7_{i:06d}" for i in range(3)]
