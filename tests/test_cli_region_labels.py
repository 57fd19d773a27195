"""Region captions are labelled and charted (issue 25, item 16): `categorize` on a results.jsonl with regions
labels each region's captions too (unless --no-regions), into their image's entry at each layer, and
`analyze` charts every region's layers as it charts the images'."""

from __future__ import annotations

import csv
import json

from service_stack import TINY, image_bytes

from latent_verbalizer.services.cli import main


def test_region_captions_are_labelled_and_each_region_is_charted(tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        (photos / f"p{i}.png").write_bytes(image_bytes(i))
    run = tmp_path / "run"
    assert main(["verbalize", str(photos), "--out", str(run), *TINY, "--seq-len", "8", "--layers", "0,3",
                 "--regions", "grid:1x2", "--region", "left=0,0,0.5,1"]) == 0
    results = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]

    labels_path = tmp_path / "labels.json"
    capsys.readouterr()
    assert main(["categorize", str(run / "results.jsonl"), "--backend", "embedded", "--out", str(labels_path)]) == 0
    progress = [line for line in capsys.readouterr().err.splitlines() if "categorize: progress" in line]
    assert progress and "captions_per_s=" in progress[0] and "phrases_per_s=" in progress[0]  # not a terminal: logs
    labels = json.loads(labels_path.read_text())
    assert sorted(labels) == ["layer_0", "layer_3"]
    for layer in (0, 3):
        entries = labels[f"layer_{layer}"]
        assert [e["id"] for e in entries] == ["p0", "p1"]
        for entry, result in zip(entries, results, strict=True):
            assert list(entry["regions"]) == ["left", "r0c0", "r0c1"]
            for region in result["regions"]:
                caption = next(c for c in region["layers"] if c["layer"] == layer)
                labelled = entry["regions"][region["region"]["label"]]
                assert labelled["caption"] == caption["caption"]
                assert labelled["mean_entropy"] == caption["mean_entropy"]
                assert labelled["phrases"] and all(1 <= len(p["labels"]) <= 3 for p in labelled["phrases"])

    analysis = tmp_path / "analysis"
    assert main(["analyze", str(labels_path), "--out", str(analysis)]) == 0
    for name in ("left", "r0c0", "r0c1"):
        folder = analysis / "regions" / name
        assert {"distribution.csv", "figure.png", "entropy.png", "summary.json"} <= {p.name for p in folder.iterdir()}
        assert [row["layer"] for row in csv.DictReader((folder / "distribution.csv").open())] == ["0", "3"]
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["region"] == name and sum(layer["counted"] for layer in summary["layers"]) == 4
    assert (analysis / "distribution.csv").is_file()  # the images' own chart, as before

    plain = tmp_path / "plain.json"
    assert main(["categorize", str(run / "results.jsonl"), "--backend", "embedded", "--no-regions",
                 "--out", str(plain)]) == 0
    assert not any("regions" in e for entries in json.loads(plain.read_text()).values() for e in entries)
