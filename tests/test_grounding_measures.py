"""Per-layer grounding (shared/grounding.py) on hand-made results with known numbers; reference captions
from a shard's key.txt / key.json, a references file and the synthetic manifest; BLEU-4 and CIDEr-D as
pycocoevalcap computes them; `analyze` on a results.jsonl writing grounding.csv / grounding.png and the
summary block."""

from __future__ import annotations

import csv
import io
import json
import tarfile

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from latent_verbalizer.services.cli import main
from latent_verbalizer.services.demo.synth import write_dataset
from latent_verbalizer.shared.grounding import (
    as_results,
    cider_axis,
    grounding_outputs,
    layer_grounding,
    read_references,
    references_from_meta,
    tokenize,
)
from latent_verbalizer.shared.images import iter_items
from latent_verbalizer.shared.schemas import ImageResult


def cap(layer: int, caption: str, score: float, rank: int | None, prior: bool, overlap: float, sim: float,
        gallery: int | None = 3) -> dict:
    return {"layer": layer, "caption": caption, "tokens": [1], "entropy": [1.0], "mean_entropy": 1.0,
            "image_score": score, "retrieval_rank": rank, "gallery_size": gallery if rank else None,
            "prior": prior, "prior_overlap": overlap, "last_layer_similarity": sim}


RESULTS = [
    {"id": "a", "source": "a.png", "layers": [
        cap(0, "red red red", 0.10, 3, True, 1.0, 0.2),
        cap(5, "a red circle on a gray background", 0.40, 1, False, 0.1, 1.0)]},
    {"id": "b", "source": "b.png", "layers": [
        cap(0, "red red red", 0.20, 2, True, 1.0, 0.4),
        cap(5, "a blue square on a white background", 0.50, 1, False, 0.3, 1.0)]},
    {"id": "c", "source": "c.png", "layers": [
        cap(0, "a blue cross", 0.30, 1, False, 0.5, 0.6),
        cap(5, "a blue cross on a black background", 0.30, 2, False, 0.2, 1.0)]},
    {"id": "broken", "source": "broken.png", "error": "corrupt png image"},
]


def test_per_layer_aggregates_on_hand_made_results():
    g = layer_grounding(RESULTS, java=False)
    assert g.images == 3 and g.last_layer == 5
    first, last = g.layers
    assert (first.layer, first.captions, last.layer) == (0, 3, 5)
    assert first.image_score == pytest.approx(0.2) and last.image_score == pytest.approx(0.4)
    # relative to the last selected layer: a difference of mean cosines
    assert first.image_score_vs_last == pytest.approx(-0.2) and last.image_score_vs_last == 0.0
    assert first.retrieval_r1 == pytest.approx(1 / 3) and last.retrieval_r1 == pytest.approx(2 / 3)
    assert first.gallery_size == 3
    assert first.prior_share == pytest.approx(2 / 3) and last.prior_share == 0.0
    assert first.prior_overlap == pytest.approx(2.5 / 3)
    assert first.last_layer_similarity == pytest.approx(0.4) and last.last_layer_similarity == 1.0
    assert last.last_layer_bleu4 == pytest.approx(1.0) and first.last_layer_bleu4 < 0.01
    # no references anywhere: the reference metrics are null and not listed as computed
    assert first.ref_images == 0 and first.ref_cider is None and first.ref_bleu4 is None
    assert g.metrics == ["bleu4"]
    assert set(g.not_computed) == {"meteor", "spice"}


def test_one_image_run_has_no_retrieval_and_no_grounding_means_no_outputs(tmp_path):
    one = [{"id": "a", "source": "a.png", "layers": [cap(0, "red", 0.1, None, False, 0.0, 0.5),
                                                       cap(1, "a red circle", 0.3, None, False, 0.0, 1.0)]}]
    g = layer_grounding(one, java=False)
    assert [r.retrieval_r1 for r in g.layers] == [None, None]
    assert [r.gallery_size for r in g.layers] == [None, None]
    plain = [ImageResult.model_validate({"id": "a", "source": "a.png", "layers": [
        {"layer": 0, "caption": "red", "tokens": [1], "entropy": [1.0], "mean_entropy": 1.0}]})]
    assert layer_grounding(plain) is None
    assert grounding_outputs(plain, tmp_path) == (None, [])
    assert list(tmp_path.iterdir()) == []


