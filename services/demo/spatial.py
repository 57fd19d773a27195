"""Where the model reads an object, checked on synthetic scenes whose objects' places are known
(bench/spatial_eval.py): each object's box, and the pointing game: does the heatmap of a colour or shape
word of a caption peak on the one object of the scene that the word can mean?

Coordinates are the image's own pixels, continuous: pixel (x, y) covers [x, x+1) x [y, y+1). An object of
centre (x, y) and diameter d (synth.render draws it about the pixel's centre, x + 0.5) has the box
x + 0.5 +- d/2, y + 0.5 +- d/2. A heatmap [gh, gw] covers the part of the image the model's input shows,
`input_box` (services.encoder.regions.input_box, in image px), in gh x gw equal patches.
"""

from __future__ import annotations

import numpy as np

from latent_verbalizer.services.demo.synth import IMAGE_SIZE, Scene, SceneObject

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in image px


def object_box(obj: SceneObject, scale: float = 1.0, size: int = IMAGE_SIZE) -> Box:
    """obj's bounding box grown `scale` times about its centre, clipped to the size x size image."""
    cx, cy, half = obj.x + 0.5, obj.y + 0.5, obj.diameter * scale / 2
    return max(cx - half, 0.0), max(cy - half, 0.0), min(cx + half, size), min(cy + half, size)


def caption_words(pieces: list[str]) -> list[tuple[str, list[int]]]:
    """A caption's words with the positions of their tokens, from its tokens' texts (each token decoded
    alone; open_clip's tokenizer ends a word's last token with a space)."""
    words: list[tuple[str, list[int]]] = []
    text, positions = "", []
    for i, piece in enumerate(pieces):
        text, positions = text + piece, [*positions, i]
        if piece.endswith(" ") or i == len(pieces) - 1:
            if text.strip():
                words.append((text.strip().lower(), positions))
            text, positions = "", []
    return words


def peak(heatmap: np.ndarray, input_box: Box) -> tuple[float, float]:
    """The centre (x, y), in image px, of the patch where heatmap [gh, gw] is largest."""
    gh, gw = heatmap.shape
    i, j = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    x0, y0, x1, y1 = input_box
    return x0 + (j + 0.5) * (x1 - x0) / gw, y0 + (i + 0.5) * (y1 - y0) / gh


def pointing_hits(pieces: list[str], maps: np.ndarray, scene: Scene, input_box: Box) -> list[bool]:
    """The pointing game on one caption, its tokens' texts `pieces` and their heatmaps maps [S, gh, gw]: for
    each word that is the colour or the shape of exactly one of the scene's objects, whether the word's
    heatmap (the mean of its tokens' maps) peaks in that object's box grown by one patch on every side."""
    _, gh, gw = maps.shape
    x0, y0, x1, y1 = input_box
    slack_x, slack_y = (x1 - x0) / gw, (y1 - y0) / gh
    hits = []
    for word, positions in caption_words(pieces):
        matching = [o for o in scene.objects if word in (o.color, o.shape)]
        if len(matching) != 1:
            continue
        x, y = peak(maps[positions].mean(0), input_box)
        bx0, by0, bx1, by1 = object_box(matching[0])
        hits.append(bool(bx0 - slack_x <= x <= bx1 + slack_x and by0 - slack_y <= y <= by1 + slack_y))
    return hits
