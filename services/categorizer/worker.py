"""RQ task of the categorizer stage: a chunk's captions -> the same result lines with every caption's
labelled phrases (the regions' captions too). A labeler is built once per backend per process and kept.

Labelling never costs a job its captions: a caption whose labelling failed keeps its caption and
entropies with `label_error`, and when the labeler fails as a whole (e.g. the LLM server unreachable
after its retries) every caption of the chunk gets that reason and the job goes on (services.chain.finish
then ends it with a warning)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from latent_verbalizer.services.categorizer.models import CaptionLabels, captions_in_order, with_labels
from latent_verbalizer.services.categorizer.stage import Backend, Labeler, categorize, make_labeler
from latent_verbalizer.services.chain.tasks import ChunkOutcome, Context, run_chunk
from latent_verbalizer.shared.jobs import JobRecord
from latent_verbalizer.shared.schemas import ImageResult

log = logging.getLogger(__name__)

_labelers: dict[str, Labeler] = {}


def labeler(backend: Backend) -> Labeler:
    if backend not in _labelers:
        _labelers[backend] = make_labeler(backend)
    return _labelers[backend]


def categorize_chunk(job_id: str, chunk: int) -> None:
    run_chunk("categorize", job_id, chunk, lambda ctx, job: _categorize(ctx, job, chunk))


def _categorize(ctx: Context, job: JobRecord, chunk: int) -> ChunkOutcome:
    results = [ImageResult.model_validate_json(line) for line in ctx.store.read_lines(job.id, "captions", chunk)]
    captions = captions_in_order(results)  # the images' and their regions' captions
    backend = job.options.backend or ctx.settings.categorizer_backend
    labels = labels_or_reasons(captions, backend, extra={"job": job.id, "chunk": chunk})
    lines = (r.model_dump_json(exclude_none=True) for r in with_labels(results, labels))
    ctx.store.write_lines(job.id, "labels", chunk, lines)
    return ChunkOutcome(images=len(results))


def labels_or_reasons(captions: list[str], backend: Backend, make: Callable[[Backend], Labeler] = labeler,
                      extra: dict | None = None) -> list[CaptionLabels]:
    """Every caption's labels, or, when the labeler (made by `make`) fails as a whole, every caption with
    the reason."""
    try:
        return categorize(captions, make(backend))
    except Exception as e:  # whatever broke, the captions are kept: labelling is the optional last step
        reason = f"labelling failed ({backend} backend): {type(e).__name__}: {e}"
        log.exception("labelling failed; captions kept", extra={**(extra or {}), "backend": backend})
        return [CaptionLabels(caption=c, error=reason) for c in captions]
