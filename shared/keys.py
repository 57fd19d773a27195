"""Every Redis key and RQ queue name of one install, under its prefix (LV_REDIS_PREFIX, default `lv:`),
so two installs can share one Redis without taking each other's work:

    <p>job:<id>                hash    a job's record (shared.jobs)
    <p>job:<id>:done:<stage>   set     the chunks that stage has finished
    <p>jobs                    zset    job ids by creation time (the recent-jobs list)
    <p>metrics                 hash    service-wide counters and stage-latency histograms (/metrics)
    <p>worker:<id>             string  a worker's heartbeat, expiring unless renewed (shared.heartbeat)
    <p>workers                 zset    worker ids by their last heartbeat
    <p>labels:<kind>:<sha256>  string  the LLM's labels of a caption or phrase (services.categorizer.cache)
    RQ queue <p><stage>                e.g. `lv:encode`: RQ keeps it as the list rq:queue:lv:encode, and its
                                       registries and worker set under the same name (rq:wip:lv:encode,
                                       rq:workers:lv:encode, ...)

RQ's own task records (rq:job:<task id>) carry no prefix, but a task id holds its job's random id, so
two installs never share one. RQ's other global keys (rq:workers, rq:worker:<name>, rq:scheduler:<name>,
rq:queues, rq:clean_groups) register processes or throttle clean-ups and hold no work."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    prefix: str

    def job(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    def done(self, job_id: str, stage: str) -> str:
        return f"{self.prefix}job:{job_id}:done:{stage}"

    @property
    def jobs(self) -> str:
        return f"{self.prefix}jobs"

    @property
    def metrics(self) -> str:
        return f"{self.prefix}metrics"

    def worker(self, worker_id: str) -> str:
        return f"{self.prefix}worker:{worker_id}"

    @property
    def workers(self) -> str:
        return f"{self.prefix}workers"

    def labels(self, kind: str, digest: str) -> str:
        return f"{self.prefix}labels:{kind}:{digest}"

    def queue(self, stage: str) -> str:
        """The RQ queue name of a stage."""
        return f"{self.prefix}{stage}"
