"""What the categorizer hands on: for each caption its phrases, each with one to three labels from the
taxonomy (main label first), or the reason labelling that caption failed; and the result lines of a
categorized job (an image's captions per layer with their labels)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from pydantic import BaseModel, Field

from latent_verbalizer.shared import pmi
from latent_verbalizer.shared.schemas import ImageResult, LayerCaption, RegionResult

MAX_LABELS = 3


class Phrase(BaseModel):
    text: str
    labels: list[str] = Field(min_length=1, max_length=MAX_LABELS, description="taxonomy labels, main label first")
    unmatched: bool | None = Field(None, description="True: the text is not in the caption (an LLM rewrote it)")
    pmi: float | None = Field(None, description="likelihood grounding: the mean pmi of its words (shared/pmi.py);"
                                                " absent without grounding or when its words are not in the caption")
    supported: bool | None = Field(None, description="pmi exceeds tau: the image, not the decoder's prior, says it")

    @property
    def main(self) -> str:
        return self.labels[0]


class CaptionLabels(BaseModel):
    caption: str
    phrases: list[Phrase] = Field(default_factory=list)
    error: str | None = Field(None, description="why this caption has no labels; None when labelled")

    def grounded(self, word_pmi: Sequence[float] | None) -> CaptionLabels:
        """A copy whose phrases carry their `pmi` and `supported`, from the caption's words' PMIs (one per
        word of the caption; None: no grounding, these labels as they are). A copy: identical captions share
        one labelling (stage.categorize) but not their images' PMIs."""
        if word_pmi is None:
            return self
        values = pmi.phrase_pmi(self.caption, word_pmi, [p.text for p in self.phrases])
        return self.model_copy(update={"phrases": [
            p.model_copy(update={"pmi": v, "supported": None if v is None else v > pmi.TAU})
            for p, v in zip(self.phrases, values, strict=True)]})


def grounded_layers(labels: dict[int, list[CaptionLabels]],
                    word_pmi: dict[int, list[list[float] | None]] | None) -> dict[int, list[CaptionLabels]]:
    """Per layer, each caption's labels with its phrases' PMI (CaptionLabels.grounded), from the captions'
    words' PMIs in the same order (None: no grounding, the labels as they are)."""
    if not word_pmi:
        return labels
    return {layer: [c.grounded(w) for c, w in zip(captions, word_pmi[layer], strict=True)]
            for layer, captions in labels.items()}


class LabeledCaption(LayerCaption):
    """One layer's caption in a categorized job's results: its phrases, or why labelling it failed."""

    phrases: list[Phrase] = []
    label_error: str | None = None

    def labels(self) -> CaptionLabels:
        return CaptionLabels(caption=self.caption, phrases=self.phrases, error=self.label_error)


class LabeledRegionResult(RegionResult):
    """A region's captions in a categorized job's results, labelled as the image's are."""

    layers: list[LabeledCaption]


class LabeledResult(ImageResult):
    """One line of a categorized job's results.jsonl."""

    layers: list[LabeledCaption] | None = None
    regions: list[LabeledRegionResult] | None = None


def captions_in_order(results: list[ImageResult]) -> list[str]:
    """The captions `with_labels` labels, in its order: each image's layers', then its regions'."""
    captions: list[str] = []
    for r in results:
        captions += [c.caption for c in r.layers or []]
        captions += [c.caption for g in r.regions or [] for c in g.layers]
    return captions


def with_labels(results: list[ImageResult], labels: Iterable[CaptionLabels]) -> list[LabeledResult]:
    """The result lines with their captions' labels (`labels`: one per caption, in `captions_in_order`), their
    phrases' PMI from each caption's own words (CaptionLabels.grounded)."""
    it = iter(labels)

    def labeled(captions: list[LayerCaption]) -> list[LabeledCaption]:
        return [LabeledCaption(**c.model_dump(), phrases=(cl := next(it).grounded(c.word_pmi)).phrases,
                               label_error=cl.error)
                for c in captions]

    return [
        LabeledResult(
            **r.model_dump(exclude={"layers", "regions"}),
            layers=None if r.layers is None else labeled(r.layers),
            regions=None if r.regions is None else [
                LabeledRegionResult(**g.model_dump(exclude={"layers"}), layers=labeled(g.layers)) for g in r.regions
            ],
        )
        for r in results
    ]


def unlabeled(results: list[ImageResult], reason: str) -> list[LabeledResult]:
    """The result lines with every caption kept, unlabelled for `reason`."""
    return with_labels(results, (CaptionLabels(caption=c, error=reason) for c in captions_in_order(results)))
