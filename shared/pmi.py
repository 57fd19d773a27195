"""Likelihood grounding's words and phrases: from a caption's per-token PMI (services.decoder.pmi) to its
words', its content words' supported share and its labelled phrases' PMI. No model needed: the decoder,
the categorizer, the analysis and the viewer's API read the same fields.

A token's PMI is ln p_T(token | prefix, this image) - ln p_T(token | prefix, gray null image), both at the
caption's layer: how much more likely the image made that token than the decoder's prior did. 0 means
the image changed nothing (the decoder would say it anyway); a supported token clears TAU.

p_T is the decoder's softmax at TEMPERATURE = 4 (logits / 4), not at 1. A captioning decoder is sure of its words at
every layer, early ones included (the demo model's chosen tokens: mean p 0.95 at layer 0, 1.00 at its last), and at
temperature 1 the null input's probability for a token it would not say is a vanishing tail (e^-5 .. e^-30 for 10% of
the tokens at layer 0, 33% at the last): the PMI then says how far the null's own reading is from the caption's, not
how much the image raised the token. Softened, both sides compare the logits' margins. Measured on the demo model's
scenes (`bench/phrase_grounding_eval.py`, its `untempered` figures; seeds 12 and 13, 100 scenes each, never the
evaluation seed): phrase AUC 0.76 / 0.74 at T = 1, 0.79 / 0.78 at 2, 0.82 / 0.82 at 4, the same at 8 and in the limit;
word AUC 0.72 / 0.69 at 1, 0.80 / 0.78 at 4. 4 is the lowest temperature on that plateau. Decoding picks its tokens
from the raw logits as before.

Words. A caption's words are its whitespace-separated words; its tokens group into them as the viewer's
word maps group them (services/gateway/static/words.js): a word is a run of tokens that whitespace does
not cut (CLIP's tokens end a word with "</w>", Llama's and BERT's begin one with a space), the i-th run
the i-th word. A word's PMI is the mean of
its tokens' PMIs (a word split into many BPE pieces weighs as one word); a content word is a word that
is not a function word (shared.function_words) and has a letter or digit.

Phrases. A labelled phrase (categorize's output) is found among the caption's words, case and
punctuation aside, after the previous phrase's words; its PMI is the mean of its words' PMIs and it is
supported when that exceeds TAU. A phrase whose words are not in the caption (an LLM rewrote it) has
no PMI.

TAU = 1.25 nats at TEMPERATURE (the image made the phrase's words e^1.25 = 3.5 times as likely as the null input
did, on average, both softened): chosen on the demo model's own scenes, never its evaluation seed:
`bench/phrase_grounding_eval.py --tune 12 13 --n 100` found 1.27 the threshold that best separates phrases true of the
scene from false ones (Youden's J) on those seeds; rounded. README, "Which words does the image support?"."""

from __future__ import annotations

import re
from collections.abc import Sequence

from latent_verbalizer.shared.function_words import FUNCTION_WORDS

TAU = 1.25
TEMPERATURE = 4.0
_NOT_WORD = re.compile(r"[^a-z0-9]+")


def caption_words(caption: str) -> list[str]:
    """"a red  circle" -> ["a", "red", "circle"] (as the viewer shows a caption)."""
    return caption.split()


def word_runs(token_texts: Sequence[str], caption: str) -> list[list[int]] | None:
    """Each token's text as it appears in the caption -> the token positions of each of `caption`'s words, or
    None when the runs and the caption's words differ in number. A new word starts after a token whose text
    ends with whitespace (CLIP's "</w>") or at one whose text starts with it (the leading space of Llama's and
    BERT's pieces); runs of blank tokens only are no word."""
    runs: list[list[int]] = []
    for i, text in enumerate(token_texts):
        if not runs or token_texts[i - 1][-1:].isspace() or text[:1].isspace():
            runs.append([])
        runs[-1].append(i)
    runs = [run for run in runs if any(token_texts[p].strip() for p in run)]
    return runs if len(runs) == len(caption_words(caption)) else None


def word_pmi(pmi: Sequence[float], runs: Sequence[Sequence[int]]) -> list[float]:
    """Per word, the mean of its tokens' PMIs."""
    return [sum(pmi[p] for p in run) / len(run) for run in runs]


def normal(word: str) -> str:
    """A word as phrases and captions are compared: lower case, letters and digits only."""
    return _NOT_WORD.sub("", word.lower())


def is_content(word: str) -> bool:
    w = normal(word)
    return bool(w) and w not in FUNCTION_WORDS


def supported_share(words: Sequence[str], values: Sequence[float], tau: float = TAU) -> float | None:
    """The share of content words whose PMI exceeds tau; None for a caption without content words."""
    content = [v for w, v in zip(words, values, strict=True) if is_content(w)]
    return sum(v > tau for v in content) / len(content) if content else None


def align_phrases(caption: str, phrases: Sequence[str]) -> list[list[int] | None]:
    """Each phrase's word indices in the caption (`caption_words`), in order: the phrase's letters and
    digits are looked for among the caption's, beginning and ending at word boundaries ("gray-ish" is
    the caption's "gray - ish"), from the end of the previous phrase found, then from the start; words
    without letters or digits ("-") are no part of a phrase; None when the phrase is not in the caption."""
    words = [normal(w) for w in caption_words(caption)]
    text = "".join(words)
    owner = [i for i, w in enumerate(words) for _ in w]  # each character's word
    starts = {len("".join(words[:i])) for i, w in enumerate(words) if w}
    ends = {at + len(w) for at, w in zip(sorted(starts), (w for w in words if w))}
    found: list[list[int] | None] = []
    cursor = 0
    for phrase in phrases:
        wanted = normal(phrase)
        at = _find(text, wanted, cursor, starts, ends)
        at = _find(text, wanted, 0, starts, ends) if at is None else at
        if at is None:
            found.append(None)
            continue
        found.append(sorted(set(owner[at : at + len(wanted)])))
        cursor = at + len(wanted)
    return found


def _find(text: str, wanted: str, start: int, starts: set[int], ends: set[int]) -> int | None:
    """The first offset from `start` where `wanted` (non-empty) is in `text` from a word's start to a word's end."""
    at = text.find(wanted, start) if wanted else -1
    while at != -1 and (at not in starts or at + len(wanted) not in ends):
        at = text.find(wanted, at + 1)
    return None if at == -1 else at


def phrase_pmi(caption: str, values: Sequence[float], phrases: Sequence[str]) -> list[float | None]:
    """Each phrase's PMI: the mean of its words' (`values`, one per caption word); None when not found."""
    return [None if at is None else sum(values[i] for i in at) / len(at) for at in align_phrases(caption, phrases)]
