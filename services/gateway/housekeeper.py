"""The gateway's background thread: the queue upkeep that must run even when a worker pool is scaled
to zero (KEDA scales on queue length, so a task parked elsewhere would never wake a worker):

  - every second, RQ's scheduler step: tasks whose retry backoff has passed go back on their queue
    (a lock in Redis lets one gateway replica do it at a time);
  - every second, RQ's started-registry clean-up: a task whose worker's lease lapsed is abandoned and
    retried (or, out of retries, fails its job through shared.queue.on_task_failure);
  - every minute, the artifact sweep: files of jobs whose record has expired are deleted.
"""

from __future__ import annotations

import logging
import threading
import time

import redis
from rq.scheduler import RQScheduler

from latent_verbalizer.shared.artifacts import ArtifactStore
from latent_verbalizer.shared.jobs import STAGES, JobStore
from latent_verbalizer.shared.queue import queue

log = logging.getLogger(__name__)

TICK_S = 1.0
SWEEP_EVERY_S = 60.0
SWEEP_GRACE_S = 600.0


class Housekeeper:
    def __init__(self, client: redis.Redis, jobs: JobStore, store: ArtifactStore, job_ttl_s: int, prefix: str) -> None:
        self.client = client
        self.queues = [queue(client, prefix, stage) for stage in STAGES]
        self.jobs = jobs
        self.store = store
        self.job_ttl_s = job_ttl_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="housekeeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        scheduler = RQScheduler(self.queues, connection=self.client, interval=int(TICK_S))
        last_sweep = 0.0
        while not self._stop.wait(TICK_S):
            try:
                self._reschedule(scheduler)
                for q in self.queues:
                    q.started_job_registry.cleanup()
                if time.monotonic() - last_sweep > SWEEP_EVERY_S:
                    last_sweep = time.monotonic()
                    self._sweep()
            except (redis.RedisError, OSError) as e:
                log.warning("housekeeping failed; retrying", extra={"error": str(e)})
            except Exception:  # a bug must not end the thread that keeps retries and leases moving
                log.exception("housekeeping failed; retrying")
        try:
            scheduler.release_locks()
        except redis.RedisError:
            pass  # the locks expire by themselves

    @staticmethod
    def _reschedule(scheduler: RQScheduler) -> None:
        if scheduler.should_reacquire_locks:
            scheduler.acquire_locks()
        if scheduler.acquired_locks:
            scheduler.heartbeat()
            scheduler.enqueue_scheduled_jobs()

    def _sweep(self) -> None:
        """Delete the files of jobs that have no record (expired or deleted), once they are older than
        a grace period (a job's files are written just before its record)."""
        self.jobs.prune_index(older_than=time.time() - self.job_ttl_s)
        grace = time.time() - SWEEP_GRACE_S
        for job_id in self.jobs.missing(self.store.job_ids()):
            if self.store.job_dir(job_id).stat().st_mtime < grace:
                self.store.delete_job(job_id)
                log.info("files of an expired job deleted", extra={"job": job_id})
