"""Liveness, readiness and Prometheus metrics; no API key.

/readyz is the service's readiness: Redis and the artifact store reachable, and every stage with a
ready (or busy) worker for the served model (shared.heartbeat). `?scope=gateway` leaves the workers
out: the gateway's own probe (Kubernetes), so that a gateway whose worker pools are scaled to zero
still takes the jobs that wake them."""

from __future__ import annotations

from typing import Annotated, Literal

import redis
from fastapi import APIRouter, HTTPException, Query, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from latent_verbalizer.services.gateway.deps import gateway
from latent_verbalizer.services.gateway.schemas import errors

router = APIRouter(tags=["health"])

Scope = Annotated[Literal["service", "gateway"], Query(
    description="service: also a ready worker for every stage; gateway: Redis and the artifact store only")]


@router.get("/healthz", summary="The gateway process answers")
def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", summary="Ready for jobs: Redis, the artifact store, and a ready worker for every stage",
            responses={503: {"description": "not ready; `detail` names what is missing (a stage's worker, Redis, "
                                            "the artifact store)"}})
def readyz(request: Request, scope: Scope = "service") -> dict:
    gw = gateway(request)
    try:
        gw.client.ping()
    except redis.RedisError as e:
        raise HTTPException(503, f"redis unreachable: {e}") from e
    try:
        gw.store.check_writable()
    except OSError as e:
        raise HTTPException(503, f"artifact store not writable: {e}") from e
    if scope == "service" and (missing := gw.unserved()):
        raise HTTPException(503, "not ready: " + "; ".join(missing.values()))
    return {"status": "ready"}


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"description": "Prometheus text format", "content": {"text/plain": {}}}, **errors(503)})
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics), media_type=CONTENT_TYPE_LATEST)
