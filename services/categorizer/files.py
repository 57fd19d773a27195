"""The categorizer's files. Captions come in the reference layout {"layer_0": [captions], ...} or as
the results.jsonl that `verbalize` writes; labels go out as {"layer_0": [{"caption", "phrases",
"error"?, "mean_entropy"?}], ...}, in image order (images without captions left out)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from services.categorizer.models import CaptionLabels
from shared.schemas import ImageResult

_LAYER_KEY = re.compile(r"layer_(\d+)")

Captions = dict[int, list[str]]
Entropies = dict[int, list[float]]


def load_layered(path: Path) -> dict[int, list]:
    """A file {"layer_N": [...], ...} as {N: [...]}, layers in order."""
    doc = json.loads(Path(path).read_text())
    if not isinstance(doc, dict) or not all(_LAYER_KEY.fullmatch(k) for k in doc):
        raise ValueError(f"{path}: expected an object with keys layer_0, layer_1, ...")
    return dict(sorted((int(_LAYER_KEY.fullmatch(k).group(1)), v) for k, v in doc.items()))


def dump_layered(path: Path, layers: dict[int, list]) -> None:
    Path(path).write_text(json.dumps({f"layer_{layer}": v for layer, v in sorted(layers.items())}))


def read_captions(path: Path) -> tuple[Captions, Entropies | None]:
    """Captions per layer, and each caption's mean entropy when the file has them (results.jsonl)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return _read_results(path)
    return {layer: [str(c) for c in captions] for layer, captions in load_layered(path).items()}, None


def _read_results(path: Path) -> tuple[Captions, Entropies]:
    captions: Captions = {}
    entropies: Entropies = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        result = ImageResult.model_validate_json(line)
        for layer in result.layers or []:  # images that failed have no captions to label
            captions.setdefault(layer.layer, []).append(layer.caption)
            entropies.setdefault(layer.layer, []).append(layer.mean_entropy)
    return dict(sorted(captions.items())), dict(sorted(entropies.items()))


def read_entropies(path: Path) -> Entropies:
    """Mean entropy per caption: results.jsonl, or the reference layout {"layer_0": [floats], ...}."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return _read_results(path)[1]
    return {layer: [float(v) for v in values] for layer, values in load_layered(path).items()}


def write_labels(path: Path, labels: dict[int, list[CaptionLabels]], entropies: Entropies | None = None) -> None:
    out = {}
    for layer, captions in labels.items():
        entries = [c.model_dump(exclude_none=True) for c in captions]
        for entry, value in zip(entries, (entropies or {}).get(layer, []), strict=False):
            entry["mean_entropy"] = value
        out[layer] = entries
    dump_layered(path, out)


def read_labels(path: Path) -> tuple[dict[int, list[CaptionLabels]], Entropies | None]:
    layers = load_layered(path)
    labels = {layer: [CaptionLabels.model_validate(e) for e in entries] for layer, entries in layers.items()}
    entropies = {
        layer: [e["mean_entropy"] for e in entries]
        for layer, entries in layers.items()
        if entries and all("mean_entropy" in e for e in entries)
    }
    return labels, entropies or None
