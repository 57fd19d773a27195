"""The LLaVA family (services/families/llava.py) on tiny random models built in code, saved with save_pretrained
and loaded through the family's loader: every layer's greedy caption is the model's own generate with
vision_feature_layer=i + 1, the teacher-forced scores are decoding's log-probabilities, rows do not depend on their
batch, a region mask hides exactly the image positions it names. Nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from latent_verbalizer.services.families import FamilyError, load_family
from latent_verbalizer.services.families.llava import DEFAULT_PROMPT, chat_prompt, load, reference_tokens
from tests.tiny_families import tiny_llava

MAX_NEW = 20  # --seq-len 21: long enough for some rows to end with the end token, others to hit the limit


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return load(tiny_llava(tmp_path_factory.mktemp("llava")))


@pytest.fixture(scope="module")
def listed(tmp_path_factory):
    """Two feature layers concatenated, the CLS token kept, no chat template."""
    return load(tiny_llava(tmp_path_factory.mktemp("llava_list"), layers=4, feature_layer=[-4, -2], select="full",
                           chat_template=None, seed=1))


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(40, 52), (64, 48), (30, 30)]]


def latents(family, images) -> torch.Tensor:
    """[L, n, N, D] at every layer."""
    return family.encode(torch.stack([family.preprocess(im) for im in images]), list(range(family.num_layers))).latents


def greedy(family, rows, mask=None, max_new=MAX_NEW, attention=False):
    """A minimal greedy loop over the stepper, driven as the decoding loop drives it (finished rows leave the
    batch) -> per row its tokens (end token kept), its steps' logits [steps, V] and attention [steps, N]."""
    B, N = rows.shape[:2]
    stepper = family.stepper(rows, mask, max_new + 1, attention)
    alive, token = torch.arange(B), torch.full((B,), family.start_id)
    tokens, logits, attended = [[] for _ in range(B)], [[] for _ in range(B)], [[] for _ in range(B)]
    for pos in range(max_new):
        step_attention = torch.zeros(len(alive), N) if attention else None
        step_logits = stepper.step(token, pos, step_attention)
        token = step_logits.argmax(-1)
        for j, r in enumerate(alive.tolist()):
            tokens[r].append(int(token[j]))
            logits[r].append(step_logits[j])
            if attention:
                attended[r].append(step_attention[j])
        done = torch.isin(token, torch.tensor(family.stop_ids))
        if done.all():
            break
        keep = (~done).nonzero()[:, 0]
        alive, token = alive[keep], token[keep]
        stepper.keep(keep)
    return tokens, [torch.stack(x) for x in logits], [torch.stack(a) for a in attended] if attention else None


def without_end(family, tokens: list[int]) -> list[int]:
    return tokens[:-1] if tokens and tokens[-1] in family.stop_ids else tokens


def plain_generate(family, image) -> list[int]:
    """generate(...) as the model runs it, no layer named."""
    inputs = family.processor(images=image, text=chat_prompt(family.processor, family.prompt), return_tensors="pt")
    inputs.pop("token_type_ids", None)
    out = family.model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    generated = out[0, inputs["input_ids"].shape[1] :].tolist()
    return generated[: generated.index(family.end_id)] if family.end_id in generated else generated


