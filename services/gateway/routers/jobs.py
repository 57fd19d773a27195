"""/v1: submit jobs, follow them, fetch their outputs, cancel them; the options a job may choose."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse

from latent_verbalizer.services.chain.cancel import cancel
from latent_verbalizer.services.gateway.backends import usable_backends
from latent_verbalizer.services.gateway.deps import Gateway, Job, gateway, require_succeeded
from latent_verbalizer.services.gateway.schemas import (
    Deleted,
    FieldError,
    JobCreated,
    JobList,
    JobOut,
    Limits,
    Links,
    OptionsOut,
    ShardJobRequest,
    errors,
)
from latent_verbalizer.services.gateway.submit import check_backend, submit
from latent_verbalizer.services.gateway.uploads import (
    JSON_BODY_BYTES,
    check_length,
    parse_json,
    read_uploads,
    resolve_shards,
)
from latent_verbalizer.shared.heartbeat import WorkerBeat, live_workers
from latent_verbalizer.shared.jobs import ACTIVE, STAGE_COUNTER, STAGES, JobOptions, JobRecord, JobStatus, new_job_id
from latent_verbalizer.shared.regions import RegionError, check_coverable
from latent_verbalizer.shared.schemas import resolve_layers
from latent_verbalizer.shared.taxonomy import load_taxonomy

# The API key check (and its 401) is added by the app when keys are configured.
router = APIRouter(prefix="/v1", tags=["jobs"], responses=errors(503))

INPUT_TYPES = "image/jpeg, image/png, image/webp, application/x-tar"

# Both request forms, for /docs and generated clients (the handler reads the body itself to accept either).
_SUBMIT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object", "required": ["files"],
                    "properties": {
                        "files": {"type": "array", "minItems": 1, "items": {"type": "string", "format": "binary"},
                                  "description": "images (JPEG, PNG, WebP) and/or webdataset .tar shards, one "
                                                 "part each; the content decides, not the name"},
                        # A part of JSON text: the default encoding of an object property in a form.
                        "options": {"$ref": "#/components/schemas/JobOptions", "default": {}},
                    },
                },
                "encoding": {"files": {"contentType": INPUT_TYPES}, "options": {"contentType": "application/json"}},
            },
            # JobOptions and DecodeParams are in the spec's components already (JobOut uses them).
            "application/json": {"schema": {
                k: v for k, v in ShardJobRequest.model_json_schema(ref_template="#/components/schemas/{model}").items()
                if k != "$defs"
            }},
        },
    }
}

OUTPUTS = {  # output file -> (media type, the option without which a job has none: a 404 that says so)
    "results.jsonl": ("application/x-ndjson", None),
    "captions.csv": ("text/csv", None),
    "summary.json": ("application/json", None),
    "figure.png": ("image/png", "categorize"),
    "entropy.png": ("image/png", None),
    "distribution.csv": ("text/csv", "categorize"),
    "figure_supported.png": ("image/png", "categorize"),  # likelihood grounding's: 404 also when grounding was off
    "distribution_supported.csv": ("text/csv", "categorize"),
    "grounding.png": ("image/png", "grounding"),
    "grounding.csv": ("text/csv", "grounding"),
    "regions.csv": ("text/csv", "regions"),
}
WITHOUT = {"categorize": "the job ran with categorize off", "grounding": "the job ran with grounding off",
           "regions": "the job asked for no regions"}


def _file_doc(name: str) -> dict[int | str, dict]:
    """An output route's answers: the file, with its media type, or why there is none."""
    return {200: {"description": name, "content": {OUTPUTS[name][0]: {}}}, **errors(404, 409)}


@router.post("/jobs", status_code=202, response_model=JobCreated, openapi_extra=_SUBMIT_BODY,
             responses=errors(400, 403, 404, 411, 413, 415, 422), summary="Submit images or shards")
async def create_job(request: Request) -> JobCreated:
    gw = gateway(request)
    job_id = new_job_id()
    content_type = request.headers.get("content-type", "")
    try:
        if content_type.startswith("multipart/form-data"):
            inputs, options = await read_uploads(request, gw.settings, gw.store.scratch(job_id))
            field = "files"
        elif content_type.startswith("application/json"):
            body = await _shard_request(request)
            inputs = await run_in_threadpool(resolve_shards, body.shards, gw.settings, gw.store.scratch(job_id))
            options, field = body.options, "shards"
        else:
            raise HTTPException(415, "send multipart/form-data with `files`, or application/json with `shards`")
        options = _checked_options(options, gw)
        await run_in_threadpool(submit, gw, job_id, inputs, options, field)
    except BaseException:
        gw.store.delete_job(job_id)
        raise
    return JobCreated(id=job_id, status=JobStatus.queued, links=Links.of(job_id))


