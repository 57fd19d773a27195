"""What a model name means: `--model` (LV_MODEL) -> its family and where its weights are, without loading it.

    a local directory          written by save_pretrained: the family is config.json's `model_type`
    a project name             PROJECT_MODELS: a model this project ships (shared/weights/) or configures
    an open_clip CoCa name     coca_ViT-B-32, coca_ViT-L-14, ... (weights: --pretrained, as before), or
                               hf-hub:ORG/REPO, local-dir:FOLDER (open_clip's: config and weights in there)
    a Hugging Face id          org/name: config.json from the local hub cache, or from the hub where the
                               network allows (one quick look first: offline there is one error, no retries)
`--family` (LV_FAMILY) forces the family. This module stays light (the gateway imports it for its model
info): it reads JSON config files and the hub cache, never torch or transformers' models.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from latent_verbalizer import shared
from latent_verbalizer.services.families.base import FamilyError

FAMILIES = ("coca", "llava", "blip")
MODEL_TYPES = {"llava": "llava", "blip": "blip"}  # a save_pretrained config.json's model_type -> family
WEIGHTS_DIR = Path(shared.__file__).parent / "weights"  # as shared.models.WEIGHTS_DIR
OPEN_CLIP_CONFIGS = Path(shared.__file__).parent / "model_configs"  # as shared.models.CONFIG_DIR
# Project names -> (family, location): CoCa's is its open_clip config name (weights by --pretrained's
# default, shared.pretrained); the others' a save_pretrained directory shipped in the package.
PROJECT_MODELS: dict[str, tuple[str, str]] = {
    "coca_synth_demo": ("coca", "coca_synth_demo"),
    "llava_synth_demo": ("llava", str(WEIGHTS_DIR / "llava_synth_demo")),
}
# Extras each family lacks, with the reason (Family.missing; the gateway's model info reads it from here).
MISSING: dict[str, dict[str, str]] = {
    "coca": {},
    "llava": {"contrastive": "LLaVA has no contrastive image-text head"},
    "blip": {"contrastive": "BlipForConditionalGeneration has no contrastive image-text head (its ITM/ITC heads"
                            " are in separate BlipForImageTextRetrieval checkpoints)"},
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSource:
    family: str  # one of FAMILIES
    name: str  # what the user named
    location: str  # CoCa: the open_clip architecture; others: a directory or a hub id
    config: dict | None  # its config (open_clip's JSON for CoCa, config.json for the others), when readable
    hub: bool = False  # location is a hub id (loaded from the hub cache)


def resolve(model: str, family: str | None = None, fetch: bool = True) -> ModelSource:
    """The family and location `model` names (FamilyError naming what it could be, when none fits).
    `fetch`: a hub id's config.json may be downloaded (the gateway passes False: cache only)."""
    if family is not None and family not in FAMILIES:
        raise FamilyError(f"unknown family {family!r}; families: {', '.join(FAMILIES)}")
    path = Path(model).expanduser()
    if path.is_dir():
        config = _read_json(path / "config.json")
        if config is None:
            raise FamilyError(f"{model} is a directory without a config.json: pass a directory that save_pretrained"
                              " wrote (config.json, weights, tokenizer and processor files)")
        return ModelSource(family or _family_of(config, model), model, str(path), config)
    if model in PROJECT_MODELS:
        known, location = PROJECT_MODELS[model]
        return resolve_location(model, family or known, location)
    coca = _open_clip_config(model)
    if coca is not None and family in (None, "coca"):
        return ModelSource("coca", model, model, coca)
    if model.startswith(("hf-hub:", "local-dir:")) and family in (None, "coca"):  # open_clip's own schemas
        return ModelSource("coca", model, model, None)  # config and weights: from that repository or folder
    if _HUB_ID.match(model) and not path.exists():
        config = _hub_config(model, fetch)
        return ModelSource(family or _family_of(config, model), model, model, config, hub=True)
    raise FamilyError(
        f"unknown model {model!r}: --model takes an open_clip CoCa name ({', '.join(_coca_names())}), a project model"
        f" ({', '.join(PROJECT_MODELS)}), a Hugging Face id (org/name) or a directory written by save_pretrained")


