"""The gateway's background thread: the queue upkeep that must run even when a worker pool is scaled
to zero (KEDA scales on queue length, so a task parked elsewhere would never wake a worker):

  - every second, RQ's scheduler step: tasks whose retry backoff has passed go back on their queue
    (a lock in Redis lets one gateway replica do it at a time);
  - every second, RQ's started-registry clean-up: a task whose worker's lease lapsed is abandoned and
    retried, or, out of retries, moved to the failed registry;
  - every second, the failed registries: each task RQ gave up on is settled (services.chain.lost: its
    chunk's images fail with the reason and its job goes on without them), so no job waits forever;
  - every minute, the artifact sweep: files of jobs whose record has expired are deleted.
"""

from __future__ import annotations

import logging
import threading
import time

import redis
from rq.job import Job
from rq.scheduler import RQScheduler

from latent_verbalizer.services.chain.context import Context
from latent_verbalizer.services.chain.lost import settle
from latent_verbalizer.shared.jobs import STAGES
from latent_verbalizer.shared.queue import queue

log = logging.getLogger(__name__)

TICK_S = 1.0
SWEEP_EVERY_S = 60.0
SWEEP_GRACE_S = 600.0


class Housekeeper:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.queues = [queue(ctx.client, ctx.settings.redis_prefix, stage) for stage in STAGES]
        self.settled: set[str] = set()  # failed tasks this process has settled (still in a failed registry)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="housekeeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        scheduler = RQScheduler(self.queues, connection=self.ctx.client, interval=int(TICK_S))
        last_sweep = 0.0
        while not self._stop.wait(TICK_S):
            try:
                self._reschedule(scheduler)
                for q in self.queues:
                    q.started_job_registry.cleanup()
                self._settle_failed()
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

    def _settle_failed(self) -> None:
        failed = {t for q in self.queues for t in q.failed_job_registry.get_job_ids(cleanup=False)}
        self.settled &= failed  # forget tasks whose record expired
        for task in Job.fetch_many(sorted(failed - self.settled), connection=self.ctx.client):
            if task is not None:
                settle(self.ctx, task)
                self.settled.add(task.id)

    def _sweep(self) -> None:
        """Delete the files of jobs that have no record (expired or deleted), once they are older than
        a grace period (a job's files are written just before its record)."""
        jobs, store = self.ctx.jobs, self.ctx.store
        jobs.prune_index(older_than=time.time() - self.ctx.settings.job_ttl_s)
        grace = time.time() - SWEEP_GRACE_S
        for job_id in jobs.missing(store.job_ids()):
            if store.job_dir(job_id).stat().st_mtime < grace:
                store.delete_job(job_id)
                log.info("files of an expired job deleted", extra={"job": job_id})
