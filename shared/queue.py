"""Redis and RQ wiring for the gateway and the workers.

One RQ queue per stage, named with the install's prefix (LV_REDIS_PREFIX, default `lv:`): queues
lv:encode, lv:decode, lv:categorize, which RQ keeps as the Redis lists rq:queue:lv:encode, ... (KEDA
scales the workers on their length). A task is one chunk at one stage, with a deterministic id
(<job>_<stage>_<chunk>), so enqueueing it twice is a no-op. Failed tasks are retried with backoff; a
task out of retries lands in RQ's failed registry, where the gateway's housekeeper settles it
(services.chain.lost: the chunk's images fail with the reason, and the job goes on without them). A job
whose last chunk was lost is ended by a task of its own (<job>_finish) on its final stage's queue: the
housekeeper is no place to write a job's outputs.

Workers are `LeaseWorker`s: RQ's SimpleWorker (no fork: the model is loaded once per process and
kept) plus a lease. While a task runs, a thread renews the task's entry in RQ's started registry every
lease_s/3. If the worker is killed the entry lapses after lease_s; RQ's registry clean-up (run by the
gateway's housekeeper every second, and by every worker when it starts) then treats the task as
abandoned and retries it, so another worker (or the restarted one) redoes that chunk (out of retries,
the chunk is lost, as above). A LeaseWorker
also keeps its heartbeat (shared.heartbeat) busy while it runs a task and ready otherwise.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

import redis
from rq import Queue, Retry, SimpleWorker
from rq.job import Job
from rq.worker import WorkerStatus

from latent_verbalizer.shared.artifacts import ArtifactStore
from latent_verbalizer.shared.heartbeat import Heartbeat
from latent_verbalizer.shared.jobs import STAGES, JobStatus, JobStore
from latent_verbalizer.shared.keys import Keys
from latent_verbalizer.shared.settings import Settings, get_settings

log = logging.getLogger(__name__)

ROLES = {"encoder": "encode", "decoder": "decode", "categorizer": "categorize"}  # worker role -> its stage
TASKS = {
    "encode": "latent_verbalizer.services.encoder.worker.encode_chunk",
    "decode": "latent_verbalizer.services.decoder.worker.decode_chunk",
    "categorize": "latent_verbalizer.services.categorizer.worker.categorize_chunk",
}
FINISH_TASK = "latent_verbalizer.services.chain.tasks.finish_task"  # a job's end, when its last chunk was lost
LOCAL_REDIS_URL = "redis://127.0.0.1:6379/0"
# A worker's registration expires this long after its last heartbeat; an idle worker beats every
# WORKER_TTL_S - 15 s, a busy one every lease_s / 3.
WORKER_TTL_S = 60
# How often one of a queue's workers runs RQ's maintenance. Among its steps: a task whose worker died
# between taking it and starting it is failed (or retried) once seen twice, a minute apart (RQ's default,
# 10 minutes, would keep its job waiting up to 20).
MAINTENANCE_S = 60
RETRY_BACKOFF_S = 2  # the first retry waits this long, each later one 4x longer (2, 8, 32, ... s)


def redis_url(settings: Settings) -> str:
    return settings.redis_url or LOCAL_REDIS_URL


def connect(settings: Settings | None = None, timeout_s: float | None = None) -> redis.Redis:
    """A Redis client (bytes responses, as RQ needs). `timeout_s` bounds every call: the gateway sets
    it so a stuck Redis cannot hang a request; workers leave it None for RQ's blocking pops."""
    settings = settings or get_settings()
    return redis.Redis.from_url(redis_url(settings), socket_connect_timeout=5, socket_timeout=timeout_s,
                                health_check_interval=30)


def task_id(job_id: str, stage: str, chunk: int) -> str:
    return f"{job_id}_{stage}_{chunk}"


def finish_task_id(job_id: str) -> str:
    return f"{job_id}_finish"


def queue(client: redis.Redis, prefix: str, stage: str) -> Queue:
    """The RQ queue of a stage in the install with this key prefix."""
    return Queue(Keys(prefix).queue(stage), connection=client)


def enqueue(client: redis.Redis, settings: Settings, stage: str, job_id: str, chunks: Iterable[int]) -> None:
    """Queue the stage's task for each chunk, skipping tasks that already exist (a retried task
    enqueues its successor again)."""
    ids = {chunk: task_id(job_id, stage, chunk) for chunk in chunks}
    with client.pipeline(transaction=False) as pipe:
        for tid in ids.values():
            pipe.exists(Job.key_for(tid))
        exists = pipe.execute()
    stage_queue = queue(client, settings.redis_prefix, stage)
    stage_queue.enqueue_many([
        Queue.prepare_data(TASKS[stage], args=(job_id, chunk), job_id=tid,
                           description=f"{stage} chunk {chunk} of job {job_id}", **_task_options(settings))
        for (chunk, tid), exist in zip(ids.items(), exists) if not exist
    ])


