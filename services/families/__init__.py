"""Model families behind one interface (services.families.base). Only this package names a family:
pipeline, workers, CLI and gateway call the interface and may display `family.family`.

    load_family(model, ..., family=None)    what the user named (services.families.naming) -> a loaded Family
    coca.py, llava.py, blip.py             one module per family; each but CoCa has `load(location, device,
                                           dtype, prompt) -> Family`
"""

from __future__ import annotations

import importlib
from pathlib import Path

from latent_verbalizer.services.families.base import Encoded, Family, FamilyError, Geometry, Stepper
from latent_verbalizer.services.families.naming import FAMILIES, ModelSource, copy_instructions, hub_reachable, resolve

__all__ = ["FAMILIES", "Encoded", "Family", "FamilyError", "Geometry", "ModelSource", "Stepper", "load_family",
           "resolve"]


def load_family(model: str, pretrained: str | None = None, device: str = "cpu", dtype: str = "fp32", *,
                family: str | None = None, prompt: str | None = None, cache_dir: str | Path | None = None) -> Family:
    """Load what `model` names (see services.families.naming) as a Family. `pretrained`: CoCa's weights (an
    open_clip tag, project tag or checkpoint file; None: random weights), refused for the others, whose
    weights come with the model; `prompt`: LLaVA's captioning prompt / BLIP's text prefix (None: the
    family's default), refused for CoCa."""
    source = resolve(model, family)
    if source.family == "coca":
        from latent_verbalizer.services.families.coca import CocaFamily
        from latent_verbalizer.shared.models import load_model

        if prompt is not None:
            raise FamilyError("--prompt is the captioning prompt of LLaVA models and the text prefix of BLIP models;"
                              f" {model} is a CoCa model, whose decoder reads only the image: leave --prompt out")
        return CocaFamily(load_model(source.location, pretrained, device, dtype, cache_dir=cache_dir))
    if pretrained is not None:
        raise FamilyError(f"--pretrained names CoCa weights (an open_clip tag or a checkpoint file); {model} is a"
                          f" {source.family} model, whose weights come with --model itself: leave --pretrained out")
    loaded = _load_hf(source, device, dtype, prompt)
    loaded.name = model
    return loaded


def _load_hf(source: ModelSource, device: str, dtype: str, prompt: str | None) -> Family:
    """A transformers family's `load`; a hub id offline reads the hub cache only, and a file missing there is
    one FamilyError saying what to copy where (no retries against an unreachable hub)."""
    module = importlib.import_module(f"latent_verbalizer.services.families.{source.family}")
    if not source.hub:
        return module.load(source.location, device=device, dtype=dtype, prompt=prompt)
    from latent_verbalizer.shared.models import _hub_cache_only

    offline = not hub_reachable()
    try:
        with _hub_cache_only(offline):
            return module.load(source.location, device=device, dtype=dtype, prompt=prompt)
    except OSError as e:  # transformers' "couldn't connect" / "does not appear to have a file named ..."
        where = "the hub cannot be reached from here" if offline else f"loading it failed ({e})"
        raise FamilyError(f"{source.location}: a file of the model is not in the local Hugging Face cache and"
                          f" {where}. {copy_instructions(source.location)}") from e