def describe(source: ModelSource, pretrained: str | None, prompt: str | None) -> dict:
    """The model from its config alone (the gateway's model info): its family; the weights (`pretrained` as
    set: CoCa's resolved by shared.pretrained's rule, None for the others) and prompt (None for CoCa); layers
    (vision blocks), max_seq_len (an upper bound for the families with a prompt), image_size and patch_size
    ([h, w]), None where the config is unknown; `missing`: the extras the family lacks, with why."""
    from latent_verbalizer.shared.pretrained import resolve_pretrained

    c = source.config or {}
    coca = source.family == "coca"
    if coca:
        vision, text = c.get("vision_cfg", {}), c.get("text_cfg", {})
        layers, max_len = vision.get("layers"), text.get("context_length", 77) if c else None
    else:
        vision, text = c.get("vision_config", {}), c.get("text_config", {})
        layers, max_len = vision.get("num_hidden_layers"), text.get("max_position_embeddings")
    pair = lambda v: None if v is None else [v, v] if isinstance(v, int) else list(v)  # noqa: E731
    return {"family": source.family, "pretrained": resolve_pretrained(source.name, pretrained) if coca else None,
            "prompt": None if coca else prompt, "layers": layers, "max_seq_len": max_len,
            "image_size": pair(vision.get("image_size")), "patch_size": pair(vision.get("patch_size")),
            "missing": MISSING[source.family]}


def config_layers(model: str, family: str | None = None) -> int | None:
    """The model's vision blocks from its config, before loading it; None when that cannot be told here."""
    try:
        return describe(resolve(model, family, fetch=False), None, None)["layers"]
    except FamilyError:
        return None


def resolve_location(name: str, family: str, location: str) -> ModelSource:
    """A project model's source (its shipped directory must be there)."""
    if family == "coca":
        return ModelSource("coca", name, location, _open_clip_config(location))
    config = _read_json(Path(location) / "config.json")
    if config is None:
        raise FamilyError(f"project model {name}'s files are missing: {location} (reinstall the package)")
    return ModelSource(family, name, location, config)


def _family_of(config: dict | None, model: str) -> str:
    model_type = (config or {}).get("model_type")
    if model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type]
    raise FamilyError(f"{model}: model_type {model_type!r} in its config.json is not a family this tool reads"
                      f" ({', '.join(f'{t} ({f})' for t, f in MODEL_TYPES.items())}); --family forces one")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _open_clip_dirs() -> list[Path]:
    spec = importlib.util.find_spec("open_clip")
    return [OPEN_CLIP_CONFIGS, *(Path(p) / "model_configs" for p in (spec.submodule_search_locations or []))]


def _open_clip_config(name: str) -> dict | None:
    """open_clip's config of `name` (the project's configs, then open_clip's own), None if none. A config
    without a text decoder (a CLIP) is CoCa's loader's to refuse, with its reason."""
    for d in _open_clip_dirs():
        config = _read_json(d / f"{name}.json")
        if config is not None:
            return config
    return None


def _coca_names() -> list[str]:
    return sorted({p.stem for d in _open_clip_dirs() for p in d.glob("coca_*.json")})


def _hub_config(repo: str, fetch: bool) -> dict | None:
    """A hub model's config.json from the local cache, else (with `fetch`, the hub reachable) downloaded."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(repo, "config.json")
    if isinstance(cached, str):
        return _read_json(Path(cached))
    if not fetch:
        return None
    if not hub_reachable():
        raise FamilyError(not_cached(repo))
    try:
        return _read_json(Path(hf_hub_download(repo, "config.json")))
    except Exception as e:  # not found, gated, network: say which and what to do
        raise FamilyError(f"{repo}: its config.json could not be fetched from the hub ({type(e).__name__}: {e})"
                          f". {copy_instructions(repo)}") from e


def hub_reachable() -> bool:
    """One quick look at the hub (shared.models' check, as CoCa's weights use)."""
    from latent_verbalizer.shared.models import _hub_reachable

    return _hub_reachable()


def not_cached(repo: str) -> str:
    return f"{repo} is not in the local Hugging Face cache and the hub cannot be reached from here. " + (
        copy_instructions(repo))


def copy_instructions(repo: str) -> str:
    home = os.environ.get("HF_HOME") or "~/.cache/huggingface"
    return (f"On a machine with network, run `huggingface-cli download {repo} --local-dir DIR` (config.json, the"
            f" *.safetensors weights, tokenizer, chat template and processor files), copy DIR here and pass it as"
            f" --model DIR; or copy that machine's {home}/hub/models--{repo.replace('/', '--')} folder to"
            f" {home}/hub/ here (HF_HOME sets where)")
