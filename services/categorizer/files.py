"""The categorizer's files. Captions come in the reference layout {"layer_0": [captions], ...} or as
the results.jsonl that `verbalize` writes; labels go out as {"layer_0": [{"id"?, "caption", "phrases",
"error"?, "mean_entropy"?}], ...}, in image order (images without captions left out). `id` (the
image's id) and `mean_entropy` are there when the input had them (results.jsonl); with captions.json
the i-th entry of every layer is the i-th image. A file that cannot be used raises BadFile, naming
the file and what is wrong with it. From a results.jsonl with likelihood grounding, each caption's words'
PMIs come along (`word_pmi`), for the labels' phrases (models.grounded_layers)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from latent_verbalizer.services.categorizer.models import CaptionLabels, LabeledCaption, LabeledResult
from latent_verbalizer.shared.artifacts import write_atomic
from latent_verbalizer.shared.schemas import ImageResult

_LAYER_KEY = re.compile(r"layer_(\d+)")

_NAMES = {str: "strings (captions)", dict: "objects (labelled captions)", (int, float): "numbers"}

Captions = dict[int, list[str]]
Entropies = dict[int, list[float]]
WordPMI = dict[int, list[list[float] | None]]


class BadFile(ValueError):
    """An input file that cannot be used; the message names it and says why."""


@dataclass
class CaptionFile:
    """Captions per layer; from results.jsonl also each caption's image id, mean entropy and words' PMIs."""

    captions: Captions
    ids: dict[int, list[str]] | None = None
    entropies: Entropies | None = None
    word_pmi: WordPMI | None = None


def load_layered(path: Path, item: type = object) -> dict[int, list]:
    """A file {"layer_N": [item, ...], ...} as {N: [...]}, layers in order."""
    doc = _read_json(path)
    if not isinstance(doc, dict) or not doc or not all(_LAYER_KEY.fullmatch(k) for k in doc):
        raise BadFile(f"{path}: expected a JSON object with keys layer_0, layer_1, ...")
    for key, values in doc.items():
        if not isinstance(values, list) or not all(isinstance(v, item) for v in values):
            raise BadFile(f"{path}: {key} must be a list of {_NAMES.get(item) or item.__name__}")
    return dict(sorted((int(_LAYER_KEY.fullmatch(k).group(1)), v) for k, v in doc.items()))


def dump_layered(path: Path, layers: dict[int, list]) -> None:
    """Write {"layer_N": [...]} whole or not at all (an earlier file stays until the new one is complete)."""
    write_atomic(Path(path), json.dumps({f"layer_{layer}": v for layer, v in sorted(layers.items())}).encode())


def read_captions(path: Path) -> CaptionFile:
    """The captions per layer (with ids and mean entropies when the file is a results.jsonl)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return _read_results(path)
    return CaptionFile(load_layered(path, str))


def read_result_lines(path: Path) -> list[ImageResult]:
    """The lines of a results.jsonl from `verbalize` (BadFile for another file, or one without captions)."""
    results = []
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            results.append(ImageResult.model_validate_json(line))
        except ValidationError as e:
            raise BadFile(f"{path} line {n}: not a result line of `verbalize` ({_first_error(e)})") from None
    if not any(r.layers for r in results):
        raise BadFile(f"{path}: no captions (no line with layers)")
    return results


def _read_results(path: Path) -> CaptionFile:
    found = CaptionFile({}, {}, {}, {})
    for result in read_result_lines(path):
        for layer in result.layers or []:  # images that failed have no captions to label
            found.captions.setdefault(layer.layer, []).append(layer.caption)
            found.ids.setdefault(layer.layer, []).append(result.id)
            found.entropies.setdefault(layer.layer, []).append(layer.mean_entropy)
            found.word_pmi.setdefault(layer.layer, []).append(layer.word_pmi)
    return CaptionFile(*(dict(sorted(d.items())) for d in (found.captions, found.ids, found.entropies, found.word_pmi)))


