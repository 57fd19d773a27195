"""The frame every chunk task runs in, whatever its stage:

    1. the job must still be active (a cancelled, failed or expired job's tasks do nothing);
    2. the stage's work reads the chunk's input from the artifact store, calls the stage function and
       writes the chunk's output (atomically, under a fixed name: a rerun replaces it);
    3. the next stage's task for this chunk is queued (once, whatever the reruns);
    4. the chunk is counted at this stage (once); whoever counts the last chunk at the job's final
       stage finishes the job (services.chain.finish writes results.jsonl, summary, figures).

A ValueError from the work is bad input no retry can fix: the job fails at once with its message.
Any other exception propagates to RQ, which retries the task with backoff (shared.queue). A task out of
retries (it kept failing, or its worker was lost each time) loses its chunk (services.chain.lost): the
job goes on to its end without the chunk's images, and if that chunk was its last, `finish_task` ends it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from latent_verbalizer.services.chain.context import Context
from latent_verbalizer.services.chain.finish import write_outputs
from latent_verbalizer.services.families import Family
from latent_verbalizer.shared.artifacts import ArtifactStore
from latent_verbalizer.shared.jobs import ACTIVE, JobRecord, JobStatus, JobStore
from latent_verbalizer.shared.queue import connect, enqueue, fail_job
from latent_verbalizer.shared.settings import get_settings

log = logging.getLogger(__name__)


@lru_cache
def context() -> Context:
    """The worker process's connections, made on first use."""
    settings = get_settings()
    client = connect(settings, timeout_s=30)
    jobs = JobStore(client, settings.job_ttl_s, settings.redis_prefix)
    return Context(settings, client, jobs, ArtifactStore(settings.artifact_dir))


_model: Family | None = None


def use_model(lm: Family) -> None:
    """Keep the worker process's model: loaded once at start-up, used by every task it runs."""
    global _model
    _model = lm


def loaded_model(role: str) -> Family:
    if _model is None:
        raise RuntimeError(f"no model loaded in this process: start it with `latent-verbalizer worker {role}`")
    return _model


@dataclass
class ChunkOutcome:
    images: int  # images the stage handled, per-image errors included
    failed_images: int = 0  # images found unusable at this stage


def run_chunk(stage: str, job_id: str, chunk: int, work: Callable[[Context, JobRecord], ChunkOutcome]) -> None:
    ctx = context()
    job = ctx.jobs.begin(job_id)
    if job is None:
        log.info("chunk skipped: job not active", extra={"job": job_id, "stage": stage, "chunk": chunk})
        return
    t0 = time.perf_counter()
    try:
        outcome = work(ctx, job)
    except ValueError as e:
        fail_job(ctx.jobs, ctx.store, ctx.settings, job_id, f"{stage} of chunk {chunk}: {e}")
        return
    seconds = time.perf_counter() - t0
    if (following := job.next_stage(stage)) is not None:
        enqueue(ctx.client, ctx.settings, following, job_id, [chunk])
    done = ctx.jobs.chunk_done(job_id, stage, chunk, outcome.images, seconds, outcome.failed_images)
    log.info("chunk done", extra={"job": job_id, "stage": stage, "chunk": chunk, "images": outcome.images,
                                  "seconds": round(seconds, 3), "chunks_done": done, "chunks": job.chunks})
    if (current := ctx.jobs.get(job_id)) is not None and current.status == JobStatus.cancelled:
        if not ctx.settings.keep_artifacts:  # cancelled while this chunk ran: drop what it wrote
            ctx.store.delete_intermediates(job_id)
    elif stage == job.final_stage and done == job.chunks:
        finish_job(ctx, job)


def finish_job(ctx: Context, job: JobRecord) -> None:
    """The last chunk is done: write the job's outputs, then end it (succeeded, with any warnings)."""
    outputs = write_outputs(ctx.store, job)
    if outputs.failure is not None:
        fail_job(ctx.jobs, ctx.store, ctx.settings, job.id, outputs.failure)
    elif ctx.jobs.finish(job.id, JobStatus.succeeded, warnings=outputs.warnings):
        if outputs.warnings:
            log.warning("job succeeded with warnings", extra={"job": job.id, "warnings": outputs.warnings})
        if not ctx.settings.keep_artifacts:
            ctx.store.delete_intermediates(job.id)


def finish_task(job_id: str) -> None:
    """RQ task: end a job whose last chunk was lost (services.chain.lost)."""
    ctx = context()
    if (job := ctx.jobs.get(job_id)) is not None and job.status in ACTIVE:
        finish_job(ctx, job)
