"""What request handlers depend on: the gateway's state (settings, Redis, job records, artifact store,
model shape, the LLM server's probe), made once at start-up, and the optional API-key check."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

import redis
from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from latent_verbalizer.services.chain.context import Context
from latent_verbalizer.services.gateway.backends import LLMProbe
from latent_verbalizer.services.gateway.schemas import ModelInfo
from latent_verbalizer.shared.artifacts import ArtifactStore
from latent_verbalizer.shared.heartbeat import live_workers, unserved
from latent_verbalizer.shared.jobs import STAGES, JobRecord, JobStatus, JobStore, is_job_id
from latent_verbalizer.shared.settings import Settings


@dataclass
class Gateway:
    settings: Settings
    client: redis.Redis
    jobs: JobStore
    store: ArtifactStore
    model: ModelInfo
    llm: LLMProbe | None  # None: no LLM server configured

    @property
    def chain(self) -> Context:
        """What the job chain's steps work with (services.chain)."""
        return Context(self.settings, self.client, self.jobs, self.store)

    def unserved(self, stages: tuple[str, ...] = STAGES) -> dict[str, str]:
        """Per stage with no ready or busy worker for the served model, why."""
        return unserved(live_workers(self.client, self.settings.redis_prefix), self.settings, stages)


def gateway(request: Request) -> Gateway:
    return request.app.state.gateway


BEARER = HTTPBearer(auto_error=False, description="one of the server's API keys (LV_API_KEYS)")


async def require_api_key(request: Request,
                          bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> None:
    """`Authorization: Bearer <one of the keys>`: the app puts this on /v1 when LV_API_KEYS is set."""
    keys = gateway(request).settings.api_keys
    token = bearer.credentials if bearer else ""
    if not any(hmac.compare_digest(token.encode(), k.encode()) for k in keys):
        raise HTTPException(401, "missing or invalid API key: send Authorization: Bearer <key>",
                            headers={"WWW-Authenticate": "Bearer"})


def find_job(job_id: str, request: Request) -> JobRecord:
    job = gateway(request).jobs.get(job_id) if is_job_id(job_id) else None
    if job is None:
        raise HTTPException(404, f"no job {job_id!r} (unknown, or expired)")
    return job


Job = Annotated[JobRecord, Depends(find_job)]  # a route's job, named by the path's {job_id}, or 404


def require_succeeded(job: JobRecord, partial_ok: bool = False) -> None:
    """A job's outputs are served once it has succeeded (`partial_ok`: or was cancelled, whose results hold
    what it finished): 409 with its status (and error) before."""
    if job.status == JobStatus.succeeded or (partial_ok and job.status == JobStatus.cancelled):
        return
    if job.status == JobStatus.cancelled:
        raise HTTPException(409, f"job is cancelled: of its outputs only the finished captions are kept, at"
                                 f" /v1/jobs/{job.id}/results (partial)")
    reason = f": {job.error}" if job.error else ""
    raise HTTPException(409, f"job is {job.status.value}{reason}; outputs exist once it has succeeded")
