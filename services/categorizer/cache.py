"""Label cache in Redis: the LLM's answer for a caption, keyed by (model, prompt version, caption), so
a caption is sent to the LLM once across jobs and workers. One round trip per batch (MGET / pipeline)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping

import redis

from latent_verbalizer.shared.keys import Keys
from latent_verbalizer.shared.settings import get_settings


class LabelCache:
    def __init__(self, client: redis.Redis, model: str, prompt_version: str, ttl_s: int | None = None) -> None:
        self.client = client
        self.model = model
        self.prompt_version = prompt_version
        self.ttl_s = ttl_s

    @classmethod
    def from_url(cls, url: str, model: str, prompt_version: str, ttl_s: int | None = None) -> LabelCache:
        return cls(redis.Redis.from_url(url), model, prompt_version, ttl_s)

    def key(self, kind: str, text: str) -> str:
        """kind: what was labelled ("caption" or "phrase")."""
        digest = hashlib.sha256("\n".join((self.model, self.prompt_version, text)).encode()).hexdigest()
        return Keys(get_settings().redis_prefix).labels(kind, digest)

    def get_many(self, kind: str, texts: Iterable[str]) -> dict[str, object]:
        """The cached answers (JSON values) of those texts that have one."""
        texts = list(texts)
        if not texts:
            return {}
        values = self.client.mget([self.key(kind, t) for t in texts])
        return {t: json.loads(v) for t, v in zip(texts, values, strict=True) if v is not None}

    def set_many(self, kind: str, answers: Mapping[str, object]) -> None:
        if not answers:
            return
        with self.client.pipeline(transaction=False) as pipe:
            for text, answer in answers.items():
                pipe.set(self.key(kind, text), json.dumps(answer), ex=self.ttl_s)
            pipe.execute()
