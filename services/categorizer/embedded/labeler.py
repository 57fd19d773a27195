"""The offline labeler: split captions into phrases, label each phrase by rules over the project's
lexicon, and send phrases whose head word the lexicon does not know to MiniLM. A word close enough
to a lexicon entry that names a concrete kind of thing (an animal, an object, a vehicle, a garment,
a food, a material) takes that entry's label: "falcon" is an animal like "eagle". Other unknown
words stay UNKNOWN, as the reference labeler leaves most rare, abstract or made-up words."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from latent_verbalizer.services.categorizer.embedded.chunker import split_phrases
from latent_verbalizer.services.categorizer.embedded.encoder import TextEncoder
from latent_verbalizer.services.categorizer.embedded.rules import rule_labels
from latent_verbalizer.services.categorizer.embedded.words import SEPARATOR, Kind, Lexicon, kind, tokenize
from latent_verbalizer.services.categorizer.models import CaptionLabels, Phrase
from latent_verbalizer.shared.taxonomy import UNKNOWN

# Cosine similarity to the nearest lexicon entry below which an unknown word stays UNKNOWN.
MIN_SIMILARITY = 0.6
# Labels the encoder may give; for names, places, actions, qualities it guesses worse than UNKNOWN.
CONCRETE_LABELS = frozenset(
    "animal object tools toys vehicle clothing accessories food drink dessert fruits material".split()
)
# Labelled phrases kept in memory; a worker labels many chunks with the same model.
MEMO_SIZE = 200_000


class EmbeddedLabeler:
    def __init__(self, cache_dir: Path, lexicon: Lexicon | None = None, min_similarity: float = MIN_SIMILARITY):
        """cache_dir: where the lexicon's embeddings are kept between runs. MiniLM is loaded when
        the first phrase the rules cannot decide arrives."""
        self.lexicon = lexicon or Lexicon.load()
        self.cache_dir = Path(cache_dir)
        self.min_similarity = min_similarity
        self._encoder: TextEncoder | None = None
        self._entries: list[str] = []
        self._entry_vectors = np.zeros((0, 0), np.float32)
        self._memo: dict[str, list[str]] = {}

    def label_captions(self, captions: Sequence[str]) -> list[CaptionLabels]:
        phrases = [split_phrases(c, self.lexicon) for c in captions]
        labels = self._labelled(p for ps in phrases for p in ps)
        return [
            CaptionLabels(caption=c, phrases=[Phrase(text=p, labels=labels[p]) for p in ps])
            for c, ps in zip(captions, phrases)
        ]

    def label_phrases(self, phrases: Sequence[str]) -> list[list[str]]:
        labels = self._labelled(phrases)
        return [labels[p] for p in phrases]

    def _labelled(self, phrases: Iterable[str]) -> dict[str, list[str]]:
        """Labels of the distinct phrases: remembered, decided by rules, or by the encoder."""
        unique = list(dict.fromkeys(phrases))
        new = [p for p in unique if p not in self._memo]
        if len(self._memo) + len(new) > MEMO_SIZE:
            self._memo.clear()
        undecided = []
        for phrase in new:
            if (labels := rule_labels(phrase, self.lexicon)) is None:
                undecided.append(phrase)
            else:
                self._memo[phrase] = labels
        self._memo.update(zip(undecided, self._nearest_labels(undecided)))
        return {p: self._memo[p] for p in unique}

    def _nearest_labels(self, phrases: list[str]) -> list[list[str]]:
        if not phrases:
            return []
        contents = [self._content(p) for p in phrases]  # "a bubble", "with bubble": encoded once
        unique = list(dict.fromkeys(contents))
        similarity = self.load_encoder().encode(unique) @ self._entry_vectors.T
        by_content = {}
        for content, row in zip(unique, similarity):
            label = self.lexicon.labels[self._entries[row.argmax()]]
            by_content[content] = [label if label in CONCRETE_LABELS and row.max() >= self.min_similarity else UNKNOWN]
        return [by_content[c] for c in contents]

    def _content(self, phrase: str) -> str:
        """The phrase without function words: what the encoder compares with lexicon entries."""
        words = [w for w in tokenize(phrase) if w != SEPARATOR and kind(w, self.lexicon) is Kind.CONTENT]
        return " ".join(words) or phrase

    def load_encoder(self) -> TextEncoder:
        """MiniLM and the lexicon's embeddings, loaded now (a worker at start) or when first needed."""
        if self._encoder is None:
            self._encoder = TextEncoder()
            self._entries = sorted(self.lexicon.labels)
            self._entry_vectors = self._encoder.encode_cached(self._entries, self.cache_dir)
        return self._encoder