def enqueue_finish(client: redis.Redis, settings: Settings, stage: str, job_id: str) -> None:
    """Queue the task that writes a job's outputs on its final stage's queue (once: a second call is a no-op)."""
    tid = finish_task_id(job_id)
    if not client.exists(Job.key_for(tid)):
        queue(client, settings.redis_prefix, stage).enqueue_call(
            FINISH_TASK, args=(job_id,), job_id=tid, description=f"finish job {job_id}", **_task_options(settings))


def _task_options(settings: Settings) -> dict:
    """Retries with backoff (RQ takes the intervals in order: one per retry), and how long RQ keeps a task."""
    retry = None
    if settings.task_retries:
        retry = Retry(max=settings.task_retries,
                      interval=[RETRY_BACKOFF_S * 4**i for i in range(settings.task_retries)])
    return dict(timeout=settings.task_timeout_s, retry=retry, result_ttl=settings.job_ttl_s,
                failure_ttl=settings.job_ttl_s)


def cancel_queued(client: redis.Redis, job_id: str, chunks: int) -> None:
    """Take a job's waiting tasks off the queues. A running task finishes, then finds the job cancelled
    and drops what it wrote (services.chain.tasks)."""
    ids = [task_id(job_id, stage, chunk) for stage in STAGES for chunk in range(chunks)] + [finish_task_id(job_id)]
    for task in Job.fetch_many(ids, connection=client):
        if task is not None and task.get_status(refresh=False) in ("queued", "scheduled", "deferred"):
            task.cancel()


def fail_job(jobs: JobStore, store: ArtifactStore, settings: Settings, job_id: str, reason: str) -> None:
    """End an active job as failed with `reason` and drop its intermediates (unless kept)."""
    if jobs.finish(job_id, JobStatus.failed, reason):
        log.error("job failed", extra={"job": job_id, "reason": reason})
        if not settings.keep_artifacts:
            store.delete_intermediates(job_id)


def queue_depths(client: redis.Redis, prefix: str) -> dict[str, dict[str, int]]:
    """Per stage: tasks waiting, running, and scheduled (waiting out a retry backoff)."""
    queues = [queue(client, prefix, stage) for stage in STAGES]
    with client.pipeline(transaction=False) as pipe:
        for q in queues:
            pipe.llen(q.key)
            pipe.zcard(q.started_job_registry.key)
            pipe.zcard(q.scheduled_job_registry.key)
        counts = pipe.execute()
    return {stage: dict(zip(("waiting", "running", "scheduled"), counts[3 * i : 3 * i + 3]))
            for i, stage in enumerate(STAGES)}


class LeaseWorker(SimpleWorker):
    """RQ's SimpleWorker with a lease: runs tasks in this process and renews the running task's
    registry entry every lease_s / 3, so the entry lapses lease_s after the process dies. Its heartbeat
    says busy while a task runs, ready otherwise."""

    def __init__(self, *args, lease_s: int, presence: Heartbeat, **kwargs) -> None:
        super().__init__(*args, worker_ttl=WORKER_TTL_S, maintenance_interval=MAINTENANCE_S, **kwargs)
        self.lease_s = lease_s
        self.presence = presence  # our heartbeat (RQ's Worker has a `heartbeat` method of its own)

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return self.lease_s

    def execute_job(self, job: Job, queue: Queue) -> None:
        execution = self.prepare_execution(job)
        done = threading.Event()
        renewer = threading.Thread(target=self._renew, args=(job, execution, done), name="lease", daemon=True)
        renewer.start()
        self.presence.set_state("busy")
        try:
            self.perform_job(job, queue, execution)
        finally:
            done.set()
            renewer.join()
            self.presence.set_state("ready")
        self.set_state(WorkerStatus.IDLE)

    def _renew(self, job: Job, execution, done: threading.Event) -> None:
        while not done.wait(self.lease_s / 3):
            try:
                self.maintain_heartbeats(job, execution)
            except redis.RedisError as e:  # the next beat tries again; the lease covers two misses
                log.warning("lease renewal failed", extra={"task": job.id, "error": str(e)})
