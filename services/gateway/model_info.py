"""The served model's shape, read from its open_clip config file without importing torch (the gateway
stays light): how many layers a job may ask for, how long a caption may be, and its input's patch grid."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from latent_verbalizer import shared
from latent_verbalizer.services.gateway.schemas import ModelInfo
from latent_verbalizer.shared.pretrained import DEMO_NOTE, resolve_pretrained
from latent_verbalizer.shared.settings import DEMO_MODEL, Settings

PROJECT_CONFIGS = Path(shared.__file__).parent / "model_configs"  # as shared.models.CONFIG_DIR


def describe_model(settings: Settings) -> ModelInfo:
    config = _config(settings.model)
    return ModelInfo(
        name=settings.model,
        pretrained=resolve_pretrained(settings.model, settings.pretrained),
        note=DEMO_NOTE if settings.model == DEMO_MODEL else None,
        layers=config["vision_cfg"]["layers"] if config else None,
        max_seq_len=config["text_cfg"].get("context_length", 77) if config else None,
        image_size=_pair(config["vision_cfg"]["image_size"]) if config else None,
        patch_size=_pair(config["vision_cfg"]["patch_size"]) if config else None,
    )


def _pair(size: int | list[int]) -> list[int]:
    """open_clip's size: one number (square) or (height, width)."""
    return [size, size] if isinstance(size, int) else list(size)


def _config(name: str) -> dict | None:
    spec = importlib.util.find_spec("open_clip")
    dirs = [PROJECT_CONFIGS, *(Path(p) / "model_configs" for p in (spec.submodule_search_locations or []))]
    for d in dirs:
        if (path := d / f"{name}.json").is_file():
            return json.loads(path.read_text())
    return None
