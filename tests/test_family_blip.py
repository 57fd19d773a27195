"""The BLIP family on a tiny random BlipForConditionalGeneration saved to a temp dir and loaded through
services.families.blip: what it reads at each layer, that its greedy captions through the project's one decoding
loop are the model's own (`generate` at the last layer, the text decoder's `generate` fed that layer's
post_layernorm tokens at every layer, the prompt as BLIP's conditional prefix), that scoring gives the log-probs
decoding saw, that rows and masks behave, and `verbalize --model DIR` end to end (regions, word maps)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_families import tiny_blip

from latent_verbalizer.services.cli import main
from latent_verbalizer.services.decoder.stage import decode, decode_layers
from latent_verbalizer.services.families import FamilyError, base, blip, load_family
from latent_verbalizer.shared.attributions import map_key, read_attributions
from latent_verbalizer.shared.schemas import DecodeParams

SEQ_LEN = 9  # at most 8 generated tokens, end token included


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    return tiny_blip(tmp_path_factory.mktemp("blip"))


@pytest.fixture(scope="module")
def family(blip_dir) -> blip.BlipFamily:
    return blip.load(str(blip_dir))


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (20 + 7 * i, 30, 3), dtype=np.uint8)) for i in range(3)]


@pytest.fixture(scope="module")
def pixels(family, images) -> torch.Tensor:
    return torch.stack([family.preprocess(im) for im in images])


def greedy_tokens(family: blip.BlipFamily, rows: torch.Tensor, seq_len: int = SEQ_LEN) -> list[list[int]]:
    """rows [R, T, C] -> each row's greedy tokens through the project's decoding loop."""
    return [d.tokens for d in decode(family, rows, DecodeParams(seq_len=seq_len, min_seq_len=1))]


def greedy(family: blip.BlipFamily, rows: torch.Tensor, mask: torch.Tensor | None = None, seq_len: int = SEQ_LEN):
    """Drives the stepper greedily as the decoding loop does, keeping what the loop does not return: per row the
    generated tokens (end token cut) and the log-prob of each token it chose, end token included."""
    B = rows.shape[0]
    stepper = family.stepper(rows, mask, seq_len, attention=False)
    alive, token = torch.arange(B), torch.full((B,), family.start_id)
    tokens, logps = [[] for _ in range(B)], [[] for _ in range(B)]
    for pos in range(seq_len - 1):
        logits = stepper.step(token, pos)
        token = logits.argmax(-1)
        chosen = logits.log_softmax(-1).gather(1, token[:, None])[:, 0]
        for r, t, lp in zip(alive.tolist(), token.tolist(), chosen.tolist()):
            tokens[r].append(t)
            logps[r].append(lp)
        live = token != family.end_id
        if not live.any():
            break
        alive, token = alive[live], token[live]
        stepper.keep(live.nonzero()[:, 0])
    return [t[:-1] if t and t[-1] == family.end_id else t for t in tokens], logps


def cut(ids: list[int], end_id: int) -> list[int]:
    return ids[: ids.index(end_id)] if end_id in ids else ids


def test_loads_the_model_and_names_its_parts(family):
    assert (family.family, family.num_layers, family.feature_layer) == ("blip", 4, 3)
    assert family.start_id == family.tokenizer.convert_tokens_to_ids("[DEC]")
    assert family.stop_ids == family.end_ids == (family.tokenizer.convert_tokens_to_ids("[SEP]"),)
    assert family.prompt is None and family.prefix.tolist() == [family.start_id]
    assert family.default_min_seq_len == 1 and not family.force_end_at_limit  # generate blocks nothing
    assert family.max_seq_len == 64
    assert "BlipForImageTextRetrieval" in family.missing["contrastive"]


def test_latents_are_post_layernorm_of_each_block(family, pixels):
    encoded = family.encode(pixels, list(range(family.num_layers)))
    vision = family.model.vision_model
    out = vision(pixel_values=pixels, output_hidden_states=True)
    assert encoded.latents.shape == (4, 3, 10, 32)  # L, n, 1 + 3x3 patches, width
    assert torch.equal(encoded.latents[-1], out.last_hidden_state)
    raw = family.hidden_states(pixels, [0, 2])  # --save-features: before post_layernorm
    assert torch.equal(raw[1], out.hidden_states[3])
    for i in range(family.num_layers):
        assert torch.allclose(encoded.latents[i], vision.post_layernorm(out.hidden_states[i + 1]))
    with pytest.raises(ValueError, match="vision blocks 0..3"):
        family.encode(pixels, [4])


def test_last_layer_greedy_is_the_models_generate(family, pixels):
    latents = family.encode(pixels, [family.feature_layer]).latents[0]
    ours = greedy_tokens(family, latents)
    assert ours == greedy(family, latents)[0]
    reference = family.model.generate(pixel_values=pixels, max_new_tokens=SEQ_LEN - 1)
    assert ours == [cut(r[1:], family.end_id) for r in reference.tolist()]


def test_every_layer_greedy_is_the_text_decoders_generate_on_that_layer(family, images, pixels):
    layers = list(range(family.num_layers))
    latents = family.encode(pixels, layers).latents  # [L, n, T, C]
    decoded = decode_layers(family, latents, layers, ["a", "b", "c"], DecodeParams(seq_len=SEQ_LEN, min_seq_len=1))
    captions = [decoded[i * len(layers) + j].tokens for j in layers for i in range(len(pixels))]  # layer-major
    vision = family.model.vision_model
    hidden = vision(pixel_values=pixels, output_hidden_states=True).hidden_states
    reference = []
    for i in layers:
        out = family.model.text_decoder.generate(
            input_ids=torch.full((len(pixels), 1), family.start_id), eos_token_id=family.end_id,
            pad_token_id=family.pad_id, encoder_hidden_states=vision.post_layernorm(hidden[i + 1]),
            max_new_tokens=SEQ_LEN - 1, do_sample=False)
        reference += [cut(r[1:], family.end_id) for r in out.tolist()]
    assert captions == reference
    assert captions[-len(pixels):] == [blip.reference_tokens(family, im, 3, SEQ_LEN - 1) for im in images]
    assert len({tuple(c) for c in captions}) > len(captions) // 2  # layers and images read differently


def test_prompt_is_blips_conditional_prefix(blip_dir, images, pixels):
    family = blip.load(str(blip_dir), prompt="a photo of")
    assert family.tokenizer.convert_ids_to_tokens(family.prefix.tolist()) == ["[DEC]", "a", "photo", "of"]
    assert family.max_seq_len == 64 - 3
    latents = family.encode(pixels, [family.feature_layer]).latents[0]
    ours = greedy_tokens(family, latents)
    inputs = family.processor(images=[Image.new("RGB", (8, 8))] * len(pixels), text=["a photo of"] * len(pixels),
                              return_tensors="pt")
    reference = family.model.generate(pixel_values=pixels, input_ids=inputs.input_ids, max_new_tokens=SEQ_LEN - 1)
    assert ours == [cut(r[len(family.prefix):], family.end_id) for r in reference.tolist()]
    assert any(ours)
    assert ours == [blip.reference_tokens(family, im, family.feature_layer, SEQ_LEN - 1) for im in images]


def test_beam_search_is_the_text_decoders_beam_search(family, pixels):
    """The one loop's beam search gives transformers' beam search with early_stopping="never" on these rows; with
    transformers' default (False, which stops a caption on a guess from the running beams' current length) one
    caption of the 12 differs."""
    rows = family.encode(pixels, list(range(family.num_layers))).latents.flatten(0, 1)  # [L * n, T, C]
    ours = decode(family, rows, DecodeParams(seq_len=SEQ_LEN, min_seq_len=1, strategy="beam", num_beams=3))
    out = family.model.text_decoder.generate(
        input_ids=torch.full((len(rows), 1), family.start_id), eos_token_id=family.end_id, pad_token_id=family.pad_id,
        encoder_hidden_states=rows, max_new_tokens=SEQ_LEN - 1, num_beams=3, do_sample=False, early_stopping="never")
    assert [d.tokens for d in ours] == [cut(r[1:], family.end_id) for r in out.tolist()]


def test_score_gives_the_log_probs_decoding_saw(family, pixels, monkeypatch):
    rows = family.encode(pixels, [0, 2]).latents.flatten(0, 1)
    tokens, logps = greedy(family, rows)
    scored = family.score(rows, None, tokens)
    ended = [len(lp) == len(t) + 1 for t, lp in zip(tokens, logps)]
    assert any(ended) and not all(ended)  # both ways a caption stops are checked
    for got, want, t in zip(scored, logps, tokens):
        assert got.dtype == torch.float32 and got.shape == (len(t) + 1,)
        if len(want) == len(t) + 1:  # ended with the end token (else it stopped at the length limit)
            assert torch.allclose(got, torch.tensor(want), atol=1e-5)
        else:
            assert torch.allclose(got[:-1], torch.tensor(want), atol=1e-5)
    monkeypatch.setattr(base, "SCORE_LOGITS", 1)  # the vocabulary projection one row at a time: the same
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(family.score(rows, None, tokens), scored))
    # Given tokens need not be the model's choice: scoring one row alone gives the same log-probs.
    other = [[7, 8, 9], []]
    both = family.score(rows[:2], None, other)
    assert torch.allclose(both[0], family.score(rows[:1], None, other[:1])[0], atol=1e-6)
    assert both[1].shape == (1,)


def test_rows_are_independent_of_their_batch(family, pixels):
    rows = family.encode(pixels, [1, 3]).latents.flatten(0, 1)
    together = greedy_tokens(family, rows)
    assert together == [greedy_tokens(family, rows[r : r + 1])[0] for r in range(len(rows))]
    # keep() reorders and repeats rows as beam search does: each row's cache follows it.
    stepper = family.stepper(rows[:2], None, SEQ_LEN, attention=False)
    stepper.step(torch.full((2,), family.start_id), 0)
    stepper.keep(torch.tensor([1, 0, 1]))
    logits = stepper.step(torch.tensor([7, 7, 8]), 1)
    for b, (r, t) in enumerate([(1, 7), (0, 7), (1, 8)]):
        alone = family.stepper(rows[r : r + 1], None, SEQ_LEN, attention=False)
        alone.step(torch.tensor([family.start_id]), 0)
        assert torch.allclose(logits[b], alone.step(torch.tensor([t]), 1)[0], atol=1e-5)


def test_a_mask_over_image_tokens_limits_what_is_read(family, pixels):
    rows = family.encode(pixels, [3]).latents[0]  # [n, T, C]
    T = rows.shape[1]
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    mask[:, :4] = True  # the class token and the first 3 patches
    attention = torch.empty(len(rows), T)
    stepper = family.stepper(rows, mask, SEQ_LEN, attention=True)
    masked = stepper.step(torch.full((len(rows),), family.start_id), 0, attention)
    # Masking the image tokens is reading only the unmasked ones.
    cut_rows = family.stepper(rows[:, :4], None, SEQ_LEN, attention=False)
    assert torch.allclose(masked, cut_rows.step(torch.full((len(rows),), family.start_id), 0), atol=1e-5)
    whole = family.stepper(rows, None, SEQ_LEN, attention=False).step(torch.full((len(rows),), family.start_id), 0)
    assert not torch.allclose(masked, whole, atol=1e-3)
    assert (attention[:, 4:] == 0).all() and torch.allclose(attention.sum(-1), torch.ones(len(rows)))
    params = DecodeParams(seq_len=SEQ_LEN, min_seq_len=1)
    assert [d.tokens for d in decode(family, rows, params, masks=mask)] == greedy_tokens(family, rows[:, :4])
    assert torch.allclose(family.score(rows, mask, [[7, 8]])[0], family.score(rows[:1, :4], None, [[7, 8]])[0],
                          atol=1e-5)
    with pytest.raises(ValueError, match="reads no image token"):
        family.stepper(rows, torch.zeros(len(rows), T, dtype=torch.bool), SEQ_LEN, attention=False)


def test_attention_is_each_steps_mean_cross_attention(family, pixels):
    """The attention a step returns is the mean over decoder layers and heads of the model's own cross-attention
    weights (transformers' `output_attentions`) from the newest position."""
    rows = family.encode(pixels, [2]).latents[0]
    n = len(rows)
    stepper = family.stepper(rows, None, SEQ_LEN, attention=True)
    first = torch.empty(n, rows.shape[1])
    stepper.step(torch.full((n,), family.start_id), 0, first)
    second = torch.empty(n, rows.shape[1])
    stepper.step(torch.tensor([7] * n), 1, second)
    out = family.model.text_decoder(input_ids=torch.tensor([[family.start_id, 7]] * n), encoder_hidden_states=rows,
                                    output_attentions=True)
    reference = torch.stack(out.cross_attentions).mean((0, 2))  # [n, S, T]
    assert torch.allclose(first, reference[:, 0], atol=1e-6) and torch.allclose(second, reference[:, 1], atol=1e-6)


def test_geometry_places_pixels_where_the_image_processor_puts_them(family):
    geometry = family.geometry
    assert (geometry.grid, geometry.class_token) == ((3, 3), True)
    placed = geometry.place(48, 30)  # squashed to 24 x 24, nothing cropped
    assert placed.to_input((0, 0, 48, 30)) == (0, 0, 24, 24)
    assert placed.to_input((12, 10, 24, 20)) == (6, 8, 12, 16)


def test_texts(family):
    ids = family.tokenizer("two cars sitting", add_special_tokens=False).input_ids
    assert family.decode_text(ids + [family.end_id]) == "two cars sitting"
    assert family.token_texts(ids) == ["two", " car", "s", " sitting"]


def test_bad_model_and_settings_are_named(tmp_path, family, pixels):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "blip"}))
    with pytest.raises(FamilyError, match="not a loadable BLIP directory"):
        load_family(str(tmp_path))
    with pytest.raises(FamilyError, match="leave --pretrained out"):
        load_family(str(family.name), pretrained="x")
    with pytest.raises(FamilyError, match="dtype must be one of"):
        blip.load("x", dtype="fp64")
    with pytest.raises(ValueError, match="exceeds the text decoder's 64 positions"):
        family.stepper(pixels.new_zeros(1, 10, 32), None, 65)
    with pytest.raises(FamilyError, match="no contrastive"):
        family.encode(pixels, [0], contrastive=True)


