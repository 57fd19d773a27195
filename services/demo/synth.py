"""Synthetic scenes: one to three coloured shapes on a plain or striped background, each
with a ground-truth caption from a small grammar and its structured attributes.

Scene `index` of seed `seed` depends on nothing else (its RNG is seeded by the pair), so a data set is
the same whatever its size, training can stream scenes by index, and a different seed gives unseen
scenes. Objects are listed left to right; the caption reads "a large red circle left of a small blue
square on a gray background".
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SUPERSAMPLE = 4  # shapes are drawn at 4x and downsampled, for smooth edges
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 165, 55),
    "blue": (35, 75, 215),
    "yellow": (235, 210, 35),
    "purple": (135, 55, 175),
    "orange": (245, 135, 25),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES: dict[str, tuple[int, int]] = {"small": (16, 19), "large": (25, 30)}  # diameter range, px
BACKGROUNDS = ("gray", "white", "black", "striped")
MIN_DX = 6  # px between object centres, so "left of" is never ambiguous
MANIFEST = "manifest.jsonl"


@dataclass(frozen=True)
class SceneObject:
    color: str
    shape: str
    size: str
    x: int  # centre, px from the left
    y: int  # centre, px from the top
    diameter: int

    @property
    def phrase(self) -> str:
        return f"a {self.size} {self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]  # left to right
    background: str

    @property
    def caption(self) -> str:
        return " left of ".join(o.phrase for o in self.objects) + f" on a {self.background} background"

    def to_dict(self) -> dict:
        return {"caption": self.caption, "background": self.background,
                "objects": [asdict(o) for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        return cls(objects=tuple(SceneObject(**o) for o in d["objects"]), background=d["background"])


def _place(rng: np.random.Generator, n: int) -> list[tuple[int, int, int, str]]:
    """n non-overlapping (x, y, diameter, size word) placements with distinct x."""
    while True:
        placed: list[tuple[int, int, int, str]] = []
        for _ in range(100):
            size = str(rng.choice(list(SIZES)))
            d = int(rng.integers(SIZES[size][0], SIZES[size][1] + 1))
            r = d / 2
            x = int(rng.integers(math.ceil(r) + 1, IMAGE_SIZE - math.ceil(r)))
            y = int(rng.integers(math.ceil(r) + 1, IMAGE_SIZE - math.ceil(r)))
            if all(math.dist((x, y), (px, py)) >= r + pd / 2 + 2 and abs(x - px) >= MIN_DX
                   for px, py, pd, _ in placed):
                placed.append((x, y, d, size))
                if len(placed) == n:
                    return sorted(placed)


def sample_scene(seed: int, index: int) -> Scene:
    rng = np.random.default_rng([seed, index])
    n = int(rng.integers(1, 4))
    objects = tuple(
        SceneObject(color=str(rng.choice(list(COLORS))), shape=str(rng.choice(SHAPES)), size=size,
                    x=x, y=y, diameter=d)
        for x, y, d, size in _place(rng, n)
    )
    return Scene(objects=objects, background=str(rng.choice(BACKGROUNDS)))


def variant(scene: Scene, seed: int, index: int, k: int) -> Scene:
    """The k-th variant of scene `index`: the same background and colours (left to right), with new
    shapes, sizes and places. Distributed like any scene; training batches use variants as hard
    negatives, images that colour alone cannot tell apart."""
    rng = np.random.default_rng([seed, index, 2, k])
    objects = tuple(
        SceneObject(color=o.color, shape=str(rng.choice(SHAPES)), size=size, x=x, y=y, diameter=d)
        for o, (x, y, d, size) in zip(scene.objects, _place(rng, len(scene.objects)))
    )
    return Scene(objects=objects, background=scene.background)


def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int], amount: int) -> tuple[int, int, int]:
    r, g, b = (int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)
    return r, g, b


def _gray(rng: np.random.Generator, lo: int, hi: int) -> tuple[int, int, int]:
    v = int(rng.integers(lo, hi + 1))
    return v, v, v


def _background(rng: np.random.Generator, kind: str) -> Image.Image:
    size = IMAGE_SIZE * SUPERSAMPLE
    plain = {"gray": (105, 150), "white": (225, 250), "black": (5, 35)}
    if kind in plain:
        return Image.new("RGB", (size, size), _gray(rng, *plain[kind]))
    light, dark = _gray(rng, 175, 205)[0], _gray(rng, 115, 145)[0]  # striped: soft grey stripes
    period = int(rng.integers(6, 13)) * SUPERSAMPLE
    yy, xx = np.ogrid[0:size, 0:size]
    direction = int(rng.integers(0, 4))  # horizontal, vertical, two diagonals
    on = ((yy, xx, xx + yy, xx - yy + size)[direction] // period) % 2 == 0
    grey = np.broadcast_to(np.where(on, np.uint8(light), np.uint8(dark)), (size, size))
    return Image.fromarray(np.ascontiguousarray(grey), "L").convert("RGB")


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        h = r * 0.8
        pts = [(-h, -h), (h, -h), (h, h), (-h, h)]
    elif shape == "triangle":
        pts = [(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))]
    else:  # cross: a plus sign with arms a third of the diameter wide
        a, t = r * 0.95, r * 0.33
        pts = [(-t, -a), (t, -a), (t, -t), (a, -t), (a, t), (t, t),
               (t, a), (-t, a), (-t, t), (-a, t), (-a, -t), (-t, -t)]
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def render(scene: Scene, seed: int, index: int) -> Image.Image:
    """The scene's image; textures, tints and rotations come from the same (seed, index)."""
    rng = np.random.default_rng([seed, index, 1])
    img = _background(rng, scene.background)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        fill = _jitter(rng, COLORS[o.color], 18)
        angle = math.radians(float(rng.uniform(-15, 15)))
        cx, cy, r = (o.x + 0.5) * SUPERSAMPLE, (o.y + 0.5) * SUPERSAMPLE, o.diameter / 2 * SUPERSAMPLE
        if o.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon(_polygon(o.shape, cx, cy, r, angle), fill=fill)
    return img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


def scenes(seed: int, n: int, start: int = 0) -> Iterator[tuple[int, Scene, Image.Image]]:
    """(index, scene, image) for indices start .. start+n-1 of `seed`."""
    for i in range(start, start + n):
        scene = sample_scene(seed, i)
        yield i, scene, render(scene, seed, i)


def write_dataset(out: Path, n: int, seed: int) -> Path:
    """n scenes as PNG files plus manifest.jsonl (file, caption, attributes, seed, index); returns the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / MANIFEST
    with manifest.open("w") as f:
        for i, scene, img in scenes(seed, n):
            name = f"scene_{seed}_{i:06d}.png"
            img.save(out / name)
            f.write(json.dumps({"file": name, **scene.to_dict(), "seed": seed, "index": i}) + "\n")
    return manifest


def read_manifest(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", type=int, default=100, help="number of scenes")
    p.add_argument("--seed", type=int, default=0, help="scene i of a seed is always the same scene")
    p.add_argument("--out", type=Path, required=True, help=f"directory for the PNG files and {MANIFEST}")


def run(args: argparse.Namespace) -> int:
    manifest = write_dataset(args.out, args.n, args.seed)
    print(f"{args.n} scenes -> {manifest}")
    return 0
