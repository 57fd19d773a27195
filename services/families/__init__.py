"""Model families behind one interface (services.families.base): `load_family` turns what the user named
into a loaded `Family`. Only this package names a family; everything else calls the interface."""

from __future__ import annotations

from latent_verbalizer.services.families.base import Encoded, Family, FamilyError, Geometry, Stepper

__all__ = ["Encoded", "Family", "FamilyError", "Geometry", "Stepper", "load_family"]


def load_family(model: str, pretrained: str | None = None, device: str = "cpu", dtype: str = "fp32",
                cache_dir=None) -> Family:
    """An open_clip CoCa architecture (and its `pretrained` weights) -> its CocaFamily."""
    from latent_verbalizer.services.families.coca import CocaFamily
    from latent_verbalizer.shared.models import load_model

    return CocaFamily(load_model(model, pretrained, device, dtype, cache_dir=cache_dir))
