"""The gateway: FastAPI app over Redis (job records, queues) and the artifact store. It never loads a
model: it validates and splits submissions, queues chunks, answers status and serves outputs.
OpenAPI at /docs; the web viewer (static/) at /."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import redis
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.routing import Match, Mount

from latent_verbalizer.services.chain.context import Context
from latent_verbalizer.services.gateway.backends import LLMProbe
from latent_verbalizer.services.gateway.deps import Gateway, require_api_key
from latent_verbalizer.services.gateway.housekeeper import Housekeeper
from latent_verbalizer.services.gateway.metrics import registry
from latent_verbalizer.services.gateway.model_info import describe_model
from latent_verbalizer.services.gateway.routers import attributions, health, jobs
from latent_verbalizer.services.gateway.schemas import ErrorOut, FieldError, ModelInfo, errors
from latent_verbalizer.shared.artifacts import ArtifactStore
from latent_verbalizer.shared.jobs import JobStore
from latent_verbalizer.shared.queue import connect, redis_url
from latent_verbalizer.shared.settings import Settings, get_settings

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
REDIS_TIMEOUT_S = 5.0  # no request waits longer on Redis
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")  # what a 405's Allow header may list


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    model = describe_model(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = connect(settings, timeout_s=REDIS_TIMEOUT_S)
        job_store = JobStore(client, settings.job_ttl_s, settings.redis_prefix)
        artifacts = ArtifactStore(settings.artifact_dir)
        llm = LLMProbe(settings.llm_url, settings.llm_model, settings.llm_api_key) if settings.llm_url else None
        app.state.gateway = Gateway(settings, client, job_store, artifacts, model, llm)
        app.state.metrics = registry(client, settings.redis_prefix)
        housekeeper = Housekeeper(Context(settings, client, job_store, artifacts))
        housekeeper.start()
        log.info("gateway ready", extra={"redis": redis_url(settings), "prefix": settings.redis_prefix,
                                         "artifacts": str(settings.artifact_dir)})
        yield
        housekeeper.stop()
        client.close()

    app = FastAPI(title="latent-verbalizer", version="0.1.0", lifespan=lifespan, responses=errors(500),
                  description="Caption every layer of a CoCa vision encoder: submit images, follow the job, "
                              "read each image's captions layer by layer.")
    app.include_router(health.router)
    # With API keys, /v1 takes a bearer key, and the document says so (security scheme, 401 on every route).
    auth = {"dependencies": [Depends(require_api_key)], "responses": errors(401)} if settings.api_keys else {}
    app.include_router(jobs.router, **auth)
    app.include_router(attributions.router, **auth)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(redis.RedisError, _redis_error)
    app.add_exception_handler(Exception, _internal_error)
    if (STATIC_DIR / "index.html").is_file():
        app.mount("/", StaticFiles(directory=STATIC_DIR, html=True), name="viewer")
    else:
        app.add_api_route("/", _no_viewer, include_in_schema=False)
    app.openapi = lambda: _document(app, model)
    return app


def _document(app: FastAPI, model: ModelInfo) -> dict[str, Any]:
    """FastAPI's OpenAPI document, made once, with what it cannot know: the error model and the served model."""
    if app.openapi_schema is None:
        doc = FastAPI.openapi(app)  # caches it in app.openapi_schema: the edits below stay
        _one_error_model(doc)
        _model_bounds(doc, model)
        _job_links(doc)
    return app.openapi_schema


def _one_error_model(doc: dict[str, Any]) -> None:
    """Every error status in the document answers ErrorOut, as the handlers below make it: FastAPI's own 422
    (HTTPValidationError) and a status declared with a description alone get it."""
    body = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}}
    for operations in doc["paths"].values():
        for operation in operations.values():
            for status, answer in operation["responses"].items():
                if status[0] in "45":  # 4xx, 5xx, 4XX, 5XX
                    answer["content"] = body
    for name in ("HTTPValidationError", "ValidationError"):
        doc["components"]["schemas"].pop(name, None)


def _job_links(doc: dict[str, Any]) -> None:
    """POST /v1/jobs's 202 links to every operation on the job it made (OpenAPI links: what a client, or
    schemathesis' stateful tests, may call next with its `id`)."""
    created = doc["paths"]["/v1/jobs"]["post"]["responses"]["202"]
    job_id = {"job_id": "$response.body#/id"}
    created["links"] = {
        operation["operationId"]: {"operationId": operation["operationId"], "parameters": job_id}
        for path, operations in doc["paths"].items() if path.startswith("/v1/jobs/{job_id}")
        for operation in operations.values()
    }


def _model_bounds(doc: dict[str, Any], model: ModelInfo) -> None:
    """The job options' bounds that come from the served model (jobs.py refuses what is outside them): which
    blocks `layers` may name, each once, and how long `decode.seq_len` may be."""
    schemas = doc["components"]["schemas"]
    if model.layers is not None:
        layers = next(s for s in schemas["JobOptions"]["properties"]["layers"]["anyOf"] if s.get("type") == "array")
        layers.update(maxItems=model.layers, uniqueItems=True)
        layers["items"].update(minimum=-model.layers, maximum=model.layers - 1)
    if model.max_seq_len is not None:
        decode = schemas["DecodeParams"]["properties"]
        decode["seq_len"]["maximum"] = min(decode["seq_len"]["maximum"], model.max_seq_len)
        min_len = next(s for s in decode["min_seq_len"]["anyOf"] if s.get("type") == "integer")  # or null
        min_len["maximum"] = decode["seq_len"]["maximum"] - 1


# Every error answer is an ErrorOut, whoever raised it: request validation, a handler, Starlette's routing
# or the viewer's static files.


def _error(status: int, detail: str, field: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(ErrorOut(detail=detail, field=field).model_dump(exclude_none=True), status_code=status,
                        headers=headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return _error(422, f"{where}: {first['msg']}", where)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    headers = dict(exc.headers or {})
    detail = str(exc.detail)
    if exc.status_code == 405:
        allowed = _allowed_methods(request)
        headers["Allow"] = ", ".join(allowed)
        detail = f"{request.method} is not allowed on {request.url.path}: it takes {', '.join(allowed)}"
    return _error(exc.status_code, detail, exc.field if isinstance(exc, FieldError) else None, headers)


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route of the path takes (Starlette names only the first route's, and the viewer
    mounted at / none); a path that only the viewer serves takes GET and HEAD."""
    routes = [route for route in request.app.routes if not isinstance(route, Mount)]
    allowed = [method for method in METHODS
               if any(route.matches({**request.scope, "method": method})[0] == Match.FULL for route in routes)]
    return allowed or ["GET", "HEAD"]


async def _redis_error(request: Request, exc: redis.RedisError) -> JSONResponse:
    log.error("redis error", extra={"path": request.url.path, "error": str(exc)})
    return _error(503, f"job store unavailable, try again: {exc}")


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", extra={"path": request.url.path})
    return _error(500, "internal error (logged by the gateway)")


async def _no_viewer() -> JSONResponse:
    return _error(404, "the web viewer is not installed here; the API is at /docs")
