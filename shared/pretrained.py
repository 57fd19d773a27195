"""Which weights a model name means when the user names none: the one rule, used by the CLI, `serve`,
the workers, the gateway's model info and (through it) the viewer's header.

    --pretrained / LV_PRETRAINED given   that tag or checkpoint file ('none': random weights)
    the shipped demo model               the project's tag for it (synth-v2)
    an open_clip CoCa architecture       its COCO-captioning fine-tune, mscoco_finetuned_laion2b_s13b_b90k
                                         (what the paper used); else the first tag open_clip lists
    a config with no weights (coca_tiny) none: random weights from a fixed seed

This module stays light (the gateway imports it): open_clip (and torch) is imported only for a model
that is not the project's own."""

from __future__ import annotations

from latent_verbalizer.shared.settings import DEMO_MODEL, DEMO_PRETRAINED

NO_WEIGHTS = "none"
# The COCO-captioning fine-tune open_clip publishes for its CoCa architectures, spelled as open_clip lists it.
COCO_CAPTIONING_TAG = "mscoco_finetuned_laion2b_s13b_b90k"
# Project models and their default tag (weights shipped in shared/weights/, see shared.models).
PROJECT_DEFAULTS: dict[str, str] = {DEMO_MODEL: DEMO_PRETRAINED}
# Said wherever a user meets the demo model (help, README, viewer header, a log line for photo-sized images).
DEMO_NOTE = (f"the offline demo model, trained on synthetic coloured shapes only: it describes any photo as shapes;"
             f" for real images use --model coca_ViT-L-14 (weights {COCO_CAPTIONING_TAG}, downloaded once)")
RULE = (f"default: the model's own weights ({DEMO_PRETRAINED} for {DEMO_MODEL}, {COCO_CAPTIONING_TAG} for"
        " open_clip CoCa models, else open_clip's first tag; none for configs without weights)")


def default_pretrained(model: str) -> str | None:
    """The weights `model` means by default; None for random weights (and for an hf-hub: / local-dir:
    model, whose weights come with it)."""
    if model in PROJECT_DEFAULTS:
        return PROJECT_DEFAULTS[model]
    if model.startswith(("hf-hub:", "local-dir:")):
        return None
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(model)
    if COCO_CAPTIONING_TAG in tags:
        return COCO_CAPTIONING_TAG
    return tags[0] if tags else None


def weights_name(model: str, pretrained: str | None) -> str:
    """The weights `resolve_pretrained` chose, as the log says them: the tag or file, the hub repository's
    or folder's own for an hf-hub: / local-dir: model (they bring their weights), else 'none' (random)."""
    if pretrained:
        return pretrained
    if model.startswith("hf-hub:"):
        return f"the hub repository's own ({model.removeprefix('hf-hub:')})"
    if model.startswith("local-dir:"):
        return f"the folder's own ({model.removeprefix('local-dir:')})"
    return NO_WEIGHTS


def resolve_pretrained(model: str, pretrained: str | None) -> str | None:
    """`pretrained` as the user gave it (None: not given) -> the tag or file to load, None for random
    weights."""
    if pretrained is not None:
        return None if pretrained.strip().lower() in ("", NO_WEIGHTS) else pretrained
    return default_pretrained(model)
