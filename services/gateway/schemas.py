"""What the HTTP API accepts and answers (the job options model itself is shared.jobs.JobOptions)."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

from fastapi import HTTPException
from pydantic import BaseModel, ConfigDict, Field

from latent_verbalizer.shared.heartbeat import WorkerBeat
from latent_verbalizer.shared.jobs import CategorizerBackend, JobOptions, JobRecord, JobStatus


class ErrorOut(BaseModel):
    """Every error answer (4xx and 5xx) of the gateway, request validation's included."""

    detail: str = Field(description="why, in words")
    field: str | None = Field(None, description="the part of the request at fault, dotted (query.limit, files, "
                                                "options.decode.seq_len); absent when no one part is")


class FieldError(HTTPException):
    """A refusal that names the part of the request at fault: its ErrorOut carries `field`."""

    def __init__(self, status_code: int, detail: str, field: str) -> None:
        super().__init__(status_code, detail)
        self.field = field


ERRORS = {  # status -> what it means on this API
    400: "the body does not parse (e.g. a broken multipart form)",
    401: "missing or invalid API key: send `Authorization: Bearer <key>`",
    403: "not allowed on this server (a shard outside its data roots, shard URLs disabled)",
    404: "no such job (unknown or expired), output or shard",
    409: "the job has not succeeded: its outputs do not exist (yet; a cancelled job keeps only its partial results)",
    411: "no Content-Length header (streamed bodies are not accepted)",
    413: "over a limit of the server: body bytes, files or shards per job (GET /v1/options)",
    415: "a content type or a file the server does not take",
    422: "a well-formed request with invalid content: `field` names the part",
    500: "an unexpected error (logged by the gateway)",
    503: "Redis or the artifact store is unavailable: try again",
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route or router: each status it may answer, all with ErrorOut."""
    return {code: {"model": ErrorOut, "description": ERRORS[code]} for code in codes}


class ShardJobRequest(BaseModel):
    """POST /v1/jobs as JSON: shards on the server (under its data roots) or http(s) URLs when enabled."""

    model_config = ConfigDict(extra="forbid")

    shards: list[str] = Field(min_length=1, description="paths of .tar shards under a data root, or URLs")
    options: JobOptions = Field(default_factory=JobOptions)


class Links(BaseModel):
    self: str
    results: str
    summary: str
    figure: str
    entropy: str
    distribution: str
    figure_supported: str = Field(description="figure_supported.png, the classes of the phrases the image supports"
                                              " (likelihood grounding; 404 without categorize or grounding)")
    distribution_supported: str = Field(description="distribution_supported.csv, the same as numbers")
    grounding: str = Field(description="grounding.png, the grounding curves per layer (404 when grounding was off)")
    captions: str = Field(description="captions.csv, every caption one row each (image or region, layer, grounding)")
    regions: str = Field(description="regions.csv, the region captions one row each (404 when the job had no regions)")
    viewer: str = Field(description="the job in the web viewer (open it in a browser)")

    @classmethod
    def of(cls, job_id: str) -> Links:
        base = f"/v1/jobs/{job_id}"
        return cls(self=base, results=f"{base}/results", summary=f"{base}/summary", figure=f"{base}/figure.png",
                   entropy=f"{base}/entropy.png", distribution=f"{base}/distribution.csv",
                   figure_supported=f"{base}/figure_supported.png",
                   distribution_supported=f"{base}/distribution_supported.csv", grounding=f"{base}/grounding.png",
                   captions=f"{base}/captions.csv", regions=f"{base}/regions.csv",
                   viewer=f"/#job/{job_id}")


class JobCreated(BaseModel):
    id: str
    status: JobStatus
    links: Links


class Progress(BaseModel):
    total: int = Field(description="images in the job")
    encoded: int
    captioned: int
    categorized: int
    failed_images: int = Field(description="images that could not be used (each one's reason is in the results)")
    chunks: int


class Timings(BaseModel):
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    elapsed_s: float = Field(description="from submission to the end, or to now while active")
    stage_seconds: dict[str, float] = Field(description="work time per stage, summed over chunks")


class JobOut(BaseModel):
    id: str
    status: JobStatus
    error: str | None
    warnings: list[str] = Field(description="what went wrong in a job that still succeeded (e.g. captions whose"
                                            " labelling failed: they are in the results with their label_error)")
    waiting_for: dict[str, str] | None = Field(
        None, description="while active: per stage the job still needs that no worker can run now, why (none"
                          " running, or still loading its model)")
    options: JobOptions
    progress: Progress
    timings: Timings
    links: Links

    @classmethod
    def of(cls, job: JobRecord, waiting_for: dict[str, str] | None = None) -> JobOut:
        end = job.finished_at or time.time()
        return cls(
            id=job.id, status=job.status, error=job.error, warnings=job.warnings, waiting_for=waiting_for,
            options=job.options,
            progress=Progress(total=job.total, encoded=job.encoded, captioned=job.captioned,
                              categorized=job.categorized, failed_images=job.failed_images, chunks=job.chunks),
            timings=Timings(created_at=_utc(job.created_at), started_at=_utc(job.started_at),
                            finished_at=_utc(job.finished_at), elapsed_s=round(end - job.created_at, 3),
                            stage_seconds={k: round(v, 3) for k, v in job.stage_seconds.items()}),
            links=Links.of(job.id),
        )


class JobList(BaseModel):
    jobs: list[JobOut]


class Deleted(BaseModel):
    id: str
    status: str = Field(description="deleted")


class ModelInfo(BaseModel):
    name: str
    family: str | None = Field(None, description="coca | llava | blip (services.families); null when unknown here")
    pretrained: str | None = Field(description="CoCa's weights the workers load (shared.pretrained's rule); null:"
                                               " random, or a family whose weights come with the model")
    prompt: str | None = Field(None, description="LLaVA's captioning prompt / BLIP's text prefix as set (LV_PROMPT);"
                                                 " null: the family's default")
    note: str | None = Field(None, description="what a user should know about this model (e.g. the demo model's scope)")
    layers: int | None = Field(description="vision blocks (captionable layers); null when the config is unknown")
    max_seq_len: int | None = Field(description="longest caption the text tower allows, start token included")
    image_size: list[int] | None = Field(None, description="the vision tower's input height, width (px)")
    patch_size: list[int] | None = Field(None, description="its patches' height, width (px): the grid regions and"
                                                           " attributions are in")
    extras: dict[str, str | None] = Field(default_factory=dict, description="contrastive | regions | attributions"
                                          " -> null when the model has it, else why not")


class Limits(BaseModel):
    max_upload_bytes: int
    max_files: int
    max_image_pixels: int
    chunk_size: int


class TaxonomyOut(BaseModel):
    """What the viewer needs to colour category chips like the figure."""

    version: str
    colors: dict[str, str] = Field(description="merged class -> hex colour (as in figure.png)")
    merged_classes: dict[str, list[str]] = Field(description="merged class -> the raw labels it folds")


class LLMStatus(BaseModel):
    url: str
    model: str = Field(description="the model the openai backend asks for")
    reachable: bool = Field(description="GET {url}/models answered 200 at checked_at")
    detail: str | None = Field(description="why it is not reachable")
    checked_at: float = Field(description="unix time of the check (checks are a few seconds apart)")


class OptionsOut(BaseModel):
    model: ModelInfo
    defaults: JobOptions
    backends: list[CategorizerBackend] = Field(description="the categorizer backends this server can use")
    llm: LLMStatus | None = Field(description="the openai backend's LLM server; null when none is configured")
    workers: dict[str, list[WorkerBeat]] = Field(description="per stage, its live workers (heartbeats)")
    url_shards: bool = Field(description="whether http(s) shard URLs are accepted")
    limits: Limits
    options_schema: dict = Field(alias="schema", description="JSON schema of `options`")
    taxonomy: TaxonomyOut


def _utc(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc)


class AttributionMap(BaseModel):
    """One caption's word -> patch maps (shared.attributions): which patches of its layer each token was
    read from. Place the grid on the image through `input_box`."""

    image: str = Field(description="the image's id, as in the results")
    layer: int = Field(description="the vision layer of the caption")
    region: int | None = Field(description="the region's index in the image's `regions`; null: the whole image")
    grid: list[int] = Field(min_length=2, max_length=2, description="[gh, gw]: patch rows and columns")
    input_box: list[float] = Field(min_length=4, max_length=4,
                                   description="x0, y0, x1, y1: the part of the image (its own pixels) the grid covers")
    tokens: list[str] = Field(description="the caption's tokens, each as the tokenizer decodes it alone (a word's"
                                          " last token ends with a space)")
    maps: list[list[float]] = Field(description="per token, its map: gh*gw shares, row-major, summing to 1")
    method: str = Field(description="how the maps were made")
