"""Which categorizer backends this server can serve, and whether its LLM server answers.

embedded: always (offline, in the categorizer worker). openai: only with an LLM server configured
(LV_LLM_URL, or `serve --llm-url`); whether that server answers is a GET {llm_url}/models with a short
timeout, remembered for a few seconds so that polling clients do not hammer it."""

from __future__ import annotations

import threading
import time

import httpx

from latent_verbalizer.services.gateway.schemas import LLMStatus
from latent_verbalizer.shared.settings import Settings

PROBE_TIMEOUT_S = 2.0
PROBE_TTL_S = 5.0


def usable_backends(settings: Settings) -> list[str]:
    return ["embedded", "openai"] if settings.llm_url else ["embedded"]


def unusable_reason(settings: Settings, backend: str) -> str | None:
    """Why this server cannot label with `backend`; None when it can."""
    if backend == "openai" and not settings.llm_url:
        return ("the openai backend is not available on this server: no LLM server is configured (LV_LLM_URL, or"
                " `serve --llm-url`); use the embedded backend")
    return None


class LLMProbe:
    """The LLM server's reachability, checked at most every PROBE_TTL_S (thread-safe)."""

    def __init__(self, url: str, model: str, api_key: str | None) -> None:
        self.url = url.rstrip("/")
        self.model = model
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._lock = threading.Lock()
        self._status: LLMStatus | None = None

    def status(self) -> LLMStatus:
        with self._lock:
            if self._status is None or time.time() - self._status.checked_at > PROBE_TTL_S:
                self._status = self._probe()
            return self._status

    def _probe(self) -> LLMStatus:
        try:
            response = httpx.get(f"{self.url}/models", headers=self.headers, timeout=PROBE_TIMEOUT_S)
            detail = None if response.status_code == 200 else f"GET /models answered HTTP {response.status_code}"
        except httpx.HTTPError as e:
            detail = f"GET /models failed: {type(e).__name__}: {e}"
        return LLMStatus(url=self.url, model=self.model, reachable=detail is None, detail=detail,
                         checked_at=time.time())