async def _shard_request(request: Request) -> ShardJobRequest:
    check_length(request, JSON_BODY_BYTES)
    return parse_json(ShardJobRequest, await request.body(), "request")


def _checked_options(options: JobOptions, gw: Gateway) -> JobOptions:
    """Check the options against the served model; fill in the server's categorizer backend."""
    n, max_len = gw.model.layers, gw.model.max_seq_len
    layers = options.layers
    if layers is not None and n is not None:
        try:
            layers = resolve_layers(layers, n)
        except ValueError as e:
            raise FieldError(422, f"bad options at layers: {e} ({gw.model.name})", "options.layers") from e
    if max_len is not None and options.decode.seq_len > max_len:
        raise FieldError(422, f"bad options at decode.seq_len: {gw.model.name} allows at most {max_len}",
                         "options.decode.seq_len")
    for wanted, extra, field in ((options.regions, "regions", "options.regions"),
                                 (options.attributions, "attributions", "options.attributions")):
        if wanted and (why := gw.model.extras.get(extra)):
            raise FieldError(422, f"bad options at {field[8:]}: {gw.model.family} model {gw.model.name} has no"
                                  f" {extra}: {why}", field)
    if options.regions and gw.model.image_size and gw.model.patch_size:
        try:
            check_coverable(options.regions, gw.model.image_size, gw.model.patch_size)
        except RegionError as e:
            raise FieldError(422, f"bad options at regions: {e} ({gw.model.name})", "options.regions") from e
    backend = options.backend or gw.settings.categorizer_backend
    checked = options.model_copy(update={"layers": layers, "backend": backend})
    check_backend(gw, checked)
    return checked


@router.get("/jobs", response_model=JobList, responses=errors(422), summary="Recent jobs, newest first")
def list_jobs(request: Request, limit: int = Query(50, ge=1, le=500)) -> JobList:
    return JobList(jobs=[JobOut.of(j) for j in gateway(request).jobs.recent(limit)])


@router.get("/jobs/{job_id}", response_model=JobOut, responses=errors(404), summary="Status and progress")
def get_job(request: Request, job: Job) -> JobOut:
    waiting_for = None
    if job.status in ACTIVE:  # the stages it still needs that no worker can run now
        pending = tuple(s for s in job.stages if getattr(job, STAGE_COUNTER[s]) < job.total)
        waiting_for = gateway(request).unserved(pending) or None
    return JobOut.of(job, waiting_for)


@router.post("/jobs/{job_id}/cancel", response_model=JobOut, responses=errors(404, 409),
             summary="Cancel a queued or running job",
             description="The job stays, with status `cancelled`; the images it captioned before stay readable at"
                         " its results (partial, with header X-Partial-Results: true), its warnings saying how many.")
def cancel_job(request: Request, job: Job) -> JobOut:
    gw = gateway(request)
    if not (job.status in ACTIVE and cancel(gw.chain, job)):
        raise HTTPException(409, "job has ended: nothing to cancel")
    return JobOut.of(gw.jobs.get(job.id) or job)


# DELETE removes the job for good, so a read after it is a 404: an active job must be cancelled first.
@router.delete("/jobs/{job_id}", response_model=Deleted, responses=errors(404, 409),
               summary="Delete an ended job and its outputs")
def delete_job(request: Request, job: Job) -> Deleted:
    gw = gateway(request)
    if job.status in ACTIVE:
        raise HTTPException(409, f"job is {job.status.value}: cancel it first (POST /v1/jobs/{job.id}/cancel)")
    gw.jobs.delete(job.id)
    gw.store.delete_job(job.id)
    return Deleted(id=job.id, status="deleted")


@router.get("/jobs/{job_id}/results", summary="One JSON line per image: captions per layer (+ phrases)",
            description="Once the job has succeeded; of a cancelled job, the images it captioned before the cancel"
                        " (partial: header X-Partial-Results: true).",
            response_class=FileResponse, responses=_file_doc("results.jsonl"))
def get_results(request: Request, job: Job) -> FileResponse:
    path = _output(request, job, "results.jsonl", partial_ok=True)
    partial = job.status == JobStatus.cancelled
    return FileResponse(path, media_type=OUTPUTS["results.jsonl"][0], content_disposition_type="inline",
                        filename=f"{job.id}-{'partial-' if partial else ''}results.jsonl",
                        headers={"X-Partial-Results": "true"} if partial else None)


