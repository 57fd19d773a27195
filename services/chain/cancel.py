"""Cancelling a job keeps what it finished: its queued tasks are dropped, and results.jsonl holds the
images captioned before the cancel (a chunk's labelled lines where it reached labelling, its captions
where it reached only decoding), served as partial results; the job's warnings say how many. A task
still running when the cancel comes finishes, then drops its intermediates (services.chain.tasks)."""

from __future__ import annotations

import logging

from latent_verbalizer.services.chain.context import Context
from latent_verbalizer.shared.jobs import JobRecord, JobStatus
from latent_verbalizer.shared.queue import cancel_queued

log = logging.getLogger(__name__)


def cancel(ctx: Context, job: JobRecord) -> bool:
    """End an active job as cancelled, keeping its finished captions. -> False when it had already ended."""
    if not ctx.jobs.finish(job.id, JobStatus.cancelled):
        return False
    cancel_queued(ctx.client, job.id, job.chunks)
    labelled = ctx.jobs.done_chunks(job.id, "categorize") if job.options.categorize else set()
    captioned = ctx.jobs.done_chunks(job.id, "decode")
    parts = [("labels" if chunk in labelled else "captions", chunk) for chunk in sorted(captioned)]
    results = ctx.store.write_results(job.id, parts, missing_ok=True)  # a running task may drop its files
    with results.open("rb") as f:
        images = sum(1 for _ in f)
    ctx.jobs.set_warnings(job.id, [f"cancelled after {images} of {job.total} images: the results hold those"
                                   " (partial)"])
    if not ctx.settings.keep_artifacts:
        ctx.store.delete_intermediates(job.id)
    log.info("job cancelled", extra={"job": job.id, "chunks_captioned": len(parts), "chunks": job.chunks})
    return True
