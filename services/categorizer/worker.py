"""RQ task of the categorizer stage: a chunk's captions -> the same result lines with every caption's
labelled phrases. A labeler is built once per backend per process and kept."""

from __future__ import annotations

from services.categorizer.models import CaptionLabels, Phrase
from services.categorizer.stage import Backend, Labeler, categorize, make_labeler
from services.tasks import ChunkOutcome, Context, run_chunk
from shared.jobs import JobRecord
from shared.schemas import ImageResult, LayerCaption

_labelers: dict[str, Labeler] = {}


class LabeledCaption(LayerCaption):
    phrases: list[Phrase] = []
    label_error: str | None = None

    def labels(self) -> CaptionLabels:
        return CaptionLabels(caption=self.caption, phrases=self.phrases, error=self.label_error)


class LabeledResult(ImageResult):
    """One line of a categorized job's results.jsonl."""

    layers: list[LabeledCaption] | None = None


def labeler(backend: Backend) -> Labeler:
    if backend not in _labelers:
        _labelers[backend] = make_labeler(backend)
    return _labelers[backend]


def categorize_chunk(job_id: str, chunk: int) -> None:
    run_chunk("categorize", job_id, chunk, lambda ctx, job: _categorize(ctx, job, chunk))


def _categorize(ctx: Context, job: JobRecord, chunk: int) -> ChunkOutcome:
    results = [ImageResult.model_validate_json(line) for line in ctx.store.read_lines(job.id, "captions", chunk)]
    captions = [c.caption for r in results for c in r.layers or []]
    labels = iter(categorize(captions, labeler(job.options.backend or ctx.settings.categorizer_backend)))
    labeled = [
        LabeledResult(
            **r.model_dump(exclude={"layers"}),
            layers=None
            if r.layers is None
            else [
                LabeledCaption(**c.model_dump(), phrases=(cl := next(labels)).phrases, label_error=cl.error)
                for c in r.layers
            ],
        )
        for r in results
    ]
    ctx.store.write_lines(job.id, "labels", chunk, (r.model_dump_json(exclude_none=True) for r in labeled))
    return ChunkOutcome(images=len(results))
