"""The `openai` backend: an LLM behind any OpenAI-compatible chat endpoint (vLLM, SGLang, llama.cpp,
Ollama, ...) labels each caption, answering in the JSON schema of prompt.py.

Structured output comes in dialects (docs/llm_servers.md): `json_schema` (vLLM, SGLang, Ollama),
`json_object` + schema (llama.cpp) or `none` (the prompt asks for JSON; an unusable answer is asked
again once). `structured="auto"` finds the server's dialect with the first request (json_schema, then
json_object, then none, moving on when the server refuses the request as invalid) and keeps it for
the labeler's life.

Many requests are in flight at once (a semaphore, `concurrency`); each has a timeout; 429, other 5xx,
timeouts and connection errors are retried with exponential backoff (a Retry-After header wins).
A request the server refuses as invalid (4xx, or a 5xx that says the request is invalid) is not
retried: the run stops, and every caption not yet labelled gets the one message that names the
server, the option and the fix. A caption that fails otherwise, or whose answer does not parse, is
returned with `error` set and no phrases; the others go on. A phrase whose text is not in its
caption is kept and flagged `unmatched`. With a LabelCache, cached captions are not sent and new
answers are kept."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Literal, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from latent_verbalizer.services.categorizer import prompt
from latent_verbalizer.services.categorizer.cache import LabelCache
from latent_verbalizer.services.categorizer.models import MAX_LABELS, CaptionLabels, Phrase
from latent_verbalizer.shared.settings import Settings
from latent_verbalizer.shared.taxonomy import Taxonomy, load_taxonomy

log = logging.getLogger(__name__)
MAX_RETRY_AFTER_S = 30.0
T = TypeVar("T")
Dialect = Literal["json_schema", "json_object", "none"]
PROBE_ORDER: tuple[Dialect, ...] = ("json_schema", "json_object", "none")
# A 5xx whose body says this was not the server failing but the request being refused (llama-cpp-python
# answers an unknown response_format with HTTP 500 "Input should be 'text' or 'json_object'", older
# llama.cpp servers with 500 "response_format type must be one of ...").
_INVALID_BODY = re.compile(r"invalid|not supported|unsupported|validation|unrecognized|not allowed|extra inputs|"
                           r"input should be|must be one of|bad request", re.IGNORECASE)
_FORMAT_STATUSES = (400, 422)  # what a server answers a response_format it does not know


class LLMError(Exception):
    """A request that failed for good; the message is the reason recorded with the caption."""


class LLMStop(LLMError):
    """No later request of this run can pass either: the run stops sending."""


class LLMRefused(LLMStop):
    """The server refused a request as invalid: the same request cannot pass, so nothing is retried."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:300]}")
        self.status = status
        self.about_format = status in _FORMAT_STATUSES or status >= 500


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after_s: float | None = None, unreachable: bool = False) -> None:
        super().__init__(reason)
        self.retry_after_s = retry_after_s
        self.unreachable = unreachable


