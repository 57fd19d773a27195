"""All settings in one place. Every field is read from an environment variable `LV_<FIELD>`
(e.g. LV_DEVICE=cuda, LV_REDIS_URL=redis://redis:6379/0); CLI flags override them per run."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

# The offline demo model the project trains and ships (shared/weights/); the default everywhere.
DEMO_MODEL = "coca_synth_demo"
DEMO_PRETRAINED = "synth-v1"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LV_", extra="ignore")

    # --- model (encoder and decoder stages) ---
    model: str = Field(DEMO_MODEL, description="open_clip CoCa architecture name")
    pretrained: str | None = Field(
        DEMO_PRETRAINED, description="open_clip pretrained tag, project tag, or checkpoint file path"
    )
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    dtype: str = Field("fp32", description="fp32 | bf16 | fp16")
    model_cache: Path | None = Field(None, description="where open_clip keeps downloaded weights")

    # --- batching ---
    encode_batch: int = Field(32, description="images per vision-tower forward")
    decode_batch: int = Field(256, description="caption rows (images x layers) decoded together")

    # --- logging ---
    log_level: str = Field("INFO")
    log_json: bool = Field(False, description="one JSON object per log line (services)")


@lru_cache
def get_settings() -> Settings:
    return Settings()