def _shard(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_references_from_a_shards_txt_and_json_and_from_files(tmp_path):
    png = _png()
    _shard(tmp_path / "shard.tar", {
        "k1.png": png, "k1.txt": b"a red circle\n",
        "k2.png": png, "k2.json": json.dumps({"caption": "a blue square"}).encode(),
        "k3.png": png, "k3.json": json.dumps({"captions": ["a cross", "a green cross"], "x": 1}).encode(),
        "k4.png": png, "k4.json": json.dumps({"width": 3}).encode(),
    })
    items = list(iter_items([tmp_path / "shard.tar"]))
    results = [{"id": i.id, "source": i.source, "meta": i.meta, "layers": [cap(0, "x", 0.1, None, False, 0, 1)]}
               for i in items]
    assert references_from_meta(as_results(results)) == {
        "k1": ["a red circle"], "k2": ["a blue square"], "k3": ["a cross", "a green cross"]}

    refs = tmp_path / "refs.jsonl"
    refs.write_text('{"id": "k1", "captions": ["a big red circle", "a red disc"]}\n\n{"id": "k9", "caption": "x"}\n')
    assert read_references(refs) == {"k1": ["a big red circle", "a red disc"], "k9": ["x"]}
    # the file's captions win over the shard's for the same image
    g = layer_grounding(results, references=read_references(refs), java=False)
    assert g.layers[0].ref_images == 3

    manifest = write_dataset(tmp_path / "scenes", 2, seed=7)
    from_manifest = read_references(manifest)
    assert sorted(from_manifest) == ["scene_7_000000", "scene_7_000001"]
    assert all(len(c) == 1 and c[0].endswith("background") for c in from_manifest.values())

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "k1", "captions": ["ok"]}\n{"id": "k2"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_references(bad)


def test_bleu_and_cider_equal_pycocoevalcap_called_directly():
    refs = {"a": ["A red circle, on a gray background.", "a red disc"], "b": ["a blue square on white"],
            "c": ["a blue cross on a black background"]}
    g = layer_grounding(RESULTS, references=refs, java=False)
    for row in g.layers:
        hyps = {r["id"]: next(c["caption"] for c in r["layers"] if c["layer"] == row.layer) for r in RESULTS[:3]}
        gts = {i: [tokenize(c) for c in refs[i]] for i in hyps}
        res = {i: [tokenize(h)] for i, h in hyps.items()}
        bleu, _ = Bleu(4).compute_score(gts, res)
        cider, _ = Cider().compute_score(gts, res)
        assert row.ref_images == 3
        assert row.ref_bleu4 == pytest.approx(bleu[3])
        assert row.ref_cider == pytest.approx(cider)
    assert g.layers[1].ref_cider > g.layers[0].ref_cider  # the last layer's captions are closer to the references
    assert g.metrics == ["bleu4", "cider"]
    assert tokenize("A red-circle, on  GRAY.") == "a red circle on gray"


def test_analyze_on_results_jsonl_writes_the_grounding_outputs(tmp_path):
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in RESULTS))
    refs = tmp_path / "refs.jsonl"
    refs.write_text(json.dumps({"id": "a", "captions": ["a red circle on a gray background"]}) + "\n")
    out = tmp_path / "analysis"
    assert main(["analyze", str(results), "--references", str(refs), "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "grounding.csv").open()))
    assert [r["layer"] for r in rows] == ["0", "5"]
    assert float(rows[0]["image_score"]) == pytest.approx(0.2)
    assert rows[0]["ref_images"] == "1" and rows[0]["ref_cider"] != ""
    assert (out / "grounding.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    block = json.loads((out / "summary.json").read_text())["grounding"]
    assert block["last_layer"] == 5 and [r["layer"] for r in block["layers"]] == [0, 5]
    assert block["layers"][1]["retrieval_r1"] == pytest.approx(2 / 3)
    assert "cider" in block["metrics"]


def test_analyze_labels_with_their_results_adds_grounding_to_the_report(tmp_path, capsys):
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in RESULTS))
    labels = tmp_path / "labels.json"
    entry = {"caption": "red red red", "phrases": [{"text": "red", "labels": ["color"]}]}
    labels.write_text(json.dumps({"layer_0": [entry] * 3, "layer_5": [entry] * 3}))
    out = tmp_path / "analysis"
    assert main(["analyze", str(labels), "--results", str(results), "--out", str(out)]) == 0
    assert {"distribution.csv", "figure.png", "grounding.csv", "grounding.png"} <= {p.name for p in out.iterdir()}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["layers"][0]["counted"] == 3
    assert summary["grounding"]["layers"][0]["image_score"] == pytest.approx(0.2)
    # results without grounding fields: the labels' report alone, and a note saying why
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"id": "a", "source": "a.png", "layers": [
        {"layer": 0, "caption": "red", "tokens": [1], "entropy": [1.0], "mean_entropy": 1.0}]}) + "\n")
    assert main(["analyze", str(labels), "--results", str(plain), "--out", str(tmp_path / "o2")]) == 0
    assert "no grounding fields" in capsys.readouterr().err
    assert not (tmp_path / "o2" / "grounding.csv").exists()
    assert "grounding" not in json.loads((tmp_path / "o2" / "summary.json").read_text())


def test_analyze_refuses_a_bad_references_file(tmp_path, capsys):
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in RESULTS))
    refs = tmp_path / "refs.jsonl"
    refs.write_text("not json\n")
    assert main(["analyze", str(results), "--references", str(refs), "--out", str(tmp_path / "o")]) == 2
    assert "refs.jsonl:1: not JSON" in capsys.readouterr().err


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def test_the_cider_axis_starts_at_zero_and_does_not_zoom_into_noise():
    """Two images' CIDEr-D of 0.0053-0.0060 lie flat near zero (the axis reaches at least 1), and a higher
    score still fits."""
    low, high = cider_axis([0.0053, 0.0060])
    assert low <= 0 < high and (0.0060 - 0.0053) / (high - low) < 0.001
    assert cider_axis([2.5])[1] > 2.5 and cider_axis([])[1] >= 1
