"""Phrase -> labels by rules over the words' lexicon labels. A phrase names what its head word names
("a dirt path": outdoor scene), except that people, actions, clothing and colours take precedence,
as they do for the reference labeler ("the green man": person, "in a white shirt": clothing,
"a white road": color), unless the head is a vehicle, furniture, a facial expression, electronics or a
shape, which the reference names first ("a red car": vehicle, "a large red circle": shape). A phrase
of function words only is a position when it holds a spatial preposition ("next to", "on") and
UNKNOWN otherwise ("and", "the"); non-words are UNKNOWN.

`rule_labels` returns None when the head is a real word the lexicon does not know: the labeler
then asks the text encoder which lexicon entries it is closest to."""

from __future__ import annotations

from latent_verbalizer.services.categorizer.embedded.words import (
    ACTIONS,
    SEPARATOR,
    SPATIAL_EXPRESSIONS,
    Kind,
    Lexicon,
    kind,
    tokenize,
)
from latent_verbalizer.services.categorizer.models import MAX_LABELS
from latent_verbalizer.shared.function_words import AUXILIARIES, SPATIAL_PREPOSITIONS
from latent_verbalizer.shared.taxonomy import UNKNOWN

PERSON = "person"
PERSON_LABELS = (PERSON, "male", "female")
CLOTHING_LABELS = ("clothing", "accessories")
COLOR = "color"
POSITION = "position"
NUMBERS = "numbers"
# Head-noun classes that the reference labeler names before the phrase's colour more often than after it
# (on its dev labels: vehicle 32 vs 11, furniture 14 vs 7, facial expression 11 vs 3, electronics 8 vs 1);
# for other heads ("a red machine": object 117 vs 168) the colour comes first. Shapes follow the head too,
# so that a scene of shapes charts its shapes (bench/categorizer_eval.py: agreement 0.8631 -> 0.8641).
HEAD_FIRST = frozenset({"vehicle", "furniture", "facial expression", "electronics", "shape"})
# Labels of words that qualify a head rather than name it ("two", "small", "wooden", "old").
MODIFIERS = frozenset(
    {UNKNOWN, NUMBERS, "size", "state", "young", "old", "shape", "texture", "material", "pattern", "style"}
)


def rule_labels(phrase: str, lexicon: Lexicon) -> list[str] | None:
    words = [t for t in tokenize(phrase) if t != SEPARATOR]
    if tuple(w for w in words if w not in AUXILIARIES) in SPATIAL_EXPRESSIONS:  # "next to", "is near"
        return [POSITION]
    items = _word_labels(words, lexicon)
    if not items:
        return [POSITION] if any(w in SPATIAL_PREPOSITIONS for w in words) else [UNKNOWN]
    labels = [label for label in items if label]
    if not labels:
        return None if any(label is None for label in items) else [UNKNOWN]
    if 2 * items.count("") >= len(items):  # mostly made-up words: "gold rugold", "saw ke"
        return [UNKNOWN]
    main = _main_label(items, labels)
    if main is None:
        return None
    rest = [label for label in dict.fromkeys(labels) if label not in (main, UNKNOWN)]
    return [main, *rest][:MAX_LABELS]


def _word_labels(words: list[str], lexicon: Lexicon) -> list[str | None]:
    """The label of each content word (fixed expressions matched first, longest first); "" for a
    non-word, None for a real word the lexicon does not know. Function words are left out."""
    items: list[str | None] = []
    i = 0
    while i < len(words):
        for n in range(min(lexicon.longest, len(words) - i), 1, -1):
            if label := lexicon.labels.get(" ".join(words[i : i + n])):
                items.append(label)
                i += n
                break
        else:
            items += _word_label(words[i], lexicon)
            i += 1
    return items


def _word_label(word: str, lexicon: Lexicon) -> list[str | None]:
    k = kind(word, lexicon)
    if k is Kind.NUMBER:
        return [NUMBERS]
    if k is Kind.VERB:
        return [ACTIONS]
    if k is Kind.NONWORD:
        return [""]
    if k is Kind.CONTENT:
        return [lexicon.label(word)]
    return []  # function words


def _main_label(items: list[str | None], labels: list[str]) -> str | None:
    if any(label in PERSON_LABELS for label in labels):
        return PERSON
    if items[0] == ACTIONS:
        return ACTIONS
    if items[-1] in HEAD_FIRST:  # "a large red circle": shape, "a white car": vehicle
        return items[-1]
    for label in (*CLOTHING_LABELS, COLOR):
        if label in labels:
            return label
    heads = [label for label in items if label not in MODIFIERS and label != ""]
    if heads:
        return heads[-1]  # None: an unknown head word, left to the text encoder
    if None in items:
        return None
    return next((label for label in reversed(labels) if label != UNKNOWN), UNKNOWN)
