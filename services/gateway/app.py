"""The gateway: FastAPI app over Redis (job records, queues) and the artifact store. It never loads a
model: it validates and splits submissions, queues chunks, answers status and serves outputs.
OpenAPI at /docs; the web viewer (static/) at /."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

from services.gateway.backends import LLMProbe
from services.gateway.deps import Gateway
from services.gateway.housekeeper import Housekeeper
from services.gateway.metrics import registry
from services.gateway.model_info import describe_model
from services.gateway.routers import health, jobs
from shared.artifacts import ArtifactStore
from shared.jobs import JobStore
from shared.queue import connect, redis_url
from shared.settings import Settings, get_settings

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
REDIS_TIMEOUT_S = 5.0  # no request waits longer on Redis


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = connect(settings, timeout_s=REDIS_TIMEOUT_S)
        job_store = JobStore(client, settings.job_ttl_s, settings.redis_prefix)
        artifacts = ArtifactStore(settings.artifact_dir)
        llm = LLMProbe(settings.llm_url, settings.llm_model, settings.llm_api_key) if settings.llm_url else None
        app.state.gateway = Gateway(settings, client, job_store, artifacts, describe_model(settings), llm)
        app.state.metrics = registry(client, settings.redis_prefix)
        housekeeper = Housekeeper(client, job_store, artifacts, settings.job_ttl_s, settings.redis_prefix)
        housekeeper.start()
        log.info("gateway ready", extra={"redis": redis_url(settings), "prefix": settings.redis_prefix,
                                         "artifacts": str(settings.artifact_dir)})
        yield
        housekeeper.stop()
        client.close()

    app = FastAPI(title="latent-verbalizer", version="0.1.0", lifespan=lifespan,
                  description="Caption every layer of a CoCa vision encoder: submit images, follow the job, "
                              "read each image's captions layer by layer.")
    app.include_router(health.router)
    app.include_router(jobs.router)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(redis.RedisError, _redis_error)
    app.add_exception_handler(Exception, _internal_error)
    if (STATIC_DIR / "index.html").is_file():
        app.mount("/", StaticFiles(directory=STATIC_DIR, html=True), name="viewer")
    else:
        app.add_api_route("/", _no_viewer, include_in_schema=False)
    return app


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return JSONResponse({"detail": f"{where}: {first['msg']}"}, status_code=422)


async def _redis_error(request: Request, exc: redis.RedisError) -> JSONResponse:
    log.error("redis error", extra={"path": request.url.path, "error": str(exc)})
    return JSONResponse({"detail": f"job store unavailable, try again: {exc}"}, status_code=503)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", extra={"path": request.url.path})
    return JSONResponse({"detail": "internal error (logged by the gateway)"}, status_code=500)


async def _no_viewer() -> JSONResponse:
    return JSONResponse({"detail": "the web viewer is not installed here; the API is at /docs"}, status_code=404)
