"""The served model's shape, read from its config file without importing torch (the gateway stays light):
its family, how many layers a job may ask for, how long a caption may be, its input's patch grid and which
extras (contrastive grounding, regions, attributions) it has (services.families.naming)."""

from __future__ import annotations

from latent_verbalizer.services.families.naming import FamilyError, describe, resolve
from latent_verbalizer.services.gateway.schemas import ModelInfo
from latent_verbalizer.shared.pretrained import DEMO_NOTE
from latent_verbalizer.shared.settings import DEMO_MODEL, Settings


def describe_model(settings: Settings) -> ModelInfo:
    """The workers' model as LV_MODEL / LV_FAMILY name it; a name that cannot be resolved here (e.g. a hub id
    not in this machine's cache) gives what is known, its shape unknown."""
    try:
        source = resolve(settings.model, settings.family, fetch=False)
    except FamilyError as e:
        return ModelInfo(name=settings.model, family=settings.family, pretrained=None, note=str(e), layers=None,
                         max_seq_len=None)
    shape = describe(source, settings.pretrained, settings.prompt)
    return ModelInfo(
        name=settings.model,
        family=shape["family"],
        pretrained=shape["pretrained"],
        prompt=shape["prompt"],
        note=DEMO_NOTE if settings.model == DEMO_MODEL else None,
        layers=shape["layers"],
        max_seq_len=shape["max_seq_len"],
        image_size=shape["image_size"],
        patch_size=shape["patch_size"],
        extras={extra: shape["missing"].get(extra) for extra in ("contrastive", "regions", "attributions")},
    )
