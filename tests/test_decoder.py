"""The cached decoder gives exactly the captions of open_clip's own (uncached) decoding."""

import math

import pytest
import torch

from latent_verbalizer.services.decoder.model import TextDecoder
from latent_verbalizer.services.decoder.stage import caption_layers, decode
from latent_verbalizer.services.encoder.stage import check_layers, encode
from latent_verbalizer.shared.models import load_model
from latent_verbalizer.shared.schemas import DecodeParams

SOT, EOT, PAD = 49406, 49407, 0


@pytest.fixture(scope="module")
def latents(tiny, pixels):
    return encode(tiny.model.visual, pixels, check_layers(tiny.model.visual, None))  # [4, 6, 8, 48]


def strip(seq: list[int]) -> list[int]:
    """open_clip output row -> generated tokens without start token, end token and padding."""
    out = []
    for t in seq[1:]:
        if t == EOT:
            break
        out.append(t)
        if t == PAD:
            break
    return out


@torch.no_grad()
def reference_greedy(model, image_tokens, seq_len, min_seq_len):
    """Plain full-recompute loop: whole prefix through both text stacks at every step."""
    rows = []
    for emb in image_tokens:
        seq = [SOT]
        while len(seq) < seq_len:
            text_latent, token_embs = model._encode_text(torch.tensor([seq]))
            logits = model.text_decoder(emb[None], token_embs)[0, -1]
            if len(seq) < min_seq_len:
                logits[EOT] = -math.inf
            nxt = EOT if len(seq) + 1 == seq_len else int(logits.argmax())
            seq.append(nxt)
            if nxt in (EOT, PAD):
                break
        rows.append(strip(seq))
    return rows


def test_greedy_matches_full_recompute_reference(tiny, latents):
    ours = decode(tiny, latents[-1], DecodeParams(seq_len=12))
    assert [d.tokens for d in ours] == reference_greedy(tiny.model, latents[-1], 12, 5)


def test_step_logits_match_open_clip_decoder_with_trained_like_weights(trained_like, latents):
    image_tokens, prefix = latents[-1], [SOT, 320, 1929, 539]  # [6, 8, 48]; any tokens will do
    decoder = TextDecoder.of(trained_like.model)
    caches = decoder.new_caches(len(image_tokens), len(prefix), image_tokens.device)
    keys = decoder.image_keys(image_tokens)
    with torch.inference_mode():
        for pos, token in enumerate(prefix):
            ours = decoder.step(torch.full((len(image_tokens),), token), pos, caches, keys)
        _, token_embs = trained_like.model._encode_text(torch.tensor([prefix] * len(image_tokens)))
        expected = trained_like.model.text_decoder(image_tokens, token_embs)[:, -1]
    assert torch.allclose(ours, expected, atol=1e-4, rtol=1e-4)
    greedy = decode(trained_like, image_tokens, DecodeParams(seq_len=12))
    assert [d.tokens for d in greedy] == reference_greedy(trained_like.model, image_tokens, 12, 5)


@pytest.mark.parametrize("seq_len,min_seq_len,penalty", [(30, 5, 1.0), (9, 3, 1.0), (16, 5, 1.3)])
def test_greedy_matches_open_clip_generate(tiny, pixels, latents, seq_len, min_seq_len, penalty):
    expected = tiny.model.generate(pixels, generation_type="top_k", top_k=1, seq_len=seq_len,
                                   min_seq_len=min_seq_len, repetition_penalty=penalty)
    ours = decode(tiny, latents[-1], DecodeParams(seq_len=seq_len, min_seq_len=min_seq_len,
                                                  repetition_penalty=penalty))
    assert [d.tokens for d in ours] == [strip(r) for r in expected.tolist()]


def test_caption_alone_equals_caption_in_a_batch_of_64_mixed_layers(tiny, latents):
    rows = latents.reshape(-1, 8, 48)  # 24 rows: 4 layers x 6 images
    mixed = rows[torch.arange(64) * 7 % 24]  # 64 rows, every layer, shuffled, with repeats
    batch = decode(tiny, mixed, DecodeParams())
    for i in (0, 5, 33, 63):
        alone = decode(tiny, mixed[i : i + 1], DecodeParams())[0]
        assert alone.tokens == batch[i].tokens
        assert alone.entropy == pytest.approx(batch[i].entropy, abs=1e-4)


def test_one_decoder_per_model_made_again_when_its_weights_change():
    model = load_model("coca_tiny").model
    decoder = TextDecoder.of(model)
    assert TextDecoder.of(model) is decoder
    model.to(torch.bfloat16)  # new weight tensors: reordered fp32 copies would be stale
    assert TextDecoder.of(model) is not decoder and TextDecoder.of(model).vocab.reordered is None


