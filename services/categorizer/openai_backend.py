"""The `openai` backend: an LLM behind any OpenAI-compatible chat endpoint (first of all vLLM serving
Llama-3.1-8B/70B-Instruct) labels each caption, answering in the JSON schema of prompt.py.

Many requests are in flight at once (a semaphore, `concurrency`); each has a timeout; 429, 5xx,
timeouts and connection errors are retried with exponential backoff (a Retry-After header wins).
A caption that still fails, or whose answer does not parse, is returned with `error` set and no
phrases; the others go on. With a LabelCache, cached captions are not sent and new answers are kept."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from services.categorizer import prompt
from services.categorizer.cache import LabelCache
from services.categorizer.models import MAX_LABELS, CaptionLabels, Phrase
from shared.settings import Settings
from shared.taxonomy import Taxonomy, load_taxonomy

log = logging.getLogger(__name__)
MAX_RETRY_AFTER_S = 30.0
T = TypeVar("T")


class LLMError(Exception):
    """A request that failed for good; the message is the reason recorded with the caption."""


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after_s = retry_after_s


class _CaptionAnswer(BaseModel):
    phrases: list[Phrase]


class _PhraseAnswer(BaseModel):
    labels: list[str]


class OpenAILabeler:
    def __init__(
        self,
        url: str,
        model: str,
        *,
        api_key: str | None = None,
        concurrency: int = 64,
        timeout_s: float = 60.0,
        retries: int = 4,
        backoff_s: float = 0.5,
        max_tokens: int = 1024,
        cache: LabelCache | None = None,
        taxonomy: Taxonomy | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.model = model
        self.api_key = api_key
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_tokens = max_tokens
        self.cache = cache
        self.taxonomy = taxonomy or load_taxonomy()
        self._allowed = frozenset(self.taxonomy.labels)

    @classmethod
    def from_settings(cls, settings: Settings) -> OpenAILabeler:
        cache = None
        if settings.redis_url:
            cache = LabelCache.from_url(
                settings.redis_url, settings.llm_model, prompt.PROMPT_VERSION, settings.label_cache_ttl_s
            )
        return cls(
            settings.llm_url,
            settings.llm_model,
            api_key=settings.llm_api_key,
            concurrency=settings.llm_concurrency,
            timeout_s=settings.llm_timeout_s,
            retries=settings.llm_retries,
            backoff_s=settings.llm_backoff_s,
            max_tokens=settings.llm_max_tokens,
            cache=cache,
        )

    # --- the Labeler interface (synchronous, for workers and the CLI) ---

    def label_captions(self, captions: Sequence[str]) -> list[CaptionLabels]:
        return asyncio.run(self.alabel_captions(captions))

    def label_phrases(self, phrases: Sequence[str]) -> list[list[str]]:
        """Each phrase's labels; an empty list for a phrase whose request failed (logged)."""
        return asyncio.run(self.alabel_phrases(phrases))

    # --- async versions, for callers that already run an event loop ---

    async def alabel_captions(self, captions: Sequence[str]) -> list[CaptionLabels]:
        answers = await self._answers("caption", captions, self._label_caption)
        return [
            CaptionLabels(caption=c, error=a) if isinstance(a, str) else CaptionLabels(caption=c, phrases=a)
            for c, a in zip(captions, answers, strict=True)
        ]

    async def alabel_phrases(self, phrases: Sequence[str]) -> list[list[str]]:
        answers = await self._answers("phrase", phrases, self._label_phrase)
        for phrase, answer in zip(phrases, answers, strict=True):
            if isinstance(answer, str):
                log.warning("phrase not labelled", extra={"phrase": phrase, "reason": answer})
        return [[] if isinstance(a, str) else a for a in answers]

    async def _answers(self, kind: str, texts: Sequence[str], label_one: Callable[..., Awaitable[T]]) -> list[T | str]:
        """Per text its answer, or the reason (str) it has none; cache first, then the LLM."""
        cached = {t: _from_json(kind, a) for t, a in self.cache.get_many(kind, texts).items()} if self.cache else {}
        todo = list(dict.fromkeys(t for t in texts if t not in cached))
        semaphore = asyncio.Semaphore(self.concurrency)

        async def guarded(client: httpx.AsyncClient, text: str) -> T | str:
            async with semaphore:
                try:
                    return await label_one(client, text)
                except LLMError as e:
                    return str(e)

        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        async with httpx.AsyncClient(
            base_url=self.url, timeout=self.timeout_s, limits=limits, headers=headers
        ) as client:
            fresh = dict(zip(todo, await asyncio.gather(*(guarded(client, t) for t in todo)), strict=True))
        failed = sum(isinstance(a, str) for a in fresh.values())
        log.info("llm labelling done", extra={"kind": kind, "cached": len(cached), "sent": len(todo), "failed": failed})
        if self.cache:
            self.cache.set_many(kind, {t: _jsonable(a) for t, a in fresh.items() if not isinstance(a, str)})
        return [cached[t] if t in cached else fresh[t] for t in texts]

    async def _label_caption(self, client: httpx.AsyncClient, caption: str) -> list[Phrase]:
        schema = prompt.caption_schema(self.taxonomy)
        content = await self._complete(
            client, prompt.caption_messages(caption, self.taxonomy), "caption_labels", schema
        )
        answer = _validated(_CaptionAnswer, content)
        for phrase in answer.phrases:
            self._check_labels(phrase.labels)
        return answer.phrases

    async def _label_phrase(self, client: httpx.AsyncClient, phrase: str) -> list[str]:
        schema = prompt.phrase_schema(self.taxonomy)
        content = await self._complete(client, prompt.phrase_messages(phrase, self.taxonomy), "phrase_labels", schema)
        labels = _validated(_PhraseAnswer, content).labels
        self._check_labels(labels)
        return labels

    def _check_labels(self, labels: list[str]) -> None:
        if not 1 <= len(labels) <= MAX_LABELS or not self._allowed.issuperset(labels):
            raise LLMError(f"malformed answer: labels {labels} not 1-{MAX_LABELS} taxonomy labels")

    async def _complete(self, client: httpx.AsyncClient, messages: list[dict], name: str, schema: dict) -> str:
        """The answer's text, retrying what may pass on a later try."""
        body = {
            "model": self.model,
            "messages": messages,
            "temperature": 0,
            "max_tokens": self.max_tokens,
            "response_format": prompt.response_format(name, schema),
        }
        for attempt in range(self.retries + 1):
            try:
                return await self._post(client, body)
            except _Retryable as e:
                if attempt == self.retries:
                    raise LLMError(f"{e} (after {attempt + 1} attempts)") from None
                delay = e.retry_after_s if e.retry_after_s is not None else self.backoff_s * 2**attempt
                await asyncio.sleep(min(delay, MAX_RETRY_AFTER_S))
        raise AssertionError("unreachable")

    async def _post(self, client: httpx.AsyncClient, body: dict) -> str:
        try:
            response = await client.post("/chat/completions", json=body)
        except httpx.TimeoutException:
            raise _Retryable(f"timeout after {self.timeout_s} s") from None
        except httpx.TransportError as e:
            raise _Retryable(f"connection error: {type(e).__name__}: {e}") from None
        if response.status_code == 429 or response.status_code >= 500:
            raise _Retryable(f"HTTP {response.status_code}", _retry_after(response))
        if response.status_code >= 400:
            raise LLMError(f"HTTP {response.status_code}: {response.text[:200]}")
        try:
            return response.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise LLMError(f"malformed response: {response.text[:200]}") from None


def _validated(model: type[BaseModel], content: str):
    try:
        return model.model_validate_json(content)
    except ValidationError as e:
        raise LLMError(f"malformed answer: {e.errors()[0]['msg']}: {content[:200]}") from None


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return float(response.headers["retry-after"])
    except (KeyError, ValueError):
        return None


def _jsonable(answer: list[Phrase] | list[str]) -> list:
    return [a.model_dump() if isinstance(a, Phrase) else a for a in answer]


def _from_json(kind: str, value: list) -> list[Phrase] | list[str]:
    return [Phrase.model_validate(v) for v in value] if kind == "caption" else value
