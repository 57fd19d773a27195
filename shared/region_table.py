"""regions.csv, the table of region captions a run (CLI) or job (service) writes beside results.jsonl:
one row per region caption (box in image px; grounding columns empty when grounding was off). A region
that failed on an image has no captions there, so no rows (its `error` is in the results)."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator
from pathlib import Path

from latent_verbalizer.shared.schemas import ImageResult

REGION_COLUMNS = ["id", "region", "x0", "y0", "x1", "y1", "patches", "layer", "caption", "mean_entropy",
                  "image_score", "prior", "prior_overlap", "last_layer_similarity"]


def region_rows(result: ImageResult) -> Iterator[list]:
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
