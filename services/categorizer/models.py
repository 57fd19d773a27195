"""What the categorizer hands on: for each caption its phrases, each with one to three labels from the
taxonomy (main label first), or the reason labelling that caption failed; and the result lines of a
categorized job (an image's captions per layer with their labels)."""

from __future__ import annotations

from collections.abc import Iterable

from pydantic import BaseModel, Field

from latent_verbalizer.shared.schemas import ImageResult, LayerCaption

MAX_LABELS = 3


class Phrase(BaseModel):
    text: str
    labels: list[str] = Field(min_length=1, max_length=MAX_LABELS, description="taxonomy labels, main label first")
    unmatched: bool | None = Field(None, description="True: the text is not in the caption (an LLM rewrote it)")

    @property
    def main(self) -> str:
        return self.labels[0]


class CaptionLabels(BaseModel):
    caption: str
    phrases: list[Phrase] = Field(default_factory=list)
    error: str | None = Field(None, description="why this caption has no labels; None when labelled")


class LabeledCaption(LayerCaption):
    """One layer's caption in a categorized job's results: its phrases, or why labelling it failed."""

    phrases: list[Phrase] = []
    label_error: str | None = None

    def labels(self) -> CaptionLabels:
        return CaptionLabels(caption=self.caption, phrases=self.phrases, error=self.label_error)


class LabeledResult(ImageResult):
    """One line of a categorized job's results.jsonl."""

    layers: list[LabeledCaption] | None = None


def with_labels(results: list[ImageResult], labels: Iterable[CaptionLabels]) -> list[LabeledResult]:
    """The result lines with their captions' labels (`labels`: one per caption, in order)."""
    it = iter(labels)
    return [
        LabeledResult(
            **r.model_dump(exclude={"layers"}),
            layers=None
            if r.layers is None
            else [
                LabeledCaption(**c.model_dump(), phrases=(cl := next(it)).phrases, label_error=cl.error)
                for c in r.layers
            ],
        )
        for r in results
    ]


def unlabeled(results: list[ImageResult], reason: str) -> list[LabeledResult]:
    """The result lines with every caption kept, unlabelled for `reason`."""
    captions = (c.caption for r in results for c in r.layers or [])
    return with_labels(results, (CaptionLabels(caption=c, error=reason) for c in captions))