def read_entropies(path: Path) -> Entropies:
    """Mean entropy per caption: results.jsonl, or the reference layout {"layer_0": [floats], ...}."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return _read_results(path).entropies
    return {layer: [float(v) for v in values] for layer, values in load_layered(path, (int, float)).items()}


def read_phrases(path: Path) -> list[str]:
    phrases = _read_json(path)
    if not isinstance(phrases, list) or not all(isinstance(p, str) for p in phrases):
        raise BadFile(f"{path}: expected a JSON list of phrases (strings)")
    return phrases


def write_labels(
    path: Path, labels: dict[int, list[CaptionLabels]], ids: dict[int, list[str]] | None = None,
    entropies: Entropies | None = None,
) -> None:
    out = {}
    for layer, captions in labels.items():
        entries = [c.model_dump(exclude_none=True) for c in captions]
        for entry, image_id in zip(entries, (ids or {}).get(layer, []), strict=False):
            entry["id"] = image_id
        for entry, value in zip(entries, (entropies or {}).get(layer, []), strict=False):
            entry["mean_entropy"] = value
        out[layer] = entries
    dump_layered(path, out)


def write_labeled_results(path: Path, results: list[LabeledResult]) -> None:
    """labels.json from labelled results: per layer, each captioned image's entry (id, caption, phrases or
    error, mean_entropy) with, when it has regions, theirs at that layer: "regions": {label: entry}."""
    def entry(c: LabeledCaption) -> dict:
        return {**c.labels().model_dump(exclude_none=True), "mean_entropy": c.mean_entropy}

    out: dict[int, list[dict]] = {}
    for r in results:
        for c in r.layers or []:
            regions = {g.region.label: entry(gc) for g in r.regions or [] for gc in g.layers if gc.layer == c.layer}
            out.setdefault(c.layer, []).append({"id": r.id, **entry(c), **({"regions": regions} if regions else {})})
    dump_layered(path, out)


def read_labels(path: Path) -> tuple[dict[int, list[CaptionLabels]], Entropies | None]:
    try:
        layers = load_layered(path, dict)
    except BadFile:
        if _is_captions(path):
            raise BadFile(f"{path} holds captions, not labels: label them first with `latent-verbalizer categorize"
                          f" {path} --out LABELS.json`, then analyze LABELS.json") from None
        raise
    try:
        labels = {layer: [CaptionLabels.model_validate(e) for e in entries] for layer, entries in layers.items()}
    except ValidationError as e:
        raise BadFile(f"{path}: not labels from `categorize` ({_first_error(e)})") from None
    return labels, _entropies(layers)


def read_region_labels(path: Path) -> dict[str, tuple[dict[int, list[CaptionLabels]], Entropies | None]]:
    """The regions' labels in a labels.json (`regions` of its entries): region label -> (labels per layer,
    mean entropies per layer or None), regions in the order they first appear."""
    found: dict[str, dict[int, list[dict]]] = {}
    for layer, entries in load_layered(path, dict).items():
        for entry in entries:
            for name, region_entry in (entry.get("regions") or {}).items():
                found.setdefault(name, {}).setdefault(layer, []).append(region_entry)
    try:
        return {name: ({layer: [CaptionLabels.model_validate(e) for e in entries] for layer, entries in layers.items()},
                       _entropies(layers)) for name, layers in found.items()}
    except ValidationError as e:
        raise BadFile(f"{path}: a region's labels are not labels from `categorize` ({_first_error(e)})") from None


def _entropies(layers: dict[int, list[dict]]) -> Entropies | None:
    entropies = {
        layer: [e["mean_entropy"] for e in entries]
        for layer, entries in layers.items()
        if entries and all("mean_entropy" in e for e in entries)
    }
    return entropies or None


def _is_captions(path: Path) -> bool:
    try:
        load_layered(path, str)
        return True
    except BadFile:
        return False


def _read_text(path: Path) -> str:
    try:
        return Path(path).read_text()
    except OSError as e:
        raise BadFile(f"{path}: cannot be read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise BadFile(f"{path}: not a text file (UTF-8)") from None


def _read_json(path: Path) -> object:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise BadFile(f"{path}: not valid JSON ({e})") from None


def _first_error(e: ValidationError) -> str:
    error = e.errors()[0]
    where = ".".join(str(part) for part in error["loc"])
    return f"{where}: {error['msg']}" if where else error["msg"]
