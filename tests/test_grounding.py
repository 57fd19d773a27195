"""Grounding measures (issue 14): the model's own contrastive embeddings, exactly as open_clip computes
them, per caption; retrieval ranks; the gray image's captions and their disk cache; CLI and service
outputs."""

import json
import logging

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from service_stack import TINY, free_port, image_bytes, redis_server, service, service_env, wait_for_workers, wait_job

from latent_verbalizer.services.cli import main
from latent_verbalizer.services.decoder import grounding, null_cache
from latent_verbalizer.services.decoder.grounding import caption_grounded, retrieval_ranks, token_f1
from latent_verbalizer.services.decoder.stage import decode
from latent_verbalizer.services.encoder.stage import check_layers, encode, encode_grounded
from latent_verbalizer.services.families import load_family
from latent_verbalizer.shared.schemas import DecodeParams

SOT, EOT, PAD = 49406, 49407, 0


@pytest.fixture(autouse=True)
def gray_cache(tmp_path, monkeypatch):
    """Each test keeps the gray image's captions in a directory of its own (a served stack's too)."""
    monkeypatch.setenv("LV_CACHE_DIR", str(tmp_path / "cache"))
    kept = null_cache.use_directory(tmp_path / "cache" / "gray-captions")
    yield null_cache.directory()
    null_cache.use_directory(kept)


def open_clip_ids(lm, tokens: list[int]) -> torch.Tensor:
    """A caption's generated ids as open_clip's tokenizer lays them out: [SOT, tokens, EOT, 0...] to the
    context length (a caption that ended with the pad id 0 keeps it as its end)."""
    seq = [SOT, *tokens] + ([] if tokens and tokens[-1] == PAD else [EOT])
    return torch.tensor(seq + [PAD] * (lm.model.text.context_length - len(seq)))


def open_clip_text(lm, decoded) -> torch.Tensor:
    return lm.model.encode_text(torch.stack([open_clip_ids(lm, d.tokens) for d in decoded]), normalize=False)


@pytest.fixture()
def end_biased(tiny):
    """tiny with the end token's (or the pad id 0's) logit scaled: captions then end at many lengths,
    naturally, in one batch (scales found by trying, for these random weights)."""
    proj = tiny.model.text_decoder.text_projection
    saved = proj.clone()

    def bias(token: int, scale: float):
        with torch.no_grad():
            proj.copy_(saved)
            proj[:, token] *= scale
        return tiny

    yield bias
    with torch.no_grad():
        proj.copy_(saved)


@pytest.mark.parametrize("model", ["tiny", "trained_like"])
def test_image_embedding_is_encode_image_when_the_selection_stops_early(model, pixels, request):
    lm = request.getfixturevalue(model)
    visual = lm.model.visual
    latents, embeddings = encode_grounded(visual, pixels, [1, 0])
    assert torch.allclose(embeddings, lm.model.encode_image(pixels, normalize=False), atol=1e-5)
    assert torch.equal(latents, encode(visual, pixels, [1, 0]))  # the extra last block changes no latent
    _, with_last_selected = encode_grounded(visual, pixels, [3, 0])
    assert torch.allclose(with_last_selected, embeddings, atol=1e-6)


@pytest.mark.parametrize("model", ["tiny", "trained_like"])
@pytest.mark.parametrize("params", [DecodeParams(seq_len=9), DecodeParams(seq_len=32),
                                    DecodeParams(strategy="beam", num_beams=3, seq_len=9)],
                         ids=["cut-at-9", "cut-at-the-context-length", "beam"])
def test_text_embedding_is_encode_text_for_captions_cut_at_max_length(model, params, pixels, request):
    lm = request.getfixturevalue(model)
    latents = encode(lm.model.visual, pixels, [0, 3])
    decoded = decode(lm, latents.flatten(0, 1), params, embed_text=True)
    assert all(len(d.tokens) == params.seq_len - 2 for d in decoded)  # every one ran into the limit
    ours = torch.stack([d.text_embedding for d in decoded])
    assert torch.allclose(ours, open_clip_text(lm, decoded), atol=1e-5)


