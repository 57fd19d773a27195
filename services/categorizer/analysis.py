"""Which kinds of visual information each encoder layer holds: per layer, the reference's "mean
percentage of class". For each caption, the share of its phrases whose main label folds into each
merged class; averaged over the layer's captions. Captions that failed or have no phrases are left
out of the average (and counted).

With likelihood grounding (phrases carrying `pmi` and `supported`, shared/pmi.py) the same chart counts
only what the image supports: per caption, the share of its phrases that are supported AND fold into
each class (over its phrases with a PMI), averaged over the layer's captions. A layer's classes then add
up to its mean supported share, not to 100%: the rest is what the decoder said without the image."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from pydantic import BaseModel, Field

from latent_verbalizer.services.categorizer.models import CaptionLabels
from latent_verbalizer.shared.taxonomy import Taxonomy, load_taxonomy


class LayerCounts(BaseModel):
    captions: int
    counted: int = Field(description="captions in the average: labelled, with at least one phrase")
    failed: int
    phrases: int


class Supported(BaseModel):
    """What the image supports, per layer (likelihood grounding)."""

    percent: list[list[float]] = Field(
        description="[layer][class]: mean percentage of a caption's phrases (those with a PMI) that are supported"
                    " and fold into the class; a layer's row adds up to its mean supported percentage")
    share: list[float | None] = Field(description="per layer: supported phrases / phrases with a PMI (None: none)")
    phrases: list[int] = Field(description="per layer: phrases with a PMI")


class Analysis(BaseModel):
    taxonomy_version: str
    layers: list[int]
    classes: list[str]
    percent: list[list[float]] = Field(description="[layer][class]: mean percentage of class")
    plotted: list[str] = Field(description="classes reaching the plot threshold in some layer, in plot order")
    counts: list[LayerCounts]
    mean_entropy: list[float] | None = Field(
        None, description="bits, mean over the layer's captions (finite values); NaN when it has none"
    )
    supported: Supported | None = Field(None, description="the chart of supported phrases (None: no phrase has a PMI)")

    def row(self, layer: int) -> dict[str, float]:
        return dict(zip(self.classes, self.percent[self.layers.index(layer)], strict=True))


def class_percentages(captions: Sequence[CaptionLabels], taxonomy: Taxonomy) -> tuple[list[float], LayerCounts]:
    classes = taxonomy.classes
    index = {cls: i for i, cls in enumerate(classes)}
    total = [0.0] * len(classes)
    counted = failed = phrases = 0
    for caption in captions:
        failed += caption.error is not None
        phrases += len(caption.phrases)
        if caption.error is not None or not caption.phrases:
            continue
        counted += 1
        share = 100.0 / len(caption.phrases)
        for phrase in caption.phrases:
            total[index[taxonomy.merge(phrase.main)]] += share
    percent = [t / counted if counted else 0.0 for t in total]
    return percent, LayerCounts(captions=len(captions), counted=counted, failed=failed, phrases=phrases)


def supported_percentages(
    captions: Sequence[CaptionLabels], taxonomy: Taxonomy
) -> tuple[list[float], float | None, int]:
    """One layer's chart of supported phrases: (mean percentage per class, supported share, phrases with a PMI)."""
    index = {cls: i for i, cls in enumerate(taxonomy.classes)}
    total = [0.0] * len(taxonomy.classes)
    counted = measured = supported = 0
    for caption in captions:
        grounded = [p for p in caption.phrases if p.pmi is not None] if caption.error is None else []
        if not grounded:
            continue
        counted += 1
        measured += len(grounded)
        for phrase in grounded:
            if phrase.supported:
                supported += 1
                total[index[taxonomy.merge(phrase.main)]] += 100.0 / len(grounded)
    return [t / counted if counted else 0.0 for t in total], supported / measured if measured else None, measured


def analyze(
    labels: Mapping[int, Sequence[CaptionLabels]],
    entropies: Mapping[int, Sequence[float]] | None = None,
    taxonomy: Taxonomy | None = None,
) -> Analysis:
    """The per-layer class distribution of labelled captions (layer -> captions), with the mean
    caption entropy per layer when entropies (layer -> one value per caption) are given."""
    taxonomy = taxonomy or load_taxonomy()
    layers = sorted(labels)
    per_layer = [class_percentages(labels[layer], taxonomy) for layer in layers]
    rows, counts = [row for row, _ in per_layer], [count for _, count in per_layer]
    grounded = [supported_percentages(labels[layer], taxonomy) for layer in layers]
    supported = Supported(percent=[g[0] for g in grounded], share=[g[1] for g in grounded],
                          phrases=[g[2] for g in grounded]) if any(g[2] for g in grounded) else None
    return Analysis(
        taxonomy_version=taxonomy.version,
        layers=layers,
        classes=taxonomy.classes,
        percent=rows,
        plotted=_plotted(taxonomy, rows),
        counts=counts,
        mean_entropy=[_mean(entropies.get(layer, [])) for layer in layers] if entropies else None,
        supported=supported,
    )


def _plotted(taxonomy: Taxonomy, rows: Sequence[Sequence[float]]) -> list[str]:
    peak = {cls: max((r[i] for r in rows), default=0.0) for i, cls in enumerate(taxonomy.classes)}
    shown = [cls for cls in taxonomy.classes if peak[cls] >= taxonomy.plot_threshold_percent]
    order = list(taxonomy.plot_names)  # the reference figure's order, then the rest by peak
    return sorted(shown, key=lambda c: (order.index(c), 0.0) if c in order else (len(order), -peak[c]))


def _mean(values: Sequence[float]) -> float:
    """The mean of the finite values; NaN when there are none."""
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan
