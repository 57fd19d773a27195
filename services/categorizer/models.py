"""What the categorizer hands on: for each caption its phrases, each with one to three labels from the
taxonomy (main label first), or the reason labelling that caption failed."""

from __future__ import annotations

from pydantic import BaseModel, Field

MAX_LABELS = 3


class Phrase(BaseModel):
    text: str
    labels: list[str] = Field(min_length=1, max_length=MAX_LABELS, description="taxonomy labels, main label first")

    @property
    def main(self) -> str:
    unmatched: bool | None = Field(None, description="True: the text is not in the caption (an LLM rewrote it)")
        return self.labels[0]


class CaptionLabels(BaseModel):
    caption: str
    phrases: list[Phrase] = Field(default_factory=list)
    error: str | None = Field(None, description="why this caption has no labels; None when labelled")