@pytest.mark.parametrize("end, scale, strategy", [(EOT, -3.0, "greedy"), (PAD, 3.0, "greedy"), (PAD, 3.0, "beam")])
def test_text_embedding_is_encode_text_for_captions_that_ended(end_biased, latents_all, end, scale, strategy):
    lm = end_biased(end, scale)
    params = DecodeParams(strategy=strategy, num_beams=2, seq_len=20, min_seq_len=2)
    decoded = decode(lm, latents_all, params, embed_text=True, batch_rows=16)
    lengths = [len(d.tokens) for d in decoded]
    ended = [d for d in decoded if len(d.tokens) < 18]
    assert len(ended) >= 4 and len(set(lengths)) >= 3, lengths  # rows left the batch at different steps
    if end == PAD:
        assert any(d.tokens and d.tokens[-1] == PAD for d in ended)
    ours = torch.stack([d.text_embedding for d in decoded])
    assert torch.allclose(ours, open_clip_text(lm, decoded), atol=1e-5)


def test_text_embedding_follows_the_corrected_cls_mask(tiny, latents_all):
    tiny.model.text.correct_cls_mask = True
    try:
        decoded = decode(tiny, latents_all[:6], DecodeParams(seq_len=32), embed_text=True)
        ours = torch.stack([d.text_embedding for d in decoded])
        assert torch.allclose(ours, open_clip_text(tiny, decoded), atol=1e-5)
    finally:
        tiny.model.text.correct_cls_mask = False


@pytest.fixture(scope="module")
def latents_all(tiny, pixels):
    return encode(tiny.model.visual, pixels, check_layers(tiny.model.visual, None)).flatten(0, 1)  # [24, 8, 48]


@pytest.mark.parametrize("model", ["tiny", "trained_like"])
def test_image_score_is_open_clip_cosine_and_gray_input_is_prior(model, request, gray_grounded):
    lm = request.getfixturevalue(model)
    layers, params = [2, 0], DecodeParams(seq_len=10)
    images, latents, embeddings, g = gray_grounded(lm, layers, params)
    image_latent = lm.model.encode_image(images)
    for i, per_image in enumerate(g.captions):
        text_latent = lm.model.encode_text(torch.stack([open_clip_ids(lm, c.tokens) for c in per_image]))
        assert [c.image_score for c in per_image] == pytest.approx((text_latent @ image_latent[i]).tolist(), abs=1e-5)
        assert [c.last_layer_similarity for c in per_image] == pytest.approx(
            (text_latent @ text_latent[0]).tolist(), abs=1e-5)  # layer 2 is the deepest selected
        assert per_image[0].last_layer_similarity == pytest.approx(1.0, abs=1e-5)
    gray = g.captions[3]
    assert all(c.prior and c.prior_overlap == 1.0 for c in gray)
    assert g.null_captions == {"layer_2": gray[0].caption, "layer_0": gray[1].caption}
    for per_image in g.captions[:3]:
        for c, null in zip(per_image, gray):
            assert c.prior == (c.caption == null.caption)
            assert c.prior_overlap == pytest.approx(token_f1(c.tokens, null.tokens))
    # kept per (model, layers, params): a later batch reuses the same gray captions
    (kept,) = grounding._null[lm.model].values()
    again = caption_grounded(lm, latents[:, :1], embeddings[:1], latents[:, 3:], layers, ["a"], params)
    (still,) = grounding._null[lm.model].values()
    assert still is kept and again.null_captions == g.null_captions
    assert again.captions[0][0].image_score == pytest.approx(g.captions[0][0].image_score, abs=1e-6)


def decoded_rows(monkeypatch) -> list[int]:
    """The rows of every `decode` call caption_grounded makes from now on."""
    rows: list[int] = []

    def counting(lm, latents, *args, **kwargs):
        rows.append(latents.shape[0])
        return decode(lm, latents, *args, **kwargs)

    monkeypatch.setattr(grounding, "decode", counting)
    return rows


def fresh_run(lm, pixels, layers=(3, 1), params=DecodeParams(seq_len=8)):
    """caption_grounded of two images as a fresh process runs it: nothing kept in the process."""
    grounding.forget_null_captions(lm.model)
    latents, embeddings = encode_grounded(lm.model.visual, pixels[:2], list(layers))
    null = encode(lm.model.visual, lm.null_pixels(), list(layers))  # [L, 1, N, D]
    g = caption_grounded(lm, latents, embeddings, null, list(layers), ["a", "b"], params)
    return g.null_captions, [[(c.caption, c.prior, c.prior_overlap) for c in per_image] for per_image in g.captions]


