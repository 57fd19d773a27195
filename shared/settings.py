"""All settings in one place. Every field is read from an environment variable `LV_<FIELD>`
(e.g. LV_DEVICE=cuda, LV_REDIS_URL=redis://redis:6379/0); CLI flags override them per run."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# The offline demo model the project trains and ships (shared/weights/); the default everywhere.
DEMO_MODEL = "coca_synth_demo"
DEMO_PRETRAINED = "synth-v2"
# The offline LLaVA-architecture demo model (shared/weights/llava_synth_demo/, a save_pretrained directory).
LLAVA_DEMO_MODEL = "llava_synth_demo"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LV_", extra="ignore")

    # --- model (encoder and decoder stages) ---
    model: str = Field(DEMO_MODEL, description="an open_clip CoCa name, a project model (coca_synth_demo,"
                                               " llava_synth_demo), a Hugging Face id org/name or a directory"
                                               " written by save_pretrained (services.families.naming)")
    family: str | None = Field(None, description="coca | llava | blip: forces the model's family; unset: from the"
                                                 " name (a directory's config.json model_type)")
    prompt: str | None = Field(None, description="LLaVA's captioning prompt / BLIP's text prefix; unset: the"
                                                 " family's default (CoCa takes none)")
    pretrained: str | None = Field(
        None, description="open_clip pretrained tag, project tag, checkpoint file path, or 'none' (random weights);"
                          " unset: the model's own default (shared.pretrained)"
    )
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    dtype: str = Field("fp32", description="fp32 | bf16 | fp16")
    model_cache: Path | None = Field(None, description="where open_clip keeps downloaded weights")
    cache_dir: Path = Field(
        Path.home() / ".cache" / "latent-verbalizer", description="derived data kept across runs: the embedded"
        " labeler's MiniLM embeddings, the gray image's captions (grounding)"
    )

    # --- batching ---
    encode_batch: int = Field(32, description="images per vision-tower forward")
    decode_batch: int = Field(256, description="caption rows (images x layers) decoded together")

    # --- LLaVA family (services/families/llava.py) ---
    rescale_layers: bool = Field(False, description="LLaVA: rescale each layer's vision tokens to the feature"
                                                    " layer's mean token norm before the projector")

    # --- grounding (issue 14) ---
    grounding_gallery: int = Field(1000, ge=2, description="most images a caption's retrieval rank is taken"
                                                           " among (a fixed-seed sample, own image included)")

    # --- categorizer ---
    categorizer_backend: str = Field("embedded", description="embedded (offline, CPU) | openai (LLM server)")
    llm_url: str | None = Field(
        None, description="OpenAI-compatible API base URL (vLLM); unset: the openai backend is unavailable"
    )
    llm_model: str = Field("meta-llama/Llama-3.1-8B-Instruct", description="model name the server serves")
    llm_api_key: str | None = Field(None, description="sent as a Bearer token when set")
    llm_concurrency: int = Field(64, ge=1, description="requests in flight")
    llm_timeout_s: float = Field(60.0, gt=0, description="per request")
    llm_retries: int = Field(4, ge=0, description="retries on 429, 5xx, timeouts and connection errors")
    llm_backoff_s: float = Field(0.5, ge=0, description="first retry delay; doubles each retry")
    llm_max_tokens: int = Field(1024, ge=16, description="answer length limit per caption")
    llm_structured: Literal["auto", "json_schema", "json_object", "none"] = Field(
        "auto", description="the server's structured-output dialect (docs/llm_servers.md); auto: found by the first"
                            " request")
    redis_url: str | None = Field(None, description="Redis (queue, job records, label cache); e.g. redis://redis:6379/0")
    label_cache_ttl_s: int | None = Field(30 * 24 * 3600, description="label cache entry lifetime; None: forever")

    # --- service: gateway, queue, workers (issue 5). redis_url above is shared: the service uses
    # redis://127.0.0.1:6379/0 when it is unset (shared.queue.redis_url); `serve` starts a private one. ---
    redis_prefix: str = Field("lv:", min_length=1, description="prefix of every Redis key and RQ queue name of"
                                                               " this install: two installs on one Redis differ")
    artifact_dir: Path = Field(Path("./runs/artifacts"), description="artifact store: a directory all services share")
    data_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list, description="comma-separated dirs that server-side shards may come from"
    )
    allow_url_shards: bool = Field(False, description="accept http(s):// shard URLs (the gateway downloads them)")
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated Bearer keys required on /v1; empty: no auth"
    )
    host: str = Field("127.0.0.1", description="gateway bind address")
    port: int = Field(8000, description="gateway port")
    chunk_size: int = Field(16, ge=1, description="images per chunk (one task per stage)")
    max_upload_bytes: int = Field(512 * 2**20, ge=1, description="a job's input bytes (uploads or shards)")
    max_files: int = Field(1000, ge=1, description="files (or shard paths) per job")
    max_image_pixels: int = Field(64_000_000, ge=1, description="larger images are refused (decompression bombs)")
    keep_artifacts: bool = Field(False, description="keep a job's inputs and latents after it ends")
    job_ttl_s: int = Field(7 * 24 * 3600, ge=60, description="job records and outputs are deleted after this")
    lease_s: int = Field(30, ge=2, description="a worker renews its hold on a chunk every lease_s/3; a killed"
                                               " worker's chunk is retried once its lease lapses")
    task_retries: int = Field(3, ge=0, description="retries per chunk task (crashes, transient errors)")
    task_timeout_s: int = Field(3600, ge=1, description="longest a chunk task may run")

    @field_validator("data_roots", "api_keys", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    # --- logging ---
    log_level: str = Field("INFO")
    log_json: bool = Field(False, description="one JSON object per log line (services)")


@lru_cache
def get_settings() -> Settings:
    return Settings()
