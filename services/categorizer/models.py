"""What the categorizer hands on: for each caption its phrases, each with one to three labels from the
taxonomy (main label first), or the reason labelling that caption failed; and the result lines of a
categorized job (an image's captions per layer with their labels)."""

from __future__ import annotations

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