def test_gray_captions_kept_on_disk_serve_a_fresh_process_of_the_same_model_layers_and_params(
        pixels, gray_cache, monkeypatch):
    lm = load_family("coca_tiny")  # the fixed seed's weights, a model object of its own
    rows = decoded_rows(monkeypatch)
    first = fresh_run(lm, pixels)
    assert rows == [2 * 2 + 2] and len(list(gray_cache.glob("*.json"))) == 1
    assert fresh_run(lm, pixels) == first and rows[-1] == 2 * 2  # read from disk: only the images' rows
    assert fresh_run(load_family("coca_tiny"), pixels) == first and rows[-1] == 2 * 2  # same weights, new object

    assert fresh_run(lm, pixels, params=DecodeParams(seq_len=9))[0] and rows[-1] == 2 * 2 + 2
    assert fresh_run(lm, pixels, layers=(3, 0)) and rows[-1] == 2 * 2 + 2
    with torch.no_grad():
        lm.model.text.token_embedding.weight.view(-1)[null_cache.SUM_STRIDE * 3] += 1.0  # one value (summed)
    fresh_run(lm, pixels)
    assert rows[-1] == 2 * 2 + 2 and len(list(gray_cache.glob("*.json"))) == 4
    fresh_run(lm, pixels)
    assert rows[-1] == 2 * 2


def test_weights_fingerprint_follows_every_change_of_a_weight(tiny):
    lm = load_family("coca_tiny")
    before = null_cache.weights_fingerprint(lm.model)
    assert null_cache.weights_fingerprint(tiny.model) == before  # same weights, another object
    weight = lm.model.text.token_embedding.weight  # [vocabulary, width]
    saved = weight.clone()
    for index in (0, null_cache.SUM_STRIDE * 5, weight.numel() // null_cache.SAMPLES | 1):  # sampled, summed
        with torch.no_grad():
            weight.view(-1)[index] += 1e-3  # in place
        assert null_cache.weights_fingerprint(lm.model) != before, index
        with torch.no_grad():
            weight.copy_(saved)
        assert null_cache.weights_fingerprint(lm.model) == before
    with torch.no_grad():
        weight.mul_(1.01)  # another checkpoint, as far as this tensor goes
    assert null_cache.weights_fingerprint(lm.model) != before
    weight.data = saved  # replaced
    assert null_cache.weights_fingerprint(lm.model) == before
    lm.model.to(torch.float16)
    assert null_cache.weights_fingerprint(lm.model) != before


BROKEN_ENTRIES = [
    b"{not json", b"\xff\xfe", b"[]",
    b'{"captions": {"layer_3": {"text": "a", "tokens": [1]}}}',  # a layer missing
    b'{"captions": {"layer_3": {"text": "a", "tokens": ["x"]}, "layer_1": {"text": "b", "tokens": []}}}',
]


@pytest.mark.parametrize("broken", BROKEN_ENTRIES)
def test_an_unusable_entry_is_ignored_and_written_again(broken, tiny, pixels, gray_cache, monkeypatch, caplog):
    first = fresh_run(tiny, pixels)
    rows = decoded_rows(monkeypatch)
    (entry,) = gray_cache.glob("*.json")
    entry.write_bytes(broken)
    with caplog.at_level(logging.WARNING, logger=null_cache.__name__):
        assert fresh_run(tiny, pixels) == first
    assert rows == [2 * 2 + 2] and "unusable" in caplog.text and str(entry) in caplog.text
    assert json.loads(entry.read_text())["model"] == "coca_tiny"  # written again
    assert fresh_run(tiny, pixels) == first and rows[-1] == 2 * 2
    assert [p.name for p in gray_cache.iterdir()] == [entry.name]  # no temporary file left


def test_an_unwritable_cache_directory_is_logged_once_and_the_run_goes_on(tiny, pixels, tmp_path, caplog):
    (tmp_path / "a-file").write_text("")
    null_cache.use_directory(tmp_path / "a-file" / "gray-captions")  # restored by the gray_cache fixture
    with caplog.at_level(logging.WARNING, logger=null_cache.__name__):
        first = fresh_run(tiny, pixels)
        assert fresh_run(tiny, pixels) == first
    assert caplog.text.count("cannot keep") == 1 and set(first[0]) == {"layer_3", "layer_1"}


def test_token_f1():
    assert token_f1([1, 2, 3], [1, 2, 3]) == 1.0
    assert token_f1([1, 1, 2], [1, 3]) == pytest.approx(2 * 1 / 5)
    assert token_f1([], []) == 1.0 and token_f1([1], []) == 0.0


def brute_force_ranks(text, image, gallery, seed=0):
    n = image.shape[0]
    sample = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: min(n, gallery)].tolist()
    ranks = []
    for i in range(n):
        members = sample if i in sample else sample[:-1] + [i]
        row = []
        for t in text[i]:
            own = float(t @ image[i])
            row.append(1 + sum(float(t @ image[j]) > own for j in members if j != i))
        ranks.append(row)
    return ranks