def test_loads_what_the_config_says(family, listed):
    assert (family.family, family.num_layers, family.feature_layer) == ("llava", 3, 1)  # -2 of 3 blocks
    assert family.prompt == DEFAULT_PROMPT and family.pretrained is None
    assert family.stop_ids == family.end_ids == (family.tokenizer.eos_token_id,)
    assert not family.force_end_at_limit and family.default_min_seq_len == 1
    assert family.extras == {"contrastive": "LLaVA has no contrastive image-text head", "regions": None,
                             "attributions": None}
    assert len(family.image_positions) == 25  # 5 x 5 patches, CLS dropped
    assert family.tokenizer.decode(family.prompt_ids[-3:]) == "image briefly. ASSISTANT:"
    assert family.geometry.grid == (5, 5) and not family.geometry.class_token
    assert (listed.feature_layers, listed.feature_layer) == ([0, 2], 2)
    assert len(listed.image_positions) == 26 and listed.geometry.class_token  # "full" keeps CLS
    assert chat_prompt(listed.processor, "hi") == "<image>\nhi"  # no chat template
    asked = load_family(family.name, prompt="What is this?")  # --model DIR --prompt ...
    assert asked.family == "llava" and asked.tokenizer.decode(asked.prompt_ids[-4:]) == "What is this? ASSISTANT:"
    ids = family.tokenizer.convert_tokens_to_ids(["a", "red", "dog", "</s>"])
    assert family.token_texts(ids[:3]) == ["a", " red", " dog"]
    assert family.decode_text(ids) == "".join(family.token_texts(ids)) == "a red dog"


def test_every_layer_is_generate_at_that_layer(family, images):
    lat = latents(family, images)  # [L, n, N, D]
    L, n = lat.shape[:2]
    rows = lat.transpose(0, 1).reshape(n * L, *lat.shape[2:])  # image-major, all decoded in one batch
    ours, _, _ = greedy(family, rows)
    for i, image in enumerate(images):
        for layer in range(L):
            assert without_end(family, ours[i * L + layer]) == reference_tokens(family, image, layer, MAX_NEW)
        assert without_end(family, ours[i * L + family.feature_layer]) == plain_generate(family, image)
    assert len({tuple(t) for t in ours}) > L  # layers and images differ: the comparison means something
    assert 0 < sum(t[-1] in family.stop_ids for t in ours) < len(ours)  # rows left the batch early


def test_listed_feature_layers_read_layer_i_in_every_slot(listed, images):
    lat = latents(listed, images[:2])
    assert lat.shape[2] == 26
    for i, image in enumerate(images[:2]):
        ours, _, _ = greedy(listed, lat[:, i])
        for layer in range(listed.num_layers):
            assert without_end(listed, ours[layer]) == reference_tokens(listed, image, layer, MAX_NEW), (i, layer)


def test_score_is_decodings_log_probabilities(family, images):
    lat = latents(family, images)
    rows = lat.transpose(0, 1).reshape(-1, *lat.shape[2:])  # every image at every layer
    mask = torch.ones(rows.shape[:2], dtype=torch.bool)
    mask[1, 5:] = False  # one row reads a region
    tokens, logits, _ = greedy(family, rows, mask)
    given = [t[:-1] if t[-1] in family.stop_ids else t for t in tokens]
    assert any(len(t) > len(g) for t, g in zip(tokens, given))  # some end token scored
    scores = family.score(rows, mask, given)
    for t, g, lg, s in zip(tokens, given, logits, scores):
        logp = torch.log_softmax(lg, dim=-1)
        assert s.dtype == torch.float32 and s.shape == (len(g) + 1,)
        assert torch.allclose(s[: len(g)], logp[torch.arange(len(g)), g], atol=1e-4)
        if len(t) > len(g):  # ended by the end token: its log-probability too
            assert torch.allclose(s[-1], logp[-1, family.end_id], atol=1e-4)


def test_a_row_does_not_depend_on_its_batch(family, images):
    lat = latents(family, images)
    alone, _, _ = greedy(family, lat[1, 2:3])
    together, _, _ = greedy(family, torch.cat([lat[0, :2], lat[1, 2:3], lat[2, :2]]))
    assert together[2] == alone[0]
    # keep() follows beam search: reordered and repeated rows continue as if decoded alone
    rows = lat[:, 0]
    stepper = family.stepper(rows, None, 4)
    first = stepper.step(torch.zeros(3, dtype=torch.long), 0)
    order = torch.tensor([2, 0, 0])
    stepper.keep(order)
    nxt = torch.tensor([5, 7, 9])
    fresh = family.stepper(rows[order], None, 4)
    assert torch.allclose(fresh.step(torch.zeros(3, dtype=torch.long), 0), first[order], atol=1e-5)
    assert torch.allclose(stepper.step(nxt, 1), fresh.step(nxt, 1), atol=1e-5)
    before = family.stepper(rows, None, 4)  # beam search repeats rows before the prompt goes in
    before.keep(order)
    assert torch.allclose(before.step(torch.zeros(3, dtype=torch.long), 0), first[order], atol=1e-5)