@pytest.fixture()
def eot_loving(tiny):
    """The same model with the end token made the most likely one at every step."""
    proj, ln = tiny.model.text_decoder.text_projection, tiny.model.text_decoder.ln_final
    saved = proj[:, EOT].clone(), ln.bias.clone()
    with torch.no_grad():  # a large constant after the final norm, read only by the EOT column
        ln.bias += 50
        proj[:, EOT] = 1
    yield tiny
    with torch.no_grad():
        proj[:, EOT], ln.bias[:] = saved


def test_min_length_and_end_token_honoured(eot_loving, pixels, latents):
    ours = decode(eot_loving, latents[-1], DecodeParams(seq_len=20, min_seq_len=7))
    # EOT is blocked until 7 tokens (start included) are present, then wins at once: 6 words.
    assert [len(d.tokens) for d in ours] == [6] * 6
    assert all(len(d.entropy) == 7 for d in ours)  # 6 words + the end token
    expected = eot_loving.model.generate(pixels, generation_type="top_k", top_k=1, seq_len=20, min_seq_len=7)
    assert [d.tokens for d in ours] == [strip(r) for r in expected.tolist()]


def test_max_length_forces_end_token(tiny, latents):
    for seq_len in (2, 6, 30):
        for d in decode(tiny, latents.reshape(-1, 8, 48), DecodeParams(seq_len=seq_len, min_seq_len=1)):
            assert len(d.tokens) <= seq_len - 2 or (d.tokens and d.tokens[-1] == PAD)
            assert len(d.entropy) <= seq_len - 1


def test_entropy_is_bits_of_the_full_softmax(tiny, latents):
    d = decode(tiny, latents[-1][:1], DecodeParams(seq_len=4, min_seq_len=1))[0]
    _, token_embs = tiny.model._encode_text(torch.tensor([[SOT]]))
    logits = tiny.model.text_decoder(latents[-1][:1], token_embs)[0, -1]
    p = logits.softmax(-1)
    assert d.entropy[0] == pytest.approx(float(-(p * p.log2()).sum()), rel=1e-4)
    assert d.mean_entropy == pytest.approx(sum(d.entropy) / len(d.entropy))
    assert 0 < d.entropy[0] <= math.log2(49408)


def test_seeded_sampling_is_reproducible_and_batch_invariant(tiny, latents):
    rows = latents.reshape(-1, 8, 48)
    keys = torch.arange(100, 124)
    params = DecodeParams(strategy="sample", top_k=50, top_p=0.95, temperature=1.5, seed=7)
    a = decode(tiny, rows, params, keys)
    b = decode(tiny, rows[5:6], params, keys[5:6])
    c = decode(tiny, rows, params.model_copy(update={"seed": 8}), keys)
    assert a == decode(tiny, rows, params, keys)
    assert b[0].tokens == a[5].tokens
    assert [x.tokens for x in a] != [x.tokens for x in c]
    assert len({tuple(x.tokens) for x in a}) > 1


def test_top_k_one_sampling_is_greedy(tiny, latents):
    greedy = decode(tiny, latents[-1], DecodeParams())
    sampled = decode(tiny, latents[-1], DecodeParams(strategy="sample", top_k=1, temperature=3.0))
    assert [d.tokens for d in greedy] == [d.tokens for d in sampled]


def test_one_beam_without_length_penalty_is_greedy(tiny, latents):
    rows = latents.reshape(-1, 8, 48)[:8]
    params = DecodeParams(seq_len=10, min_seq_len=3)
    beam = decode(tiny, rows, params.model_copy(update={"strategy": "beam", "num_beams": 1, "length_penalty": 0}))
    assert [b.tokens for b in beam] == [g.tokens for g in decode(tiny, rows, params)]


def test_beam_search_returns_well_formed_captions(tiny, latents, eot_loving):
    rows = latents.reshape(-1, 8, 48)[:8]
    beam = decode(tiny, rows, DecodeParams(strategy="beam", num_beams=4, seq_len=8, min_seq_len=4))
    for b in beam:
        assert len(b.tokens) == 3  # EOT wins as soon as allowed, on every beam
        assert len(b.entropy) == 4


def test_caption_layers_covers_every_image_and_layer(tiny, latents):
    per_image = caption_layers(tiny, latents, [0, 1, 2, 3], [f"img{i}" for i in range(6)])
    assert len(per_image) == 6
    for caps in per_image:
        assert [c.layer for c in caps] == [0, 1, 2, 3]
        assert all(c.caption and c.tokens and len(c.entropy) >= 1 for c in caps)
    alone = decode(tiny, latents[2, 4:5], DecodeParams())[0]
    assert per_image[4][2].tokens == alone.tokens


def test_seq_len_beyond_positions_is_refused(tiny, latents):
    with pytest.raises(ValueError, match="positions"):
        decode(tiny, latents[-1], DecodeParams(seq_len=40))
