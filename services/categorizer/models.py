"""What the categorizer hands on: for each caption its phrases, each with one to three labels from the
taxonomy (main label first), or the reason labelling that caption failed; and the result lines of a
categorized job (an image's captions per layer with their labels)."""

from __future__ import annotations

from collections.abc import Iterator

from pydantic import BaseModel, Field

from latent_verbalizer.shared.schemas import ImageResult, LayerCaption, RegionResult

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


class LabeledRegionResult(RegionResult):
    """A region's captions in a categorized job's results, labelled as the image's are."""

    layers: list[LabeledCaption]


class LabeledResult(ImageResult):
    """One line of a categorized job's results.jsonl."""

    layers: list[LabeledCaption] | None = None
    regions: list[LabeledRegionResult] | None = None


def labeled_result(result: ImageResult, labels: Iterator[CaptionLabels]) -> LabeledResult:
    """`result` with labels taken from `labels` in caption order: its layers', then each region's."""
    def labeled(captions: list[LayerCaption]) -> list[LabeledCaption]:
        return [LabeledCaption(**c.model_dump(), phrases=(cl := next(labels)).phrases, label_error=cl.error)
                for c in captions]

    layers = None if result.layers is None else labeled(result.layers)
    regions = None if result.regions is None else [
        LabeledRegionResult(**r.model_dump(exclude={"layers"}), layers=labeled(r.layers)) for r in result.regions]
    return LabeledResult(**result.model_dump(exclude={"layers", "regions"}), layers=layers, regions=regions)


def captions_in_order(result: ImageResult) -> list[str]:
    """The captions `labeled_result` labels, in its order: the image's layers', then each region's."""
    return [c.caption for c in result.layers or []] + [c.caption for r in result.regions or [] for c in r.layers]
