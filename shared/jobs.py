"""Job records in Redis: what the gateway creates and polls and the workers update.

A job is N images split into chunks; every chunk flows encode -> decode -> categorize. Redis holds
one hash per job (status, options, counters, timings) and, per stage, the set of chunks that stage
has finished. Marking a chunk done is one atomic script: the first time a chunk reaches a stage its
images are counted, a retried or duplicated task changes nothing, and the set's size tells the
caller whether it finished the last chunk (fan-in).

    <prefix>job:<id>                hash   status, options, total, chunks, encoded, ..., encode_s, ...
    <prefix>job:<id>:done:<stage>   set    chunk indices that stage has finished
    <prefix>jobs                    zset   job ids by creation time (the recent-jobs list)
    <prefix>metrics                 hash   service-wide counters and stage-latency histograms (/metrics)

(shared.keys names them; the prefix is LV_REDIS_PREFIX.)
"""

from __future__ import annotations

import json
import time
import uuid
from enum import Enum
from typing import Literal

import redis
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from latent_verbalizer.shared.keys import Keys
from latent_verbalizer.shared.regions import MAX_REGIONS, Region, parse_regions
from latent_verbalizer.shared.schemas import DecodeParams

STAGES = ("encode", "decode", "categorize")
# Per stage, the job counter of images it has handled (per-image errors included).
STAGE_COUNTER = {"encode": "encoded", "decode": "captioned", "categorize": "categorized"}
# Upper bounds (seconds) of the stage-latency histogram buckets, per chunk.
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
# The categorizer backends services.categorizer.stage.make_labeler accepts (a test keeps them equal).
CategorizerBackend = Literal["embedded", "openai"]

_ID_CHARS = frozenset("0123456789abcdef")