@router.get("/jobs/{job_id}/summary", summary="Per-layer distribution and entropy", response_class=FileResponse,
            responses=_file_doc("summary.json"))
def get_summary(request: Request, job: Job) -> FileResponse:
    return _file(request, job, "summary.json")


@router.get("/jobs/{job_id}/figure.png", summary="Stacked-area figure of classes per layer",
            response_class=FileResponse, responses=_file_doc("figure.png"))
def get_figure(request: Request, job: Job) -> FileResponse:
    return _file(request, job, "figure.png")


@router.get("/jobs/{job_id}/entropy.png", summary="Mean caption entropy per layer", response_class=FileResponse,
            responses=_file_doc("entropy.png"))
def get_entropy(request: Request, job: Job) -> FileResponse:
    return _file(request, job, "entropy.png")


@router.get("/jobs/{job_id}/distribution.csv", summary="Mean percentage of class per layer",
            response_class=FileResponse, responses=_file_doc("distribution.csv"))
def get_distribution(request: Request, job: Job) -> FileResponse:
    return _file(request, job, "distribution.csv")


@router.get("/jobs/{job_id}/figure_supported.png", summary="Stacked-area figure of the classes the image supports",
            response_class=FileResponse, responses=_file_doc("figure_supported.png"))
def get_figure_supported(request: Request, job: Job) -> FileResponse:
    return _file(request, job, "figure_supported.png")


@router.get("/jobs/{job_id}/distribution_supported.csv",
            summary="Mean percentage of class per layer, of the phrases the image supports (PMI > tau)",
            response_class=FileResponse, responses=_file_doc("distribution_supported.csv"))
def get_distribution_supported(request: Request, job: Job) -> FileResponse:
    return _file(request, job, "distribution_supported.csv")


@router.get("/jobs/{job_id}/grounding.png", summary="Grounding curves per layer (image score, R@1, prior share)",
            response_class=FileResponse, responses=_file_doc("grounding.png"))
def get_grounding_figure(request: Request, job: Job) -> FileResponse:
    return _file(request, job, "grounding.png")


@router.get("/jobs/{job_id}/captions.csv", summary="Every caption: one row per image (and region) and layer",
            response_class=FileResponse, responses=_file_doc("captions.csv"))
def get_caption_table(request: Request, job: Job) -> FileResponse:
    return _file(request, job, "captions.csv")


@router.get("/jobs/{job_id}/regions.csv", summary="Region captions: one row per region, image and layer",
            response_class=FileResponse, responses=_file_doc("regions.csv"))
def get_region_table(request: Request, job: Job) -> FileResponse:
    return _file(request, job, "regions.csv")


@router.get("/jobs/{job_id}/grounding.csv", summary="Grounding measures per layer", response_class=FileResponse,
            responses=_file_doc("grounding.csv"))
def get_grounding_table(request: Request, job: Job) -> FileResponse:
    return _file(request, job, "grounding.csv")


def _file(request: Request, job: JobRecord, name: str) -> FileResponse:
    media_type, option = OUTPUTS[name]
    if option and not getattr(job.options, option) and job.status == JobStatus.succeeded:
        raise HTTPException(404, f"no {name}: {WITHOUT[option]}")
    return FileResponse(_output(request, job, name), media_type=media_type)


def _output(request: Request, job: JobRecord, name: str, partial_ok: bool = False) -> Path:
    require_succeeded(job, partial_ok)
    path = gateway(request).store.output(job.id, name)
    if not path.is_file():
        raise HTTPException(404, f"no {name} (expired, deleted, or not made: see the job's warnings)")
    return path


@router.get("/options", response_model=OptionsOut, summary="Defaults and schema of the job options")
def get_options(request: Request) -> OptionsOut:
    gw = gateway(request)
    s = gw.settings
    return OptionsOut(
        model=gw.model,
        defaults=JobOptions(backend=s.categorizer_backend),
        backends=usable_backends(s),
        llm=gw.llm.status() if gw.llm else None,
        workers=_workers_by_stage(gw),
        url_shards=s.allow_url_shards,
        limits=Limits(max_upload_bytes=s.max_upload_bytes, max_files=s.max_files,
                      max_image_pixels=s.max_image_pixels, chunk_size=s.chunk_size),
        schema=JobOptions.model_json_schema(),
        taxonomy=load_taxonomy().model_dump(include={"version", "colors", "merged_classes"}),
    )


def _workers_by_stage(gw: Gateway) -> dict[str, list[WorkerBeat]]:
    workers = live_workers(gw.client, gw.settings.redis_prefix)
    return {stage: [w for w in workers if w.stage == stage] for stage in STAGES}
