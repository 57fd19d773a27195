"""The embedded (offline) labeler on real caption phrases, its caption splitting, the MiniLM fallback
and the stage function's dedupe."""

from __future__ import annotations

import json

import pytest

from latent_verbalizer.services.categorizer.embedded import encoder as encoder_module
from latent_verbalizer.services.categorizer.embedded.chunker import split_phrases
from latent_verbalizer.services.categorizer.embedded.labeler import EmbeddedLabeler
from latent_verbalizer.services.categorizer.embedded.words import Lexicon, stems
from latent_verbalizer.services.categorizer.models import CaptionLabels
from latent_verbalizer.services.categorizer.stage import categorize, categorize_phrases
from latent_verbalizer.shared.taxonomy import load_taxonomy


@pytest.fixture(scope="module")
def labeler(tmp_path_factory) -> EmbeddedLabeler:
    return EmbeddedLabeler(tmp_path_factory.mktemp("embeddings"))


@pytest.mark.parametrize(
    "phrase, main",
    [
        ("a man", "person"),
        ("the green man", "person"),  # people outrank colours
        ("riding", "actions"),
        ("is standing", "actions"),
        ("a motorcycle", "vehicle"),
        ("a dirt path", "outdoor scene"),
        ("on", "position"),
        ("next to", "position"),
        ("in front of", "position"),
        ("left of", "position"),
        ("to the right of", "position"),
        ("red", "color"),
        ("a white road", "color"),  # a colour names the phrase
        ("in a white shirt", "clothing"),  # except for garments
        ("a red machine", "color"),  # the reference names the colour first for most objects
        ("a white car", "vehicle"),  # but the head first for vehicles, furniture, electronics, shapes
        ("a large red circle", "shape"),
        ("on a gray background", "color"),
        ("2 0 1 2", "numbers"),
        ("two small dogs", "animal"),  # the head noun, not its modifiers
        ("a small", "size"),
        ("zuzuzuzuflying", "UNKNOWN"),  # word salad
        ("cabfeaturing", "UNKNOWN"),
        ("and", "UNKNOWN"),
        ("the", "UNKNOWN"),
        ("with a bowl", "object"),
        ("of food", "food"),
        ("a bowl of pizza", "food"),
        ("in a kitchen", "rooms"),
        ("a giraffe", "animal"),
        ("bananas", "fruits"),
        ("a laptop", "electronics"),
    ],
)
def test_labels_real_phrases(labeler, phrase, main):
    labels = labeler.label_phrases([phrase])[0]
    assert labels[0] == main
    assert 1 <= len(labels) <= 3 and len(set(labels)) == len(labels)
    assert set(labels) <= set(load_taxonomy().labels)


def test_secondary_labels_come_from_the_other_words(labeler):
    assert labeler.label_phrases(["a man"]) == [["person", "male"]]
    assert labeler.label_phrases(["two small dogs"]) == [["animal", "numbers", "size"]]
    assert labeler.label_phrases(["a large red circle"]) == [["shape", "size", "color"]]


@pytest.mark.parametrize(
    "caption, phrases",
    [
        (
            "a woman sitting at a desk with a plate of food .",
            ["a woman", "sitting", "at a desk", "with a plate", "of food"],
        ),
        ("a man standing in front of a red bus", ["a man", "standing", "in front of", "a red bus"]),
        ("a large red circle left of a small blue square on a striped background",
         ["a large red circle", "left of", "a small blue square", "on a striped background"]),
        # word salad: every word alone, repeats kept, punctuation dropped, "and" alone
        (
            "winter swing winter and winter - winter blue",
            ["winter", "swing", "winter", "and", "winter", "winter", "blue"],
        ),
        ("red plokrab , johnson 's shelf 1 9 9 8", ["red", "plokrab", "johnson", "shelf", "1 9 9 8"]),
        ("a sink and a window", ["a sink", "and a window"]),
        ("standing near a green and yellow crate", ["standing", "near", "a green and yellow crate"]),
        (
            "a small key key in a refate 3 0 0 3 3 0 3 3 7",
            ["a small key", "key", "in a refate", "3 0 0 3", "3 0 3 3", "7"],
        ),
        ("a person is in the sky going down", ["a person", "is in the sky", "going down"]),
    ],
)
def test_splits_captions_like_the_reference(labeler, caption, phrases):
    assert split_phrases(caption, labeler.lexicon) == phrases


def test_label_captions_keeps_every_phrase_and_serialises(labeler):
    [result] = labeler.label_captions(["red red orange zuzuflying - a dog"])
    assert [p.text for p in result.phrases] == ["red", "red", "orange", "zuzuflying", "a dog"]
    assert [p.main for p in result.phrases] == ["color", "color", "color", "UNKNOWN", "animal"]
    doc = json.loads(result.model_dump_json(exclude_none=True))
    assert doc == {"caption": result.caption, "phrases": [{"text": p.text, "labels": p.labels} for p in result.phrases]}


def test_encoder_labels_unknown_concrete_words_and_caches_the_lexicon(tmp_path, monkeypatch):
    lexicon = Lexicon({"animal": ["dog", "eagle"], "object": ["cup"], "clothing": ["jacket"], "UNKNOWN": ["idea"]})
    first = EmbeddedLabeler(tmp_path, lexicon=lexicon)
    assert first.label_phrases(["a puppy", "mug", "a coat", "happiness"]) == [
        ["animal"],
        ["object"],
        ["clothing"],
        ["UNKNOWN"],  # not close to anything
    ]
    assert len(list(tmp_path.glob("minilm-*.npy"))) == 1
    encoded: list[int] = []
    real_encode = encoder_module.TextEncoder.encode
    monkeypatch.setattr(encoder_module.TextEncoder, "encode", lambda s, t: encoded.append(len(t)) or real_encode(s, t))
    assert EmbeddedLabeler(tmp_path, lexicon=lexicon).label_phrases(["a puppy"]) == [["animal"]]
    assert encoded == [1]  # the lexicon came from the cache; only the phrase was encoded


def test_lexicon_is_consistent():
    lexicon = Lexicon.load()
    assert set(lexicon.labels.values()) <= set(load_taxonomy().labels)
    with pytest.raises(ValueError, match="both"):
        Lexicon({"animal": ["bat"], "object": ["bat"]})
    assert "run" in stems("running") and "berry" in stems("berries") and "dance" in stems("dancing")


class CountingLabeler:
    def __init__(self) -> None:
        self.seen: list[str] = []

    def label_captions(self, captions):
        self.seen += captions
        return [CaptionLabels(caption=c) for c in captions]

    def label_phrases(self, phrases):
        self.seen += phrases
        return [["object"] for _ in phrases]


def test_stage_labels_identical_captions_once():
    counting = CountingLabeler()
    result = categorize(["b", "a", "b", "b"], counting)
    assert counting.seen == ["b", "a"]
    assert [r.caption for r in result] == ["b", "a", "b", "b"]
    assert categorize_phrases(["x", "x", "y"], counting) == [["object"]] * 3
    assert counting.seen[2:] == ["x", "y"]
