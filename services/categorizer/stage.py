"""Stage 3: captions -> labelled phrases. `categorize` is what the RQ worker and the CLI call;
`make_labeler` builds a backend once per process from the settings."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal, Protocol

from latent_verbalizer.services.categorizer.models import CaptionLabels
from latent_verbalizer.shared.settings import Settings, get_settings

Backend = Literal["embedded", "openai"]


class Labeler(Protocol):
    """A labelling backend. Both methods take distinct inputs and keep their order."""

    def label_captions(self, captions: Sequence[str]) -> list[CaptionLabels]:
        """Split each caption into phrases and label every phrase."""
        ...

    def label_phrases(self, phrases: Sequence[str]) -> list[list[str]]:
        """Label each phrase as a whole: its labels, main label first."""
        ...


# Captions handed to the labeler at once when the caller follows progress (the LLM backend still runs its
# requests concurrently within a chunk).
PROGRESS_CHUNK = 256


def categorize(captions: Sequence[str], labeler: Labeler,
               progress: Callable[[list[CaptionLabels]], None] | None = None) -> list[CaptionLabels]:
    """Label captions; identical captions are labelled once and share the result. `progress` is called
    with each chunk of labels as it is done."""
    unique = list(dict.fromkeys(captions))
    size = PROGRESS_CHUNK if progress else max(len(unique), 1)
    labelled: list[CaptionLabels] = []
    for start in range(0, len(unique), size):
        chunk = labeler.label_captions(unique[start : start + size])
        labelled += chunk
        if progress:
            progress(chunk)
    by_caption = dict(zip(unique, labelled, strict=True))
    return [by_caption[c] for c in captions]


def categorize_layers(captions: Mapping[int, Sequence[str]], labeler: Labeler,
                      progress: Callable[[list[CaptionLabels]], None] | None = None) -> dict[int, list[CaptionLabels]]:
    """Label every layer's captions in one call: identical captions (frequent in early layers) across
    layers are labelled once. layer -> captions  ->  layer -> their labels, in order."""
    flat = categorize([c for layer in captions.values() for c in layer], labeler, progress)
    labels, start = {}, 0
    for layer, layer_captions in captions.items():
        labels[layer] = flat[start : start + len(layer_captions)]
        start += len(layer_captions)
    return labels


def categorize_phrases(phrases: Sequence[str], labeler: Labeler) -> list[list[str]]:
    """Label phrases as given (no splitting); identical phrases are labelled once."""
    unique = list(dict.fromkeys(phrases))
    by_phrase = dict(zip(unique, labeler.label_phrases(unique), strict=True))
    return [by_phrase[p] for p in phrases]


def make_labeler(backend: Backend, settings: Settings | None = None) -> Labeler:
    """The backend's labeler, configured from settings (LV_* environment variables)."""
    settings = settings or get_settings()
    if backend == "embedded":
        from latent_verbalizer.services.categorizer.embedded.labeler import EmbeddedLabeler

        return EmbeddedLabeler(settings.cache_dir)
    if backend == "openai":
        from latent_verbalizer.services.categorizer.openai_backend import OpenAILabeler

        return OpenAILabeler.from_settings(settings)
    raise ValueError(f"unknown categorizer backend {backend!r} (embedded | openai)")
