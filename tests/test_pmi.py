"""Likelihood grounding (issue 22): teacher-forced scoring of a caption under any image's latents, and
the PMI of its tokens, words and phrases against the gray null input."""

from __future__ import annotations

import pytest
import torch

from latent_verbalizer.services.decoder.model import TextDecoder
from latent_verbalizer.services.decoder.stage import decode, score
from latent_verbalizer.services.demo.evaluate import scene_items
from latent_verbalizer.services.encoder.stage import check_layers, encode, load_pixels
from latent_verbalizer.services.families import load_family
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
    return score(lm, rows, None, [d.tokens for d in decoded], batch_rows=7)  # batches of mixed lengths


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


def test_score_reads_the_image_and_only_the_asked_positions(demo, demo_rows):
    decoded = decode(demo, demo_rows[-2:], DecodeParams())
    own = teacher_forced(demo, demo_rows[-2:], decoded)
    swapped = teacher_forced(demo, demo_rows[-2:].flip(0), decoded)  # each caption under the other image
    assert all((a - b).abs().max() > 0.1 for a, b in zip(own, swapped))
    ids = torch.tensor([[demo.start_id, *decoded[0].tokens, demo.end_id]])
    full = TextDecoder.of(demo.model).score(demo_rows[-1:], ids)  # no lengths: every position
    part = TextDecoder.of(demo.model).score(demo_rows[-1:], ids, torch.tensor([2]))
    assert torch.equal(part[0, :2], full[0, :2]) and not part[0, 2:].any()


def test_score_refuses_more_positions_than_the_text_tower_has(tiny, pixels):
    rows = encode(tiny.model.visual, pixels[:1], [0])[0]
    with pytest.raises(ValueError, match="positions"):
        TextDecoder.of(tiny.model).score(rows, torch.zeros(1, 100, dtype=torch.long))
