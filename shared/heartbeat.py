"""Worker heartbeats: each worker process says which stage it serves, with which model, and whether it is
loading that model, ready, or busy with a task (keys under the install's prefix, shared.keys):

    <prefix>worker:<host>:<pid>:<stage>   JSON WorkerBeat; expires TTL_S after the last beat
    <prefix>workers                       zset: worker id -> time of its last beat (the index readers scan)

A worker starts beating before it loads its model, and a thread renews the beat every BEAT_S. The
gateway reads the beats for /readyz (ready when every stage has a ready or busy worker for the served
model), /v1/options and the hint of a job that waits for a stage; `latent-verbalizer healthcheck worker`
reads them for the container probes."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Literal

import redis
from pydantic import BaseModel, Field

from latent_verbalizer.shared.jobs import STAGES
from latent_verbalizer.shared.keys import Keys
from latent_verbalizer.shared.pretrained import NO_WEIGHTS, resolve_pretrained
from latent_verbalizer.shared.settings import Settings

log = logging.getLogger(__name__)

BEAT_S = 2.0
TTL_S = 10  # a worker whose beats stop (killed, frozen) is gone this long after its last one
INDEX_GRACE_S = 3600  # index entries older than this are dropped (the beat's own expiry is what counts)

State = Literal["loading", "ready", "busy"]


class WorkerBeat(BaseModel):
    id: str = Field(description="<host>:<pid>:<stage>")
    stage: str = Field(description="encode | decode | categorize")
    model: str = Field(description="encode, decode: the CoCa model; categorize: the labelling backend")
    pretrained: str = Field(description="encode, decode: the weights; categorize: the LLM (openai) or '-'")
    state: State
    pid: int
    host: str
    since: float = Field(description="when it entered this state (unix time)")

    @property
    def working(self) -> bool:
        return self.state in ("ready", "busy")


def served(settings: Settings, stage: str) -> tuple[str, str]:
    """What a worker of `stage` serves under these settings: (model, pretrained). The gateway asks the
    same of its own settings to know which workers serve the model it accepts jobs for."""
    if stage == "categorize":
        backend = settings.categorizer_backend
        return backend, settings.llm_model if backend == "openai" else "-"
    return settings.model, resolve_pretrained(settings.model, settings.pretrained) or NO_WEIGHTS


class Heartbeat:
    """A worker process's heartbeat: `start()` publishes it (state loading) and renews it from a thread;
    `set_state()` publishes a change at once; `stop()` removes it."""

    def __init__(self, client: redis.Redis, prefix: str, stage: str, model: str, pretrained: str) -> None:
        self.client = client
        self.keys = Keys(prefix)
        host, pid = socket.gethostname(), os.getpid()
        self.beat = WorkerBeat(id=f"{host}:{pid}:{stage}", stage=stage, model=model, pretrained=pretrained,
                               state="loading", pid=pid, host=host, since=time.time())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> None:
        self._publish()
        self._thread.start()

    def set_state(self, state: State) -> None:
        if state != self.beat.state:
            self.beat = self.beat.model_copy(update={"state": state, "since": time.time()})
            self._beat()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            with self.client.pipeline(transaction=False) as pipe:
                pipe.delete(self.keys.worker(self.beat.id))
                pipe.zrem(self.keys.workers, self.beat.id)
                pipe.execute()
        except redis.RedisError:
            pass  # the beat expires by itself

    def _run(self) -> None:
        while not self._stop.wait(BEAT_S):
            self._beat()

    def _beat(self) -> None:
        try:
            self._publish()
        except redis.RedisError as e:  # the next beat tries again
            log.warning("heartbeat failed", extra={"worker": self.beat.id, "error": str(e)})

    def _publish(self) -> None:
        with self.client.pipeline(transaction=False) as pipe:
            pipe.set(self.keys.worker(self.beat.id), self.beat.model_dump_json(), ex=TTL_S)
            pipe.zadd(self.keys.workers, {self.beat.id: time.time()})
            pipe.execute()


def live_workers(client: redis.Redis, prefix: str) -> list[WorkerBeat]:
    """The workers whose heartbeat has not expired, by stage order then id."""
    keys = Keys(prefix)
    client.zremrangebyscore(keys.workers, "-inf", time.time() - INDEX_GRACE_S)
    ids = [i.decode() for i in client.zrange(keys.workers, 0, -1)]
    values = client.mget([keys.worker(i) for i in ids]) if ids else []
    beats = [WorkerBeat.model_validate_json(v) for v in values if v is not None]
    return sorted(beats, key=lambda b: (STAGES.index(b.stage) if b.stage in STAGES else len(STAGES), b.id))


def unserved(workers: list[WorkerBeat], settings: Settings, stages: tuple[str, ...] = STAGES) -> dict[str, str]:
    """Per stage that has no ready or busy worker for what these settings serve, the reason."""
    reasons = {}
    for stage in stages:
        model, pretrained = served(settings, stage)
        mine = [w for w in workers if w.stage == stage and (w.model, w.pretrained) == (model, pretrained)]
        if any(w.working for w in mine):
            continue
        what = f"{model} ({pretrained})" if stage != "categorize" else f"the {model} backend"
        if mine:
            waited = round(time.time() - min(w.since for w in mine))
            reasons[stage] = f"the {stage} worker is still loading {what} (for {waited} s)"
        elif others := sorted({f"{w.model} ({w.pretrained})" for w in workers if w.stage == stage}):
            reasons[stage] = f"no {stage} worker for {what}; the running ones serve {', '.join(others)}"
        else:
            reasons[stage] = f"no {stage} worker is running"
    return reasons