def test_verbalize_captions_every_layer_as_the_model_does(blip_dir, images, tmp_path):
    """`verbalize DIR --model BLIP_DIR`: every layer's tokens are the model's own path at that layer; a region's
    captions read only the region's patches; word maps cover the patch grid; no contrastive score, and said."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i, im in enumerate(images[:2]):
        im.save(folder / f"{i}.png")
    out = tmp_path / "out"
    assert main(["verbalize", str(folder), "--out", str(out), "--model", str(blip_dir), "--seq-len", str(SEQ_LEN),
                 "--device", "cpu", "--attributions", "--region", "left=0,0,0.5,1"]) == 0
    family = blip.load(str(blip_dir))
    run = json.loads((out / "run.json").read_text())
    assert (run["family"], run["prompt"], run["layers"]) == ("blip", None, 4)
    assert "BlipForImageTextRetrieval" in run["extras"]["contrastive"]
    results = {r["id"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    column_0 = [1, 4, 7]  # the class token, then the 3 x 3 patches row-major: the left half covers column 0
    for i, im in enumerate(images[:2]):
        r = results[str(i)]
        assert [c["layer"] for c in r["layers"]] == [0, 1, 2, 3]
        assert [c["tokens"] for c in r["layers"]] == [blip.reference_tokens(family, im, j, SEQ_LEN - 1)
                                                       for j in range(4)]
        for c in r["layers"]:  # grounding without a contrastive head: prior, last-layer similarity and PMI
            assert "image_score" not in c and "retrieval_rank" not in c and "last_layer_similarity" in c
            assert len(c["pmi"]) == len(c["tokens"]) and len(c["word_pmi"]) == len(c["caption"].split())
        (region,) = r["regions"]
        assert region["patches"] == 3
        latents = family.encode(family.preprocess(im)[None], [0, 1, 2, 3]).latents[:, 0]  # [L, T, C]
        assert [c["tokens"] for c in region["layers"]] == greedy_tokens(family, latents[:, column_0])
        maps = read_attributions(out / "attributions" / f"{i}.safetensors")
        assert maps.grid == (3, 3)
        for j, c in enumerate(r["layers"]):
            heat = maps.maps[map_key(j)].astype(np.float32)
            assert heat.shape == (len(c["tokens"]), 3, 3)
            assert np.allclose(heat.sum((1, 2)), 1, atol=1e-2)
            assert "".join(maps.tokens[map_key(j)]).strip() == c["caption"]