class _Unreachable(LLMError):
    """Every attempt of a request failed to connect."""


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
        structured: Literal["auto", "json_schema", "json_object", "none"] = "auto",
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
        self.structured = structured
        self.dialect: Dialect | None = None if structured == "auto" else structured  # found by the first request
        self.requests_sent = 0  # HTTP requests made, retries included
        self._stopped: str | None = None  # why this run stopped sending (a refused request)
        self._probing: asyncio.Lock | None = None  # one request at a time while the dialect is unknown

    @classmethod
    def from_settings(cls, settings: Settings) -> OpenAILabeler:
        if not settings.llm_url:
            raise ValueError("the openai backend needs the LLM server's URL: LV_LLM_URL (or --llm-url)")
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
            structured=settings.llm_structured,
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
        if failed := [a for a in answers if isinstance(a, str)]:
            log.warning("phrases not labelled", extra={"failed": len(failed), "reasons": sorted(set(failed))[:3]})
        return [[] if isinstance(a, str) else a for a in answers]

    async def _answers(self, kind: str, texts: Sequence[str], label_one: Callable[..., Awaitable[T]]) -> list[T | str]:
        """Per text its answer, or the reason (str) it has none; cache first, then the LLM."""
        cached = {t: _from_json(kind, a) for t, a in self.cache.get_many(kind, texts).items()} if self.cache else {}
        todo = list(dict.fromkeys(t for t in texts if t not in cached))
        semaphore = asyncio.Semaphore(self.concurrency)
        self._stopped, self._probing = None, asyncio.Lock()

        async def guarded(client: httpx.AsyncClient, text: str) -> T | str:
            async with semaphore:
                if self._stopped:
                    return self._stopped
                try:
                    return await label_one(client, text)
                except LLMStop as e:
                    self._stopped = self._stopped or (self._refusal_message(e) if isinstance(e, LLMRefused) else str(e))
                    return self._stopped
                except LLMError as e:
                    return str(e)

        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        async with httpx.AsyncClient(
            base_url=self.url, timeout=self.timeout_s, limits=limits, headers=headers
        ) as client:
            fresh = dict(zip(todo, await asyncio.gather(*(guarded(client, t) for t in todo)), strict=True))
        failed = sum(isinstance(a, str) for a in fresh.values())
        log.info("llm labelling done", extra={"kind": kind, "cached": len(cached), "sent": len(todo), "failed": failed,
                                              "requests": self.requests_sent, "dialect": self.dialect,
                                              "stopped": self._stopped is not None})
        if self.cache:
            self.cache.set_many(kind, {t: _jsonable(a) for t, a in fresh.items() if not isinstance(a, str)})
        return [cached[t] if t in cached else fresh[t] for t in texts]

    async def _label_caption(self, client: httpx.AsyncClient, caption: str) -> list[Phrase]:
        def parse(content: str) -> list[Phrase]:
            phrases = _validated(_CaptionAnswer, content).phrases
            for phrase in phrases:
                self._check_labels(phrase.labels)
            return phrases

        messages = prompt.caption_messages(caption, self.taxonomy)
        phrases = await self._ask(client, messages, "caption_labels", prompt.caption_schema(self.taxonomy), parse)
        return _flag_unmatched(caption, phrases)

    async def _label_phrase(self, client: httpx.AsyncClient, phrase: str) -> list[str]:
        def parse(content: str) -> list[str]:
            labels = _validated(_PhraseAnswer, content).labels
            self._check_labels(labels)
            return labels

        messages = prompt.phrase_messages(phrase, self.taxonomy)
        return await self._ask(client, messages, "phrase_labels", prompt.phrase_schema(self.taxonomy), parse)

    def _check_labels(self, labels: list[str]) -> None:
        if not 1 <= len(labels) <= MAX_LABELS or not self._allowed.issuperset(labels):
            raise LLMError(f"malformed answer: labels {labels} not 1-{MAX_LABELS} taxonomy labels")

    async def _ask(
        self, client: httpx.AsyncClient, messages: list[dict], name: str, schema: dict, parse: Callable[[str], T]
    ) -> T:
        """The parsed answer. Without structured output an unusable answer is asked again, once: a
        constrained server would give the same answer again."""
        content = await self._complete(client, messages, name, schema)
        try:
            return parse(content)
        except LLMError as e:
            if self.dialect != "none":
                raise
            content = await self._complete(client, [*messages, *prompt.repair_messages(content, str(e))], name, schema)
            return parse(content)

    async def _complete(self, client: httpx.AsyncClient, messages: list[dict], name: str, schema: dict) -> str:
        """The answer's text, in the server's dialect; the first request of an `auto` labeler finds it."""
        if self.dialect is None:
            async with self._probing:
                if self._stopped:  # the probe before this one stopped the run
                    raise LLMStop(self._stopped)
                if self.dialect is None:
                    return await self._probe(client, messages, name, schema)
        return await self._request(client, self._body(messages, name, schema, self.dialect))

    async def _probe(self, client: httpx.AsyncClient, messages: list[dict], name: str, schema: dict) -> str:
        refused = []
        for dialect in PROBE_ORDER:
            try:
                content = await self._request(client, self._body(messages, name, schema, dialect))
            except LLMRefused as e:
                if not e.about_format:
                    raise
                refused.append(f"{dialect}: {e}")
                log.info("llm refused a structured-output dialect", extra={"dialect": dialect, "reason": str(e)})
                continue
            except _Unreachable as e:  # no server: the next request would wait as long again
                raise LLMStop(f"the LLM server at {self.url} cannot be reached ({e}); fix: check that "
                              "it is running and that --llm-url (LV_LLM_URL) points at it") from None
            self.dialect = dialect
            log.info("llm structured output chosen", extra={"url": self.url, "dialect": dialect, "refused": refused})
            return content
        raise LLMStop(f"the LLM server at {self.url} (model {self.model}) refused every structured-output dialect"
                      f" that --llm-structured auto tries ({'; '.join(refused)}); fix: check the server's log and"
                      " --llm-model, and see docs/llm_servers.md for your server's setting")

    def _body(self, messages: list[dict], name: str, schema: dict, dialect: Dialect) -> dict:
        body = {"model": self.model, "messages": messages, "temperature": 0, "max_tokens": self.max_tokens}
        if (response_format := prompt.response_format(dialect, name, schema)) is not None:
            body["response_format"] = response_format
        return body

    async def _request(self, client: httpx.AsyncClient, body: dict) -> str:
        """One request, retrying what may pass on a later try."""
        for attempt in range(self.retries + 1):
            try:
                return await self._post(client, body)
            except _Retryable as e:
                if attempt == self.retries:
                    raise (_Unreachable if e.unreachable else LLMError)(f"{e} (after {attempt + 1} attempts)") from None
                delay = e.retry_after_s if e.retry_after_s is not None else self.backoff_s * 2**attempt
                await asyncio.sleep(min(delay, MAX_RETRY_AFTER_S))
        raise AssertionError("unreachable")

    def _refusal_message(self, e: LLMRefused) -> str:
        """The one message of a run the server stopped: the server, the option and the fix."""
        if e.status in (401, 403):
            fix = "set LV_LLM_API_KEY to a key this server accepts"
        elif e.status == 404:
            fix = f"check --llm-url (the API base, ending in /v1) and --llm-model (GET {self.url}/models lists them)"
        else:
            fix = ("pass --llm-structured auto, or the value your server needs (LV_LLM_STRUCTURED; "
                   "docs/llm_servers.md)")
        option = self.dialect or self.structured
        return (f"the LLM server at {self.url} (model {self.model}) refused the request as invalid ({e}) with"
                f" --llm-structured {option}; fix: {fix}")

    async def _post(self, client: httpx.AsyncClient, body: dict) -> str:
        self.requests_sent += 1
        try:
            response = await client.post("/chat/completions", json=body)
        except httpx.TimeoutException:
            raise _Retryable(f"timeout after {self.timeout_s} s") from None
        except httpx.TransportError as e:
            raise _Retryable(f"connection error: {type(e).__name__}: {e}", unreachable=True) from None
        status = response.status_code
        if status >= 500 and _INVALID_BODY.search(response.text):
            raise LLMRefused(status, response.text)
        if status in (408, 429) or status >= 500:
            raise _Retryable(f"HTTP {status}", _retry_after(response))
        if status >= 400:
            raise LLMRefused(status, response.text)
        try:
            return response.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise LLMError(f"malformed response: {response.text[:200]}") from None


def _validated(model: type[BaseModel], content: str):
    try:
        return model.model_validate_json(content)
    except ValidationError as e:
        raise LLMError(f"malformed answer: {e.errors()[0]['msg']}: {content[:200]}") from None


def _flag_unmatched(caption: str, phrases: list[Phrase]) -> list[Phrase]:
    """Flag the phrases whose text (case and spacing aside) is not in the caption."""
    text = " ".join(caption.lower().split())
    for phrase in phrases:
        if " ".join(phrase.text.lower().split()) not in text:
            phrase.unmatched = True
    return phrases


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return float(response.headers["retry-after"])
    except (KeyError, ValueError):
        return None


def _jsonable(answer: list[Phrase] | list[str]) -> list:
    return [a.model_dump() if isinstance(a, Phrase) else a for a in answer]


def _from_json(kind: str, value: list) -> list[Phrase] | list[str]:
    return [Phrase.model_validate(v) for v in value] if kind == "caption" else value
