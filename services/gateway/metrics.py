"""Prometheus metrics, read from Redis at scrape time so that they cover every worker process and
survive gateway restarts: jobs submitted and ended, per-stage chunk latency and images, and the
queues (waiting, running, scheduled tasks; workers)."""

from __future__ import annotations

from collections.abc import Iterator

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from rq import Worker

from latent_verbalizer.shared.jobs import LATENCY_BUCKETS, STAGES, TERMINAL
from latent_verbalizer.shared.keys import Keys
from latent_verbalizer.shared.queue import queue, queue_depths


class ServiceCollector(Collector):
    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.client = client
        self.prefix = prefix

    def collect(self) -> Iterator[Metric]:
        raw = {k.decode(): float(v) for k, v in self.client.hgetall(Keys(self.prefix).metrics).items()}
        yield CounterMetricFamily("lv_jobs_submitted", "Jobs accepted", value=raw.get("jobs_submitted", 0))
        ended = CounterMetricFamily("lv_jobs_ended", "Jobs that ended, by final status", labels=["status"])
        for status in TERMINAL:
            ended.add_metric([status.value], raw.get(f"jobs_{status.value}", 0))
        yield ended
        images = CounterMetricFamily("lv_stage_images", "Images handled per stage", labels=["stage"])
        latency = HistogramMetricFamily("lv_chunk_seconds", "Work time per chunk and stage", labels=["stage"])
        for stage in STAGES:
            images.add_metric([stage], raw.get(f"images:{stage}", 0))
            prefix = f"chunk_seconds:{stage}"
            buckets = [(str(b), raw.get(f"{prefix}:le:{b}", 0)) for b in LATENCY_BUCKETS]
            latency.add_metric([stage], [*buckets, ("+Inf", raw.get(f"{prefix}:count", 0))],
                               sum_value=raw.get(f"{prefix}:sum", 0))
        yield images
        yield latency
        tasks = GaugeMetricFamily("lv_queue_tasks", "Chunk tasks per queue and state", labels=["queue", "state"])
        for stage, counts in queue_depths(self.client, self.prefix).items():
            for state, n in counts.items():
                tasks.add_metric([stage, state], n)
        yield tasks
        workers = GaugeMetricFamily("lv_workers", "Registered workers per queue", labels=["queue"])
        for stage in STAGES:
            workers.add_metric([stage], Worker.count(queue=queue(self.client, self.prefix, stage)))
        yield workers


def registry(client: redis.Redis, prefix: str) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(ServiceCollector(client, prefix))
    return reg
