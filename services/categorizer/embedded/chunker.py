"""Caption -> phrases, the way the reference LLM splits them: a determiner or a preposition opens a
noun phrase that runs to the next function word ("a dirt path", "at a table", "with a bowl"); a
verb stands alone or after its auxiliary ("riding", "is standing"); spatial expressions stand alone
("in front of", "near"); in word salad without determiners every word is its own phrase, and
punctuation and non-words always end a phrase. Repeated words are kept: they weigh in the analysis."""

from __future__ import annotations

from latent_verbalizer.services.categorizer.embedded.words import (
    PARTICLES,
    SPATIAL_EXPRESSIONS,
    Kind,
    Lexicon,
    kind,
    tokenize,
)

OPENERS = {Kind.DETERMINER, Kind.PREPOSITION, Kind.CONJUNCTION, Kind.AUXILIARY}
MAX_CONTENT_WORDS = 4
MAX_DIGITS = 4


def split_phrases(caption: str, lexicon: Lexicon) -> list[str]:
    tokens = tokenize(caption)
    kinds = [kind(t, lexicon) for t in tokens]
    phrases: list[list[str]] = []
    current: list[int] = []  # indices into tokens

    def flush() -> None:
        if current:
            phrases.append([tokens[j] for j in current])
            current.clear()

    def content_words() -> int:
        return sum(kinds[j] in (Kind.CONTENT, Kind.NUMBER, Kind.VERB) for j in current)

    def within_noun_phrase(i: int) -> bool:
        """Is token i between two words of a noun phrase that a determiner or preposition opened?"""
        opened = any(kinds[j] in OPENERS for j in current)
        return opened and content_words() > 0 and i + 1 < len(tokens) and kinds[i + 1] is Kind.CONTENT

    i = 0
    while i < len(tokens):
        if expression := _standalone_at(tokens, i):
            flush()
            phrases.append(list(expression))
            i += len(expression)
            continue
        k = kinds[i]
        if k is Kind.SEPARATOR:
            flush()
        elif k is Kind.NONWORD:
            if content_words():
                flush()
            current.append(i)  # alone, or ending the phrase its openers began: "in a reface"
            flush()
        elif k is Kind.CONJUNCTION and within_noun_phrase(i):
            current.append(i)  # "a red and yellow kite"
        elif k is Kind.CONJUNCTION and (i + 1 == len(tokens) or kinds[i + 1] is not Kind.DETERMINER):
            flush()
            phrases.append([tokens[i]])  # "red and blue": "and" alone; "and a window" opens a phrase
        elif k in OPENERS:
            if content_words():  # "is in the ...", "that is ...": openers chain until a content word
                flush()
            current.append(i)
        elif k is Kind.VERB:
            if content_words():
                flush()
            current.append(i)
            if i + 1 < len(tokens) and tokens[i + 1] in PARTICLES:  # "going down"
                i += 1
                current.append(i)
            flush()
        elif k is Kind.NUMBER:
            # digits group into numbers of up to four ("2 0 1 2", a year), which stand alone
            if not (current and kinds[current[-1]] is Kind.NUMBER and content_words() < MAX_DIGITS):
                flush()
            current.append(i)
        else:  # a content word
            opened = any(kinds[j] in OPENERS for j in current)
            continues = opened and kinds[current[-1]] in (Kind.CONTENT, *OPENERS) and tokens[current[-1]] != tokens[i]
            if content_words() and not (continues and content_words() < MAX_CONTENT_WORDS):
                flush()  # a repeated word starts anew: "a large lock", "lock"
            current.append(i)
        i += 1
    flush()
    return [" ".join(p) for p in phrases]


def _standalone_at(tokens: list[str], i: int) -> tuple[str, ...] | None:
    for expression in SPATIAL_EXPRESSIONS:
        if tuple(tokens[i : i + len(expression)]) == expression:
            return expression
    return None
