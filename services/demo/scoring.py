"""How well a caption describes a synthetic scene: does it name the right colours, the right shapes,
and the right (colour, shape) object for every object, nothing missing and nothing extra; and how well a
region's caption describes one object of it (`region_score`)."""

from __future__ import annotations

import re
from collections import Counter

from latent_verbalizer.services.demo.synth import COLORS, SHAPES, Scene, SceneObject

_WORD = re.compile(r"[a-z]+")


def _words(caption: str) -> list[str]:
    return _WORD.findall(caption.lower())


def named_objects(caption: str) -> list[tuple[str | None, str]]:
    """(colour, shape) per shape word, the colour being the last colour word since the previous shape."""
    objects: list[tuple[str | None, str]] = []
    color: str | None = None
    for w in _words(caption):
        if w in COLORS:
            color = w
        elif w in SHAPES:
            objects.append((color, w))
            color = None
    return objects


def score(caption: str, scene: Scene) -> dict[str, bool]:
    """color: same colour words as the scene's objects (as a multiset); shape: same shape words;
    color_shape: the same multiset of (colour, shape) objects."""
    words = _words(caption)
    truth = scene.objects
    return {
        "color": Counter(w for w in words if w in COLORS) == Counter(o.color for o in truth),
        "shape": Counter(w for w in words if w in SHAPES) == Counter(o.shape for o in truth),
        "color_shape": Counter(named_objects(caption)) == Counter((o.color, o.shape) for o in truth),
    }


def region_score(caption: str, obj: SceneObject, scene: Scene) -> dict[str, bool]:
    """How a region's caption describes `obj`, one of the scene's objects. own: it names obj's (colour,
    shape); other: it names another object's (one of obj's colour and shape cannot be told apart from obj,
    so it does not count); right: own and not other; single: it names obj and nothing else, once."""
    named = named_objects(caption)
    own = (obj.color, obj.shape)
    other = bool(set(named) & ({(o.color, o.shape) for o in scene.objects if o != obj} - {own}))
    return {"right": own in named and not other, "own": own in named, "other": other, "single": named == [own]}