def test_a_region_mask_decides_what_the_model_reads(family, images):
    lat = latents(family, images)
    rows = lat[family.feature_layer, :2]  # two images at the feature layer
    mask = torch.zeros(rows.shape[:2], dtype=torch.bool)
    mask[:, [0, 1, 5, 6]] = True  # the top-left 2 x 2 patches
    full = family.stepper(rows, None, 3).step(torch.zeros(2, dtype=torch.long), 0)
    region = family.stepper(rows, mask, 3).step(torch.zeros(2, dtype=torch.long), 0)
    assert not torch.allclose(full, region, atol=1e-3)  # hiding patches changes the reading
    swapped = rows.clone()
    swapped[:, ~mask[0]] = lat[0, 2, ~mask[0]]  # other content at every hidden position
    again = family.stepper(swapped, mask, 3).step(torch.zeros(2, dtype=torch.long), 0)
    assert torch.allclose(region, again, atol=1e-5)  # ... is never read
    tokens, _, _ = greedy(family, rows, mask)
    assert tokens != greedy(family, rows)[0]


def test_regions_and_raw_features_from_the_encoder(family, images):
    pixels = torch.stack([family.preprocess(im) for im in images[:2]])
    key_mask = torch.zeros(2, 3, 25, dtype=torch.bool)  # 2 images, 3 regions, over the 5 x 5 patches
    key_mask[:, 0, :5] = True
    encoded = family.encode(pixels, [0, 2], key_mask=key_mask)
    assert torch.equal(encoded.region_mask, key_mask) and encoded.region_latents is None
    assert torch.equal(encoded.latents, family.encode(pixels, [0, 2]).latents)  # regions read the image's latents
    with pytest.raises(ValueError, match="26 positions"):
        family.encode(pixels, [0], key_mask=torch.ones(2, 1, 26, dtype=torch.bool))
    raw = family.hidden_states(pixels, [0, 2])
    assert raw.shape == (2, 2, 26, 32)  # CLS + 25 patches, before selection and projector
    assert torch.equal(family.model.multi_modal_projector(raw[1][:, 1:]), encoded.latents[1])
    assert family.describe()["rescale_layers"] is False and family.describe()["prompt"] == DEFAULT_PROMPT


def test_attention_over_the_image_positions(family, images):
    rows = latents(family, images)[:, 1]
    mask = torch.ones(rows.shape[:2], dtype=torch.bool)
    mask[0, :12] = False
    plain, plain_logits, _ = greedy(family, rows, mask)
    tokens, logits, attended = greedy(family, rows, mask, attention=True)
    assert tokens == plain
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(logits, plain_logits))
    for t, a in zip(tokens, attended):
        assert a.shape == (len(t), 25) and (a >= 0).all() and (a.sum(-1) <= 1 + 1e-5).all() and a.sum() > 0
    assert (attended[0][:, :12] == 0).all()  # hidden positions get none
    assert family.model.language_model.config._attn_implementation != "eager"  # eager only while asked


def test_rescale_layers_matches_the_feature_layers_token_norm(tmp_path, family, images):
    scaled = load(family.name, rescale_layers=True)
    pixels = torch.stack([family.preprocess(im) for im in images])
    layers = list(range(family.num_layers))
    plain, rescaled = family.vision_tokens(pixels, layers), scaled.vision_tokens(pixels, layers)
    reference = plain[family.feature_layer].norm(dim=-1).mean(-1)  # [n]
    for i in layers:
        assert torch.allclose(rescaled[i].norm(dim=-1).mean(-1), reference, rtol=1e-5)
    assert torch.equal(rescaled[family.feature_layer], plain[family.feature_layer])
    assert not torch.allclose(rescaled[0], plain[0])
    assert torch.equal(scaled.encode(pixels, [family.feature_layer]).latents,
                       family.encode(pixels, [family.feature_layer]).latents)


