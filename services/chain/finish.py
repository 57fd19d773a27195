"""A job's outputs, written by whichever task finished its last chunk (or the job's finish task):
results.jsonl (every chunk's lines in chunk order), the summary and figures (the categorizer's analysis
and report when the job was categorized; per-layer entropy, as summary.json and entropy.png, when it was
not), and regions.csv when it had regions. Safe to run twice: every file is replaced whole.

Images that failed (unreadable, or their chunk lost) are in results.jsonl with their `error`, and the
job's warnings name them; so are regions that failed on an image (covering none of its patches).
Labelling never loses captions: captions whose labelling failed are in results.jsonl with their
`label_error`, and the job succeeds with a warning saying how many; should the labels' report itself
fail, the entropy summary stands in for it, with a warning.

The report modules are imported inside the functions: matplotlib and the analysis load only in the
process that finishes a job."""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from latent_verbalizer.shared.artifacts import ArtifactStore
from latent_verbalizer.shared.grounding import grounding_outputs
from latent_verbalizer.shared.jobs import JobRecord
from latent_verbalizer.shared.schemas import ImageResult
from latent_verbalizer.shared.tables import write_captions_csv, write_region_table

log = logging.getLogger(__name__)

NAMED_FAILURES = 20  # failed images a job's warning names; the results name every one


@dataclass
class Outputs:
    failure: str | None = None  # why the job fails: no image could be captioned (only results.jsonl is written)
    warnings: list[str] = field(default_factory=list)  # what went wrong in a job that still succeeds


def write_outputs(store: ArtifactStore, job: JobRecord) -> Outputs:
    """Write the job's outputs."""
    kind = "labels" if job.options.categorize else "captions"
    results_path = store.write_results(job.id, [(kind, chunk) for chunk in range(job.chunks)])
    if job.options.grounding:  # retrieval ranks over the whole job, and prior.json
        from latent_verbalizer.services.decoder.grounding import rank_job

        rank_job(store, job, results_path)
    results = [json.loads(line) for line in results_path.read_text().splitlines()]
    captioned = [r for r in results if r.get("layers")]
    if not captioned:
        first = next((r["error"] for r in results if r.get("error")), "no images")
        return Outputs(failure=f"no image could be captioned ({len(results)} tried): {first}")
    staging = store.staging(job.id)
    extra = {"job": job.id, "images": len(results), "failed_images": len(results) - len(captioned)}
    if (model := store.output(job.id, "model.json")).is_file():  # the decoder's family, model, prompt, extras
        extra["model"] = json.loads(model.read_text())
    region_files = []
    if job.options.regions:  # each result line has these regions' captions (`regions`), regions.csv a row each
        extra["regions"] = [r.model_dump() for r in job.options.regions]
        region_files = [write_region_table((ImageResult.model_validate(r) for r in captioned), staging / "regions.csv")]
    grounding, grounding_files = grounding_outputs(captioned, staging)  # grounding.csv/png; none when it was off
    if grounding is not None:
        extra["grounding"] = grounding
    outputs = Outputs()
    if failed := [r for r in results if r.get("error")]:
        outputs.warnings.append(failed_images_warning(failed, len(results)))
    if failed_regions := [(r["id"], g) for r in captioned for g in r.get("regions") or [] if g.get("error")]:
        outputs.warnings.append(failed_regions_warning(failed_regions))
    if job.options.categorize:
        files = _categorized_report(captioned, staging, extra, outputs.warnings)
    else:
        files = _entropy_summary(captioned, staging, extra)
    tables = [write_captions_csv(results_path, staging / "captions.csv"), *region_files]
    store.publish(job.id, files + grounding_files + tables)
    shutil.rmtree(staging, ignore_errors=True)
    return outputs


def failed_images_warning(failed: Sequence[dict], total: int, named: int = NAMED_FAILURES) -> str:
    """Which images failed and why: the first `named` by id, with a count of the rest."""
    listed = "; ".join(f"{r['id']} ({r['error']})" for r in failed[:named])
    rest = f"; and {len(failed) - named} more" if len(failed) > named else ""
    return (f"{len(failed)} of {total} images failed: {listed}{rest} (each one's line in the results has its"
            " `error`)")


def failed_regions_warning(failed: Sequence[tuple[str, dict]], named: int = NAMED_FAILURES) -> str:
    """Which regions failed on which images (their images' captions stand): the first `named`."""
    listed = "; ".join(f"{g['region']['label']} on {image_id} ({g['error']})" for image_id, g in failed[:named])
    rest = f"; and {len(failed) - named} more" if len(failed) > named else ""
    return (f"{len(failed)} region captions failed: {listed}{rest} (the images' own captions stand; each failed"
            " region's entry in the results has its `error`)")


def _categorized_report(results: Sequence[dict], out_dir: Path, extra: dict, warnings: list[str]) -> list[Path]:
    """The labels' report; what went wrong with the labels is added to `warnings`."""
    from latent_verbalizer.services.categorizer.analysis import analyze
    from latent_verbalizer.services.categorizer.models import LabeledResult
    from latent_verbalizer.services.categorizer.report import write_report

    labels: dict[int, list] = {}
    entropies: dict[int, list[float]] = {}
    errors: list[str] = []
    for raw in results:
        for layer in LabeledResult.model_validate(raw).layers:
            labels.setdefault(layer.layer, []).append(layer.labels())
            entropies.setdefault(layer.layer, []).append(layer.mean_entropy)
            if layer.label_error is not None:
                errors.append(layer.label_error)
    if errors:
        total = sum(len(v) for v in labels.values())
        warnings.append(f"labelling failed for {len(errors)} of {total} captions (first reason: {errors[0]}); every"
                        " caption is in the results, a failed one with its label_error")
    try:
        return write_report(analyze(labels, entropies), out_dir, {**extra, "warnings": warnings})
    except Exception as e:  # a report bug must not cost the job its captions
        log.exception("labels report failed; entropy summary written instead", extra={"job": extra["job"]})
        warnings.append(f"the labels' summary and figures could not be made ({type(e).__name__}: {e}); summary.json"
                        " and entropy.png hold the per-layer entropy instead")
        return _entropy_summary(results, out_dir, {**extra, "warnings": warnings})


def _entropy_summary(results: Sequence[dict], out_dir: Path, extra: dict) -> list[Path]:
    """summary.json and entropy.png of an uncategorized job: per layer, its captions and their mean entropy."""
    from latent_verbalizer.services.categorizer.report import plot_entropy

    entropies: dict[int, list[float]] = {}
    for raw in results:
        for layer in ImageResult.model_validate(raw).layers:
            entropies.setdefault(layer.layer, []).append(layer.mean_entropy)
    layers = [{"layer": layer, "captions": len(values), "mean_entropy": _mean(values)}
              for layer, values in sorted(entropies.items())]
    path = out_dir / "summary.json"
    path.write_text(json.dumps({"layers": layers, **extra}, indent=1))
    figure = plot_entropy([r["layer"] for r in layers], [r["mean_entropy"] for r in layers], out_dir / "entropy.png")
    return [path, figure]


def _mean(values: Sequence[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None
