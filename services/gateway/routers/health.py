"""Liveness, readiness (Redis and the artifact store reachable) and Prometheus metrics; no API key."""

from __future__ import annotations

import redis
from fastapi import APIRouter, HTTPException, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.gateway.deps import gateway

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The gateway process answers")
def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", summary="Redis and the artifact store are reachable")
def readyz(request: Request) -> dict:
    gw = gateway(request)
    try:
        gw.client.ping()
    except redis.RedisError as e:
        raise HTTPException(503, f"redis unreachable: {e}") from e
    try:
        gw.store.check_writable()
    except OSError as e:
        raise HTTPException(503, f"artifact store not writable: {e}") from e
    return {"status": "ready"}


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics), media_type=CONTENT_TYPE_LATEST)