class JobStatus(str, Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


ACTIVE = (JobStatus.queued, JobStatus.running)
TERMINAL = (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


class JobOptions(BaseModel):
    """What a client may choose per job (the `options` of POST /v1/jobs)."""

    model_config = ConfigDict(extra="forbid")

    layers: list[int] | None = Field(
        None, min_length=1, description="vision blocks to caption (negative: from the end); null: every block"
    )
    decode: DecodeParams = Field(default_factory=DecodeParams, description="how captions are decoded")
    categorize: bool = Field(True, description="label every caption's phrases and build the per-layer figure")
    grounding: bool = Field(True, description="score every caption against its image (image_score, retrieval"
                                              " rank, prior, similarity to the last layer)")
    backend: CategorizerBackend | None = Field(None, description="categorizer backend; null: the server's default")
    attributions: bool = Field(False, description="word -> patch maps: per image, every caption token's map over its"
                                                  " layer's patches (GET /v1/jobs/{id}/attributions); decoding is"
                                                  " slower")
    region_cls: bool = Field(False, description="regions read the class token too (it has seen the whole image);"
                                                " off: only the patches inside each region")
    regions: list[str | Region] = Field(
        default_factory=list, max_length=MAX_REGIONS,
        description="parts of every image to caption on their own at every layer (each image result's `regions`):"
                    ' "x0,y0,x1,y1" in the image\'s pixels, or fractions of its size when all four are in [0, 1];'
                    ' "name=x0,y0,x1,y1"; "grid:RxC" (R x C cells, labelled r{i}c{j}); or Region objects. Stored'
                    " parsed and labelled (r{k} when unnamed). A region that covers no patch of an image fails on"
                    " that image alone (its entry's `error`); one that can cover none of any image is refused (422)",
        examples=[["0,0,0.5,1", "cup=10,20,40,50"], ["grid:2x2"]],
    )

    @field_validator("regions", mode="before")
    @classmethod
    def _parse_regions(cls, value: object, info: ValidationInfo) -> object:
        """Strings and objects alike -> labelled Regions, a bad one named (RegionError: a 422)."""
        return parse_regions(value, info.data.get("region_cls", False)) if isinstance(value, list) else value


class JobRecord(BaseModel):
    id: str
    status: JobStatus
    options: JobOptions
    total: int = Field(description="images in the job")
    chunks: int
    encoded: int = 0
    captioned: int = 0
    categorized: int = 0
    failed_images: int = 0
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    warnings: list[str] = Field(default_factory=list, description="what went wrong without failing the job")
    stage_seconds: dict[str, float] = Field(default_factory=dict, description="summed over chunks")

    @property
    def stages(self) -> tuple[str, ...]:
        """The stages this job's chunks go through, in order."""
        return STAGES if self.options.categorize else STAGES[:2]

    def next_stage(self, stage: str) -> str | None:
        following = self.stages[self.stages.index(stage) + 1 :]
        return following[0] if following else None

    @property
    def final_stage(self) -> str:
        return self.stages[-1]


def new_job_id() -> str:
    return uuid.uuid4().hex


def is_job_id(text: str) -> bool:
    """Job ids are 32 lowercase hex digits; anything else never reaches Redis or the file system."""
    return len(text) == 32 and set(text) <= _ID_CHARS


# Move a job to status ARGV[1] (setting the JSON fields ARGV[2]) if its status is one of ARGV[3..].
# -> 1 moved, 0 not allowed from its current status, nil no such job.
_TRANSITION = """
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return nil end
for i = 3, #ARGV do
  if current == ARGV[i] then
    redis.call('HSET', KEYS[1], 'status', ARGV[1])
    for field, value in pairs(cjson.decode(ARGV[2])) do redis.call('HSET', KEYS[1], field, value) end
    redis.call('HINCRBY', KEYS[2], 'jobs_' .. ARGV[1], 1)
    return 1
  end
end
return 0
"""

# Mark chunk ARGV[1] done at a stage; only the first time: expire the set after ARGV[2] s, add ARGV[4]
# seconds to field ARGV[3] and apply the (field, increment) pairs that follow.
# -> {1 if first time else 0, chunks done at this stage}, or {-1, 0} when the job is gone.
_CHUNK_DONE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, 0} end
local first = redis.call('SADD', KEYS[2], ARGV[1])
if first == 1 then
  redis.call('EXPIRE', KEYS[2], ARGV[2])
  redis.call('HINCRBYFLOAT', KEYS[1], ARGV[3], ARGV[4])
  for i = 5, #ARGV, 2 do redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
return {first, redis.call('SCARD', KEYS[2])}
"""


class JobStore:
    def __init__(self, client: redis.Redis, ttl_s: int, prefix: str) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self.keys = Keys(prefix)
        self._transition = client.register_script(_TRANSITION)
        self._chunk_done = client.register_script(_CHUNK_DONE)

    def create(self, job_id: str, options: JobOptions, total: int, chunks: int) -> None:
        now = time.time()
        with self.client.pipeline() as pipe:
            pipe.hset(self.keys.job(job_id), mapping={
                "status": JobStatus.queued.value, "options": options.model_dump_json(), "total": total,
                "chunks": chunks, "created_at": now,
            })
            pipe.expire(self.keys.job(job_id), self.ttl_s)
            pipe.zadd(self.keys.jobs, {job_id: now})
            pipe.hincrby(self.keys.metrics, "jobs_submitted", 1)
            pipe.execute()

    def get(self, job_id: str) -> JobRecord | None:
        return _record(job_id, self.client.hgetall(self.keys.job(job_id)))

    def recent(self, limit: int) -> list[JobRecord]:
        """The newest jobs first; ids whose record expired are dropped from the index."""
        ids = [i.decode() for i in self.client.zrevrange(self.keys.jobs, 0, limit - 1)]
        with self.client.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hgetall(self.keys.job(job_id))
            hashes = pipe.execute()
        records = [_record(job_id, h) for job_id, h in zip(ids, hashes)]
        if gone := [job_id for job_id, r in zip(ids, records) if r is None]:
            self.client.zrem(self.keys.jobs, *gone)
        return [r for r in records if r is not None]

    def begin(self, job_id: str) -> JobRecord | None:
        """A worker starts on one of the job's chunks: queued -> running. The record while the job is
        running, None when there is nothing to do (cancelled, failed, finished or expired)."""
        self._move(job_id, JobStatus.running, {"started_at": time.time()}, (JobStatus.queued,))
        record = self.get(job_id)
        return record if record is not None and record.status == JobStatus.running else None

    def chunk_done(self, job_id: str, stage: str, chunk: int, images: int, seconds: float,
                   failed_images: int = 0) -> int:
        """Count a chunk's images at a stage, once however often it is called. -> how many chunks that
        stage has finished (-1 when the job is gone)."""
        increments = [STAGE_COUNTER[stage], images]
        if failed_images:
            increments += ["failed_images", failed_images]
        first, done = self._chunk_done(
            keys=[self.keys.job(job_id), self.keys.done(job_id, stage)],
            args=[chunk, self.ttl_s, f"{stage}_s", seconds, *increments],
        )
        if first == -1:
            return -1
        if first == 1:
            self._observe(stage, images, seconds)
        return done

    def chunk_is_done(self, job_id: str, stage: str, chunk: int) -> bool:
        return bool(self.client.sismember(self.keys.done(job_id, stage), chunk))

    def chunks_done(self, job_id: str, stage: str) -> int:
        return self.client.scard(self.keys.done(job_id, stage))

    def done_chunks(self, job_id: str, stage: str) -> set[int]:
        return {int(c) for c in self.client.smembers(self.keys.done(job_id, stage))}

    def set_warnings(self, job_id: str, warnings: list[str]) -> None:
        """Replace an existing job's warnings (a cancelled job's note on its partial results)."""
        self.client.hset(self.keys.job(job_id), "warnings", json.dumps(warnings))

    def finish(self, job_id: str, status: JobStatus, error: str | None = None, warnings: list[str] | None = None
               ) -> bool:
        """End an active job (succeeded, failed or cancelled); False when it had already ended. `warnings`:
        what went wrong in a job that still succeeded (e.g. captions whose labelling failed)."""
        fields = {"finished_at": time.time(), **({"error": error} if error else {}),
                  **({"warnings": json.dumps(warnings)} if warnings else {})}
        moved = self._move(job_id, status, fields, ACTIVE)
        if moved:
            self.client.expire(self.keys.job(job_id), self.ttl_s)  # outputs live job_ttl_s from the end
        return moved

    def delete(self, job_id: str) -> None:
        with self.client.pipeline() as pipe:
            pipe.delete(self.keys.job(job_id), *(self.keys.done(job_id, s) for s in STAGES))
            pipe.zrem(self.keys.jobs, job_id)
            pipe.execute()

    def missing(self, ids: list[str]) -> list[str]:
        """The ids that have no record (never had, or expired)."""
        with self.client.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.exists(self.keys.job(job_id))
            exists = pipe.execute()
        return [job_id for job_id, found in zip(ids, exists) if not found]

    def prune_index(self, older_than: float) -> None:
        """Drop expired jobs created before `older_than` from the recent-jobs index."""
        ids = [i.decode() for i in self.client.zrangebyscore(self.keys.jobs, "-inf", older_than)]
        if gone := self.missing(ids):
            self.client.zrem(self.keys.jobs, *gone)

    def _move(self, job_id: str, status: JobStatus, fields: dict, allowed_from) -> bool:
        result = self._transition(keys=[self.keys.job(job_id), self.keys.metrics],
                                  args=[status.value, json.dumps({k: str(v) for k, v in fields.items()}),
                                        *(s.value for s in allowed_from)])
        return result == 1

    def _observe(self, stage: str, images: int, seconds: float) -> None:
        metrics = self.keys.metrics
        with self.client.pipeline(transaction=False) as pipe:
            pipe.hincrby(metrics, f"images:{stage}", images)
            pipe.hincrby(metrics, f"chunk_seconds:{stage}:count", 1)
            pipe.hincrbyfloat(metrics, f"chunk_seconds:{stage}:sum", seconds)
            for bound in LATENCY_BUCKETS:
                if seconds <= bound:
                    pipe.hincrby(metrics, f"chunk_seconds:{stage}:le:{bound}", 1)
            pipe.execute()


def _record(job_id: str, raw: dict[bytes, bytes]) -> JobRecord | None:
    if not raw:
        return None
    h = {k.decode(): v.decode() for k, v in raw.items()}
    return JobRecord(
        id=job_id,
        status=h["status"],
        options=JobOptions.model_validate_json(h["options"]),
        total=int(h["total"]),
        chunks=int(h["chunks"]),
        **{f: int(h[f]) for f in ("encoded", "captioned", "categorized", "failed_images") if f in h},
        **{f: float(h[f]) for f in ("created_at", "started_at", "finished_at") if f in h},
        error=h.get("error"),
        warnings=json.loads(h.get("warnings", "[]")),
        stage_seconds={s: float(h[f"{s}_s"]) for s in STAGES if f"{s}_s" in h},
    )