@pytest.mark.parametrize("gallery", [1000, 5, 2])
def test_retrieval_ranks_equal_a_brute_force(gallery):
    g = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(13, 16, generator=g), dim=-1)
    text = F.normalize(image[:, None] + 0.8 * torch.randn(13, 3, 16, generator=g), dim=-1)  # [13, 3, 16]
    ranks, size = retrieval_ranks(text, image, gallery)
    assert size == min(13, gallery)
    assert ranks.tolist() == brute_force_ranks(text, image, gallery)
    assert ranks.min() >= 1 and ranks.max() <= size


def test_cli_writes_grounding_fields_and_prior(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        (images / f"{i}.png").write_bytes(image_bytes(i))
    Image.new("RGB", (40, 30), (128, 128, 128)).save(images / "gray.png")
    out = tmp_path / "out"
    args = ["verbalize", str(images), "--layers", "0,2", "--seq-len", "8", *TINY]
    assert main([*args, "--out", str(out), "--gallery", "3"]) == 0
    results = {r["id"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    prior = json.loads((out / "prior.json").read_text())
    assert sorted(prior) == ["layer_0", "layer_2"]
    for r in results.values():
        for c in r["layers"]:
            assert -1 <= c["image_score"] <= 1 and c["gallery_size"] == 3 and 1 <= c["retrieval_rank"] <= 3
            assert c["prior"] == (c["caption"] == prior[f"layer_{c['layer']}"]) and 0 <= c["prior_overlap"] <= 1
        assert r["layers"][1]["last_layer_similarity"] == pytest.approx(1.0, abs=1e-5)
    assert all(c["prior"] for c in results["gray"]["layers"])  # a flat gray image (any size) is the null input

    plain = tmp_path / "plain"
    assert main([*args, "--out", str(plain), "--no-grounding"]) == 0
    fields = {"image_score", "retrieval_rank", "gallery_size", "prior", "prior_overlap", "last_layer_similarity"}
    for line in (plain / "results.jsonl").read_text().splitlines():
        assert all(not fields & set(c) for c in json.loads(line)["layers"])
    assert not (plain / "prior.json").exists()

    one = tmp_path / "one"
    assert main(["verbalize", str(images / "0.png"), "--out", str(one), *TINY]) == 0
    (r,) = map(json.loads, (one / "results.jsonl").read_text().splitlines())
    assert all(c["image_score"] is not None and "retrieval_rank" not in c for c in r["layers"])


def test_bad_gallery_is_named(tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(image_bytes(0))
    assert main(["verbalize", str(tmp_path), "--out", str(tmp_path / "o"), "--gallery", "1", *TINY]) == 2
    assert "--gallery 1" in capsys.readouterr().err


def test_service_job_ranks_across_chunks(tmp_path):
    with redis_server(tmp_path) as url:
        port = free_port()
        env = service_env(url, tmp_path, LV_PORT=str(port), LV_CHUNK_SIZE="2")
        with service(["serve", *TINY], env, tmp_path / "serve.log", port) as api:
            wait_for_workers(url)
            files = [("files", (f"{i}.png", image_bytes(i))) for i in range(5)]
            options = {"categorize": False, "layers": [0, 2], "decode": {"seq_len": 8}}
            job_id = api.post("/v1/jobs", files=files, data={"options": json.dumps(options)}).json()["id"]
            assert wait_job(api, job_id)["status"] == "succeeded"
            lines = [json.loads(line) for line in api.get(f"/v1/jobs/{job_id}/results").text.splitlines()]
            prior = json.loads((tmp_path / "artifacts" / "jobs" / job_id / "prior.json").read_text())

            plain_id = api.post("/v1/jobs", files=files[:2], data={"options": json.dumps(
                {**options, "grounding": False})}).json()["id"]
            assert wait_job(api, plain_id)["status"] == "succeeded"
            plain = [json.loads(line) for line in api.get(f"/v1/jobs/{plain_id}/results").text.splitlines()]
    assert sorted(prior) == ["layer_0", "layer_2"]
    assert [r["id"] for r in lines] == ["0", "1", "2", "3", "4"]  # three chunks
    ranks = [c["retrieval_rank"] for r in lines for c in r["layers"]]
    assert all(c["gallery_size"] == 5 for r in lines for c in r["layers"]) and all(1 <= k <= 5 for k in ranks)
    for r in lines:
        for c in r["layers"]:
            assert -1 <= c["image_score"] <= 1 and c["prior"] == (c["caption"] == prior[f"layer_{c['layer']}"])
    assert all("image_score" not in c for r in plain for c in r["layers"])
