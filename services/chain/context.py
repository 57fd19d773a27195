"""What the chain's steps work with: the settings, Redis, the job records and the artifact store (made
once per process: services.chain.tasks.context in a worker, the app's start-up in the gateway)."""

from __future__ import annotations

from dataclasses import dataclass

import redis

from latent_verbalizer.shared.artifacts import ArtifactStore
from latent_verbalizer.shared.jobs import JobStore
from latent_verbalizer.shared.settings import Settings


@dataclass
class Context:
    settings: Settings
    client: redis.Redis
    jobs: JobStore
    store: ArtifactStore
