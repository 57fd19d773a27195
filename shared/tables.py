"""Flat tables of a run's captions, the shape a spreadsheet, pandas or SQL reads. No torch here: the
gateway and the comparison read results files only.

captions.csv: one row per image x layer (and per region x layer); `Run.to_pandas()` and `compare` read the
same rows (`caption_rows`).

Columns: id, source, region (empty for the whole image), layer, caption, then every scalar field a
caption carries (mean_entropy and the grounding measures: image_score, retrieval_rank, gallery_size, prior,
prior_overlap, last_layer_similarity, and any later ones), in `LayerCaption`'s field order. Per-token lists
(tokens, entropy, ...) stay in results.jsonl.

regions.csv: one row per region caption with the region's box (image px) and patches (`region_rows`); a
region that failed on an image has no captions there, so no rows (its `error` is in the results)."""

from __future__ import annotations

import csv
import io
import json
import os
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from latent_verbalizer.shared.schemas import ImageResult, LayerCaption

KEYS = ["id", "source", "region", "layer", "caption"]


def _scalar_fields() -> list[str]:
    """LayerCaption's fields that hold one value per caption (not layer/caption, not per-token lists)."""
    out = []
    for name, field in LayerCaption.model_fields.items():
        if name in KEYS or "list" in str(field.annotation):
            continue
        out.append(name)
    return out


COLUMNS = KEYS + _scalar_fields()


def caption_rows(results: Iterable[ImageResult | Mapping]) -> Iterator[dict]:
    """Every caption of every result that has captions, as a flat row (COLUMNS; None where a measure is off)."""
    measures = COLUMNS[len(KEYS):]
    for result in results:
        r = result if isinstance(result, ImageResult) else ImageResult.model_validate(result)
        parts = [("", r.layers or [])] + [(region.region.label, region.layers) for region in r.regions or []]
        for region, captions in parts:
            for c in captions:
                yield {"id": r.id, "source": r.source, "region": region, "layer": c.layer, "caption": c.caption,
                       **{name: getattr(c, name) for name in measures}}


def captions_csv(results: Iterable[ImageResult | Mapping]) -> str:
    """captions.csv's text: a header of COLUMNS and one line per caption (empty cells where a measure is off)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(caption_rows(results))
    return buffer.getvalue()


def write_captions_csv(results_jsonl: Path, path: Path) -> Path:
    """captions.csv from a results.jsonl, streamed line by line (a run of any size), whole or not at all."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(results_jsonl) as lines, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(caption_rows(json.loads(line) for line in lines if line.strip()))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


REGION_COLUMNS = ["id", "region", "x0", "y0", "x1", "y1", "patches", "layer", "caption", "mean_entropy",
                  "image_score", "prior", "prior_overlap", "last_layer_similarity"]


def region_rows(result: ImageResult) -> Iterator[list]:
    """regions.csv's rows of one result (REGION_COLUMNS; grounding columns empty when it was off)."""
    for region in result.regions or []:
        for c in region.layers:
            yield [result.id, region.region.label, *region.box, region.patches, c.layer, c.caption, c.mean_entropy,
                   c.image_score, c.prior, c.prior_overlap, c.last_layer_similarity]


def write_region_table(results: Iterable[ImageResult], path: Path) -> Path:
    with path.open("w", newline="") as f:
        table = csv.writer(f)
        table.writerow(REGION_COLUMNS)
        for r in results:
            table.writerows(region_rows(r))
    return path
