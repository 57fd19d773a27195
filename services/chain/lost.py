"""Tasks that failed for good (out of retries), settled by the gateway's housekeeper.

RQ puts a task it gives up on in its queue's failed registry: a task that kept raising, one whose
worker was lost (its lease lapsed: RQ's started-registry clean-up), one stuck between a worker's
dequeue and its start. The housekeeper hands each task it finds there to `settle`, once per process;
a second call changes nothing, so two gateway replicas may both settle one task.

A job's end never rests on RQ's failure callbacks: RQ runs them under a SIGALRM timeout, which Python
refuses outside the main thread (the housekeeper is a thread: every callback failed there, and a job
waited for its lost chunk forever), and skips them on some of those paths.

    a chunk task   -> the chunk is lost (`lose_chunk`): its images fail with the reason, it counts as
                      done at this and later stages, and the job goes on without them; if it was the
                      job's last chunk, a finish task (services.ctx.tasks.finish_task) ends the job.
                      A chunk counted done before its task failed (finishing the job failed) is not
                      lost: the finish task tries again.
    a finish task  -> the job fails with the reason.

No model code is imported here: this runs in the gateway.
"""

from __future__ import annotations

import logging

from rq.job import Job

from latent_verbalizer.services.categorizer.models import unlabeled
from latent_verbalizer.services.chain.context import Context
from latent_verbalizer.shared.artifacts import ArtifactStore
from latent_verbalizer.shared.jobs import ACTIVE, JobRecord
from latent_verbalizer.shared.queue import FINISH_TASK, enqueue_finish, fail_job
from latent_verbalizer.shared.schemas import ImageResult

log = logging.getLogger(__name__)


def settle(ctx: Context, task: Job) -> None:
    """End what a task out of retries leaves undone (see the module's docstring)."""
    tries = ctx.settings.task_retries + 1
    cause = _cause(task)
    if task.func_name == FINISH_TASK:
        (job_id,) = task.args
        fail_job(ctx.jobs, ctx.store, ctx.settings, job_id,
                 f"writing the job's outputs failed after {tries} tries: {cause}")
        return
    job_id, chunk = task.args
    stage = task.id.split("_")[1]  # shared.queue.task_id
    job = ctx.jobs.get(job_id)
    if job is None or job.status not in ACTIVE:
        return
    if not ctx.jobs.chunk_is_done(job_id, stage, chunk):
        reason = f"{stage} of chunk {chunk} failed after {tries} tries: {cause}"
        try:
            lose_chunk(ctx, job, stage, chunk, reason)
        except (OSError, ValueError) as e:  # its files are unreadable: the job cannot go on without the chunk
            fail_job(ctx.jobs, ctx.store, ctx.settings, job_id, f"{reason}; its images could not be listed: {e}")
    elif stage == job.final_stage and ctx.jobs.chunks_done(job_id, stage) == job.chunks:
        enqueue_finish(ctx.client, ctx.settings, stage, job_id)


def lose_chunk(ctx: Context, job: JobRecord, stage: str, chunk: int, reason: str) -> None:
    """Write the chunk's final result lines with `reason`, count it as done at this and later stages, and
    when that was the job's last chunk, queue the job's finish."""
    lines, newly_failed = _lost_lines(ctx.store, job, stage, chunk, reason)
    final_kind = "labels" if job.options.categorize else "captions"
    ctx.store.write_lines(job.id, final_kind, chunk, (r.model_dump_json(exclude_none=True) for r in lines))
    if job.options.grounding and stage != "categorize":  # what the decoder task writes for a chunk of no image
        ctx.store.write_no_tensors(job.id, "grounding", chunk, {"ids": [], "prior": {}})
    log.error("chunk lost", extra={"job": job.id, "stage": stage, "chunk": chunk, "images": len(lines),
                                   "reason": reason})
    for s in job.stages[job.stages.index(stage):]:
        done = ctx.jobs.chunk_done(job.id, s, chunk, len(lines), 0.0, newly_failed if s == stage else 0)
    if done == job.chunks:
        enqueue_finish(ctx.client, ctx.settings, job.final_stage, job.id)


def _lost_lines(store: ArtifactStore, job: JobRecord, stage: str, chunk: int, reason: str) -> tuple[list, int]:
    """A lost chunk's result lines, from what the stage before it left, and how many of its images fail
    now (an image an earlier stage failed keeps its first error, and was counted then)."""
    if stage == "categorize":  # the captions are kept, unlabelled
        results = [ImageResult.model_validate_json(line) for line in store.read_lines(job.id, "captions", chunk)]
        return unlabeled(results, reason), 0
    if stage == "decode":  # the encoder's per-image errors are in the latents' info
        items = store.read_latents_info(job.id, chunk)["items"]
        newly_failed = sum(1 for i in items if not i["error"])
    else:
        items = [{"id": i.id, "source": i.source, "meta": i.meta, "error": i.error}
                 for i in store.read_inputs(job.id, chunk)]
        newly_failed = len(items)
    lines = [ImageResult(id=i["id"], source=i["source"], meta=i["meta"], error=i["error"] or reason) for i in items]
    return lines, newly_failed


def _cause(task: Job) -> str:
    """Why RQ gave up on the task, in a line."""
    result = task.latest_result()
    text = (result.exc_string if result is not None else None) or ""
    if "AbandonedJobError" in text:
        return "the worker was lost (killed or stalled) while it held the task"
    if "stuck in intermediate queue" in text:
        return "the worker was lost as it took the task"
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "unknown error"
