"""Verbalize synthetic scenes and measure, per encoder layer, how many captions name the right
colours, the right shapes and the right (colour, shape) objects."""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from itertools import count, islice

from PIL import Image

from latent_verbalizer.services.demo.scoring import score
from latent_verbalizer.services.demo.synth import Scene, render, sample_scene
from latent_verbalizer.shared.images import ImageItem
from latent_verbalizer.shared.schemas import ImageResult


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def scene_items(seed: int, n: int, min_objects: int = 1) -> tuple[list[ImageItem], dict[str, Scene]]:
    """The first n scenes of `seed` with at least `min_objects` objects (1: scenes 0..n-1) as PNG-encoded
    items, and each item's ground truth by id."""
    items, truth = [], {}
    for i, scene in islice(_scenes_with(seed, min_objects), n):
        img = render(scene, seed, i)
        item_id = f"scene_{seed}_{i:06d}"
        items.append(ImageItem(id=item_id, source=f"synth:seed={seed}:index={i}", data=png_bytes(img)))
        truth[item_id] = scene
    return items, truth


def _scenes_with(seed: int, min_objects: int) -> Iterator[tuple[int, Scene]]:
    """(index, scene) of `seed`'s scenes with at least `min_objects` objects, in index order."""
    for i in count():
        scene = sample_scene(seed, i)
        if len(scene.objects) >= min_objects:
            yield i, scene


def layer_shares(results: Iterable[ImageResult], truth: dict[str, Scene]) -> list[dict]:
    """Per layer: shares of captions with the right colours / shapes / objects, and mean entropy (bits).
    A failed image counts as wrong at every layer."""
    results = list(results)
    n = len(results)
    layers = sorted({c.layer for r in results for c in r.layers or []})
    rows = []
    for layer in layers:
        totals = {"color": 0, "shape": 0, "color_shape": 0}
        entropy = 0.0
        for r in results:
            cap = next((c for c in r.layers or [] if c.layer == layer), None)
            if cap is None:
                continue
            for k, ok in score(cap.caption, truth[r.id]).items():
                totals[k] += ok
            entropy += cap.mean_entropy
        rows.append({"layer": layer, **{k: v / n for k, v in totals.items()}, "mean_entropy": entropy / n})
    return rows