def test_errors_name_the_bad_input(tmp_path, family, images):
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(FamilyError, match="'bert' model, not LLaVA"):
        load(other)
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    (incomplete / "config.json").write_text((Path(family.name) / "config.json").read_text())
    with pytest.raises(FamilyError, match="incomplete is not a complete save_pretrained LLaVA directory"):
        load(incomplete)
    with pytest.raises(FamilyError, match="contrastive"):
        family.encode(torch.stack([family.preprocess(images[0])]), [0], contrastive=True)
    with pytest.raises(ValueError, match=r"layers \[3\] out of range"):
        family.encode(torch.stack([family.preprocess(images[0])]), [3])
    with pytest.raises(ValueError, match="image positions"):
        family.stepper(torch.zeros(1, 7, 32), None, 4).step(torch.zeros(1, dtype=torch.long), 0)


@pytest.mark.parametrize("size", [(52, 40), (40, 64), (30, 30)])
def test_geometry_follows_the_image_processor(family, size):
    """A dark box in the image lands where the geometry's placement says, in the pixels the model reads."""
    w, h = size
    image = np.full((h, w, 3), 255, dtype=np.uint8)
    box = (w * 0.25, h * 0.25, w * 0.75, h * 0.75)  # image px
    image[int(box[1]) : int(box[3]), int(box[0]) : int(box[2])] = 0
    pixels = family.preprocess(Image.fromarray(image)).mean(0)  # [H, W]
    placed = family.geometry.place(w, h)
    assert placed.input_size == (30, 30)
    x0, y0, x1, y1 = placed.to_input(box)
    inside = pixels[int(y0) + 2 : int(y1) - 2, int(x0) + 2 : int(x1) - 2]
    assert inside.numel() and (inside < 0).all()  # dark (normalised)
    outside = torch.ones_like(pixels, dtype=torch.bool)
    outside[max(int(y0) - 2, 0) : int(y1) + 2, max(int(x0) - 2, 0) : int(x1) + 2] = False
    assert (pixels[outside] > 0).all()  # white


def test_the_decoding_loop_captions_every_layer_as_generate(family, images):
    """Through the project's one decoding loop (services.decoder.stage): every image at every layer in one batch."""
    from latent_verbalizer.services.decoder.stage import decode, decode_layers
    from latent_verbalizer.shared.schemas import DecodeParams

    layers = list(range(family.num_layers))
    lengths = dict(seq_len=MAX_NEW + 1, min_seq_len=family.default_min_seq_len)
    params = DecodeParams(**lengths)
    decoded = decode_layers(family, latents(family, images), layers, ["a", "b", "c"], params, attention=True)
    for i, image in enumerate(images):
        for layer in layers:
            d = decoded[i * len(layers) + layer]
            assert d.tokens == reference_tokens(family, image, layer, MAX_NEW), (i, layer)
            assert d.text == family.decode_text(d.tokens) and len(d.entropy) == d.cross_attention.shape[0]
    rows = latents(family, images)[:, 0]
    one_beam = decode(family, rows, DecodeParams(strategy="beam", num_beams=1, length_penalty=0, **lengths))
    assert [d.tokens for d in one_beam] == [d.tokens for d in decode(family, rows, DecodeParams(**lengths))]
    for strategy in ("beam", "sample"):  # the other searches run over the same stepper
        out = decode(family, rows, DecodeParams(strategy=strategy, num_beams=3, **lengths))
        assert len(out) == len(rows) and all(0 < len(d.entropy) <= MAX_NEW for d in out)
