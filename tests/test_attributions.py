"""Word -> patch attributions: every caption token's map over its layer's patches is a distribution, equals
a brute-force recomputation through open_clip's own modules, leaves the captions as they were, and reads
back from its file (services.decoder.attribution, shared.attributions)."""

import io

import numpy as np
import open_clip_reference as reference
import pytest
import torch
from PIL import Image
from service_stack import TINY, image_bytes

from latent_verbalizer.services.cli import main
from latent_verbalizer.services.decoder.grounding import RunEmbeddings
from latent_verbalizer.services.decoder.stage import decode
from latent_verbalizer.services.encoder.regions import input_box
from latent_verbalizer.services.encoder.stage import check_layers, encode
from latent_verbalizer.services.pipeline import verbalize
from latent_verbalizer.shared.attributions import attribution_path, map_key, read_attributions
from latent_verbalizer.shared.images import ImageItem
from latent_verbalizer.shared.schemas import DecodeParams

PARAMS = {
    "greedy": DecodeParams(seq_len=10),
    "sample": DecodeParams(strategy="sample", top_k=20, temperature=1.5, seq_len=10, seed=3),
    "beam": DecodeParams(strategy="beam", num_beams=3, seq_len=10),
}


def items(n: int = 3) -> list[ImageItem]:
    sizes = [(40, 30), (32, 48), (33, 33)]  # landscape, portrait: the center crop moves the grid
    return [ImageItem(id=f"img{i}", source=f"img{i}.png", data=image_bytes(i, sizes[i % 3])) for i in range(n)]


def brute_force(lm, pixels: torch.Tensor, layer: int, tokens: list[int]) -> torch.Tensor:
    """One caption's maps [S, gh, gw] through open_clip's modules, every decoder layer averaged."""
    image_tokens, pool_weights = reference.pooler_weights(lm.model.visual, pixels, layer)
    cross = reference.cross_attention(lm.model, image_tokens, tokens, lm.start_id).mean(0)  # [S, Q-1]
    return reference.maps(pool_weights, cross, tuple(lm.model.visual.grid_size))


def run(lm, tmp_path, params: DecodeParams, attributions: bool, grounding: bool = False):
    out = tmp_path / f"{params.strategy}-{attributions}-{grounding}"
    results = list(verbalize(lm, items(), None, params, attributions_dir=out if attributions else None,
                             grounding=RunEmbeddings() if grounding else None))
    return results, out


@pytest.mark.parametrize("strategy", ["greedy", "sample", "beam"])
def test_maps_are_distributions_equal_to_open_clip_and_leave_captions_unchanged(trained_like, tmp_path, strategy):
    lm = trained_like
    params = PARAMS[strategy]
    plain, _ = run(lm, tmp_path, params, attributions=False)
    attributed, out = run(lm, tmp_path, params, attributions=True)
    assert attributed == plain  # captions, tokens and entropies identical
    for item, result in zip(items(), attributed):
        image = Image.open(io.BytesIO(item.data))
        a = read_attributions(attribution_path(out, item.id))
        assert a.grid == tuple(lm.model.visual.grid_size)
        assert a.input_box == pytest.approx(input_box(lm.preprocess, *image.size))
        assert sorted(a.maps) == sorted(map_key(c.layer) for c in result.layers)
        for c in result.layers:
            maps = a.map(c.layer).astype(np.float32)
            assert maps.shape == (len(c.tokens), *a.grid)
            assert a.tokens[map_key(c.layer)] == [lm.tokenizer.decode([t]) for t in c.tokens]
            assert (maps >= 0).all() and np.allclose(maps.sum((1, 2)), 1, atol=2e-3)  # fp16 on disk
    # one image, every layer, recomputed through open_clip
    item, result = items()[1], attributed[1]
    pixels = lm.preprocess(Image.open(io.BytesIO(item.data)))[None]
    a = read_attributions(attribution_path(out, item.id))
    for c in result.layers:
        expected = brute_force(lm, pixels, c.layer, c.tokens)
        assert np.allclose(a.map(c.layer).astype(np.float32), expected.numpy(), atol=1e-3, rtol=1e-2), c.layer


def test_grounded_run_gives_the_same_maps(tiny, tmp_path):
    _, plain = run(tiny, tmp_path, PARAMS["greedy"], attributions=True)
    results, grounded = run(tiny, tmp_path, PARAMS["greedy"], attributions=True, grounding=True)
    for result in results:  # the gray image's rows ride in the grounded batch: equal up to rounding
        a, b = (read_attributions(attribution_path(d, result.id)) for d in (plain, grounded))
        assert sorted(a.maps) == sorted(b.maps)
        assert all(np.allclose(a.maps[k], b.maps[k], atol=1e-3) for k in a.maps)


def test_decoded_cross_attention_is_one_row_per_step(tiny, pixels):
    latents = encode(tiny.model.visual, pixels, check_layers(tiny.model.visual, None))  # [L, 6, Q-1, D]
    for params in PARAMS.values():
        plain = decode(tiny, latents[-1], params)
        for d, p in zip(decode(tiny, latents[-1], params, attention=True), plain):
            assert d.tokens == p.tokens and p.cross_attention is None
            assert d.cross_attention.shape == (len(d.entropy), latents.shape[2])
            assert torch.allclose(d.cross_attention.sum(-1), torch.ones(len(d.entropy)), atol=1e-5)


def test_cli_writes_one_file_per_image(tmp_path):
    for i, item in enumerate(items(2)):
        (tmp_path / "in" / "sub").mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / ("sub" if i else "") / f"{item.id}.png").write_bytes(item.data)
    out = tmp_path / "out"
    assert main(["verbalize", str(tmp_path / "in"), "--out", str(out), "--layers", "0,-1", "--attributions",
                 "--no-grounding", *TINY]) == 0
    assert sorted(p.relative_to(out).as_posix() for p in (out / "attributions").rglob("*.safetensors")) == [
        "attributions/img0.safetensors", "attributions/sub/img1.safetensors"]
    assert sorted(read_attributions(out / "attributions" / "sub" / "img1.safetensors").layers) == [0, 3]


def test_ids_never_lead_outside_the_directory(tmp_path):
    assert attribution_path(tmp_path, "../../etc/x") == tmp_path / "_" / "_" / "etc" / "x.safetensors"
    assert attribution_path(tmp_path, "a//b/.") == tmp_path / "a" / "_" / "b" / "_.safetensors"
