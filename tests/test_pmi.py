"""Likelihood grounding (issue 22): teacher-forced scoring of a caption under any image's latents, and
the PMI of its tokens, words and phrases against the gray null input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_families import tiny_blip, tiny_llava

from latent_verbalizer.services.decoder.model import TextDecoder
from latent_verbalizer.services.decoder.stage import decode, score
from latent_verbalizer.services.demo.evaluate import scene_items
from latent_verbalizer.services.encoder.stage import check_layers, encode, load_pixels
from latent_verbalizer.services.families import load_family
from latent_verbalizer.shared import pmi
from latent_verbalizer.shared.schemas import DecodeParams
from latent_verbalizer.shared.settings import DEMO_MODEL, DEMO_PRETRAINED

STRATEGIES = [
    DecodeParams(seq_len=20),
    DecodeParams(strategy="sample", seq_len=20, top_k=40, temperature=1.3, seed=3),
    DecodeParams(strategy="beam", seq_len=20, num_beams=3),
]


@pytest.fixture(scope="module")
def demo():
    return load_family(DEMO_MODEL, DEMO_PRETRAINED)


@pytest.fixture(scope="module")
def demo_rows(demo):
    """Every layer of 4 synthetic scenes as rows [24, N, D]: early layers' captions are long word
    salad, late ones short scene descriptions, so the rows end at many lengths."""
    items, _ = scene_items(11, 4)
    pixels, _, _ = load_pixels(demo, items, 10**8)
    return encode(demo.model.visual, pixels, check_layers(demo.model.visual, None)).flatten(0, 1)


def teacher_forced(lm, rows: torch.Tensor, decoded) -> list[torch.Tensor]:
    """The family's teacher-forced scoring (CoCa: TextDecoder.score over [start, tokens, end]) of each decoded
    caption -> per caption the log-probs of its tokens and end token (a caption that ended with the pad id 0
    has no other end)."""
    return score(lm, rows, None, [d.tokens for d in decoded], pmi.TEMPERATURE, batch_rows=7)  # mixed lengths


@pytest.mark.parametrize("params", STRATEGIES, ids=lambda p: p.strategy)
@pytest.mark.parametrize("model", ["demo", "trained_like"])
def test_teacher_forced_log_probs_equal_what_decoding_computed(model, params, request, demo_rows, pixels):
    lm = request.getfixturevalue(model)
    rows = demo_rows if model == "demo" else encode(lm.model.visual, pixels, [0, 3]).flatten(0, 1)
    decoded = decode(lm, rows, params)
    if model == "demo":
        assert len({len(d.tokens) for d in decoded}) > 2  # the check covers many lengths
    for d, scored in zip(decoded, teacher_forced(lm, rows, decoded), strict=True):
        assert len(d.logprob) == len(d.entropy) == len(scored)
        assert torch.allclose(scored, torch.tensor(d.logprob), atol=1e-4, rtol=1e-4)
        assert all(lp <= 0 for lp in d.logprob)


@pytest.mark.parametrize("family", ["tiny", "llava", "blip"])
def test_every_family_gets_pmi_per_token_and_per_word(family, request, tmp_path_factory):
    """PMI's image side is what decoding kept (its logprob, at pmi.TEMPERATURE), its null side the family's
    teacher-forced score at the same temperature: the two agree for every family, and the temperature matters.
    Every caption's tokens group into its words, whether the tokenizer ends a word with "</w>" (CLIP) or starts
    one with a space (Llama, BERT)."""
    lm = {"tiny": lambda: request.getfixturevalue("tiny"),
          "llava": lambda: load_family(str(tiny_llava(tmp_path_factory.mktemp("llava")))),
          "blip": lambda: load_family(str(tiny_blip(tmp_path_factory.mktemp("blip"))))}[family]()
    rng = np.random.default_rng(5)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(2)]
    pixels = torch.stack([lm.preprocess(im) for im in images]).to(lm.device, lm.dtype)
    rows = lm.encode(pixels, [0, lm.num_layers - 1]).latents.flatten(0, 1)  # [4, N, D]
    decoded = decode(lm, rows, DecodeParams(seq_len=10))
    tokens = [d.tokens for d in decoded]
    for d, tempered in zip(decoded, score(lm, rows, None, tokens, pmi.TEMPERATURE), strict=True):
        assert torch.allclose(tempered[: len(d.logprob)], torch.tensor(d.logprob), atol=1e-4, rtol=1e-4)
        runs = pmi.word_runs(lm.token_texts(d.tokens), d.text)
        assert runs is not None and ["".join(lm.token_texts([d.tokens[p] for p in run])).strip() for run in runs] \
            == pmi.caption_words(d.text)
    raw = score(lm, rows, None, tokens)
    assert any(not torch.allclose(torch.tensor(d.logprob), r[: len(d.logprob)], atol=1e-3)
               for d, r in zip(decoded, raw))


def test_score_reads_the_image_and_only_the_asked_positions(demo, demo_rows):
    decoded = decode(demo, demo_rows[-2:], DecodeParams())
    own = teacher_forced(demo, demo_rows[-2:], decoded)
    swapped = teacher_forced(demo, demo_rows[-2:].flip(0), decoded)  # each caption under the other image
    assert all((a - b).abs().max() > 0.1 for a, b in zip(own, swapped))
    ids = torch.tensor([[demo.start_id, *decoded[0].tokens, demo.end_id]])
    full = TextDecoder.of(demo.model).score(demo_rows[-1:], ids)  # no lengths: every position
    part = TextDecoder.of(demo.model).score(demo_rows[-1:], ids, torch.tensor([2]))
    assert torch.equal(part[0, :2], full[0, :2]) and not part[0, 2:].any()


@pytest.mark.parametrize("model", ["demo", "trained_like"])
def test_one_image_for_every_row_scores_as_that_image_repeated(model, request, demo_rows, pixels):
    lm = request.getfixturevalue(model)
    rows = demo_rows if model == "demo" else encode(lm.model.visual, pixels, [0, 3]).flatten(0, 1)
    decoded = decode(lm, rows, DecodeParams(seq_len=12))
    ids = torch.tensor([[lm.start_id, *d.tokens, lm.end_id] + [lm.pad_id] * (10 - len(d.tokens)) for d in decoded])
    decoder = TextDecoder.of(lm.model)
    repeated = decoder.score(rows[3:4].repeat(len(ids), 1, 1), ids)  # [B, N, D]: the fold, per row
    shared = decoder.score(rows[3:4], ids)  # [1, N, D]: the cross-attention's keys and values once
    assert torch.allclose(shared, repeated, atol=1e-4, rtol=1e-4)


def test_score_refuses_more_positions_than_the_text_tower_has(tiny, pixels):
    rows = encode(tiny.model.visual, pixels[:1], [0])[0]
    with pytest.raises(ValueError, match="positions"):
        TextDecoder.of(tiny.model).score(rows, torch.zeros(1, 100, dtype=torch.long))


@pytest.mark.parametrize("model", ["tiny", "trained_like"])
def test_grounded_captions_carry_pmi_against_the_gray_image_at_their_layer(model, request, gray_grounded):
    lm = request.getfixturevalue(model)
    layers, params = [3, 0], DecodeParams(seq_len=10)
    _, latents, _, g = gray_grounded(lm, layers, params)
    decoded = decode(lm, latents.transpose(0, 1).flatten(0, 1), params)  # image-major, as caption_grounded's
    null = latents[:, 3]  # [L, N, D]: the gray image's rows
    decoder = TextDecoder.of(lm.model)
    for i, per_image in enumerate(g.captions):
        for j, c in enumerate(per_image):
            d = decoded[i * len(layers) + j]
            assert c.tokens == d.tokens and len(c.pmi) == len(c.tokens)
            ids = torch.tensor([[lm.start_id, *c.tokens]])
            under_null = decoder.score(null[j : j + 1], ids, temperature=pmi.TEMPERATURE)[0]
            assert c.pmi == pytest.approx((torch.tensor(d.logprob[: len(c.tokens)]) - under_null).tolist(), abs=1e-4)
            assert c.image_pmi == pytest.approx(sum(c.pmi) / len(c.pmi))
            if i == 3:  # the null image's own captions: the image adds nothing to any token
                assert c.pmi == pytest.approx([0.0] * len(c.pmi), abs=1e-4)
            texts = lm.token_texts(c.tokens)
            runs = pmi.word_runs(texts, c.caption)
            assert runs is not None and c.word_pmi == pytest.approx(pmi.word_pmi(c.pmi, runs))
            words = pmi.caption_words(c.caption)
            assert c.supported_share == pmi.supported_share(words, c.word_pmi)


def test_words_group_tokens_as_the_viewer_does(tiny):
    caption = "a blue-ish square!! on 2 grayish backgrounds"
    ids = tiny.tokenizer.encode(caption)
    texts = tiny.token_texts(ids)  # "a ", "blue ", "- ", "ish ", "square ", "!! ", ...
    shown = tiny.decode_text(ids)  # "a blue - ish square !! on 2 grayish backgrounds"
    runs = pmi.word_runs(texts, shown)
    assert [[texts[p] for p in run] for run in runs][8:] == [["gray", "ish "], ["backgrounds "]]
    assert pmi.word_runs(texts, caption) is None  # 6 words shown, 10 runs: no word gets a wrong value
    leading = ["a", " blue", "-", "ish", " ", " square", "!!"]  # Llama's / BERT's pieces: a space starts a word
    assert pmi.word_runs(leading, "a blue-ish square!!") == [[0], [1, 2, 3], [5, 6]]
    assert pmi.word_pmi([1.0, 2.0, 4.0], [[0], [1, 2]]) == [1.0, 3.0]


def test_supported_share_counts_content_words_only():
    words = ["a", "red", "circle", "left", "of", "a", "blue", "square", "!!"]
    values = [9.0, 2.0, 0.5, 3.0, 9.0, 9.0, -1.0, 1.5, 9.0]
    assert pmi.supported_share(words, values, tau=1.0) == pytest.approx(3 / 5)  # red, left, square of 5
    assert pmi.supported_share(["a", "of", "-"], [5.0, 5.0, 5.0]) is None


def test_phrases_are_found_in_order_among_the_caption_words():
    caption = "a red circle left of a red circle on a gray - ish background"
    phrases = ["A red circle", "left of", "a RED circle,", "on", "a gray-ish background", "a blue cube"]
    assert pmi.align_phrases(caption, phrases) == [[0, 1, 2], [3, 4], [5, 6, 7], [8], [9, 10, 12, 13], None]
    values = list(range(14))
    assert pmi.phrase_pmi(caption, values, phrases[:2] + phrases[-1:]) == [1.0, 3.5, None]
