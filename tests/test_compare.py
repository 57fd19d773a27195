"""`latent-verbalizer compare`: runs of two models of different depth side by side, and the flat caption
table every comparison and captions.csv come from."""

import csv
import io
import json

import pytest

from latent_verbalizer.services.cli import main
from latent_verbalizer.shared.tables import COLUMNS, caption_rows, captions_csv
from tests.test_cli_verbalize import png_bytes


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The demo model (6 blocks) labelled, and coca_tiny (4 blocks) unlabelled, on the same two images."""
    root = tmp_path_factory.mktemp("compare")
    images = root / "images"
    images.mkdir()
    for i in range(2):
        (images / f"im{i}.png").write_bytes(png_bytes(i, size=(64, 64)))
    demo, tiny = root / "demo", root / "tiny"
    assert main(["verbalize", str(images), "--out", str(demo)]) == 0
    assert main(["categorize", str(demo / "results.jsonl"), "--backend", "embedded",
                 "--out", str(demo / "labels.json")]) == 0
    assert main(["verbalize", str(images), "--out", str(tiny), "--model", "coca_tiny", "--seq-len", "8"]) == 0
    return root, demo, tiny


def test_compare_aligns_models_of_different_depth(runs):
    root, demo, tiny = runs
    out = root / "cmp"
    assert main(["compare", str(demo), str(tiny), "--out", str(out), "--names", "demo,tiny"]) == 0
    for name in ("grounding.csv", "grounding.png", "distribution.csv", "distributions.png", "report.md"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    assert [r["name"] for r in summary["runs"]] == ["demo", "tiny"]
    assert summary["x_axis"].startswith("relative depth")
    depths = {(row["run"], row["layer"]): row["depth"] for row in summary["grounding"]}
    assert depths[("demo", 5)] == depths[("tiny", 3)] == 1.0 and depths[("tiny", 1)] == pytest.approx(1 / 3, 1e-3)
    assert {row["run"] for row in summary["distribution"]} == {"demo"}  # only the labelled run has classes
    report = (out / "report.md").read_text()
    assert "### im0" in report and "### im1" in report  # both images' ladders, side by side
    ladder = report.split("### im0")[1].split("###")[0]
    assert ladder.count("\n| ") == 1 + 6  # header + one row per layer of the first run
    assert "(L3)" in ladder  # tiny's deepest layer stands beside demo's deepest


def test_compare_refuses_what_it_cannot_compare(runs, tmp_path, capsys):
    root, demo, _ = runs
    assert main(["compare", str(demo), "--out", str(tmp_path / "a")]) == 2
    assert "two or more run folders" in capsys.readouterr().out
    assert main(["compare", str(demo), str(tmp_path), "--out", str(tmp_path / "b")]) == 2
    assert "no results.jsonl" in capsys.readouterr().out
    assert main(["compare", str(demo), str(demo), "--out", str(tmp_path / "c")]) == 2
    assert "distinct names" in capsys.readouterr().out


def test_caption_rows_one_per_caption_with_every_grounding_column(runs):
    _, demo, _ = runs
    results = [json.loads(line) for line in (demo / "results.jsonl").read_text().splitlines()]
    rows = list(caption_rows(results))
    assert len(rows) == 2 * 6
    for column in ("id", "source", "layer", "caption", "mean_entropy", "image_score", "retrieval_rank",
                   "prior", "prior_overlap", "last_layer_similarity"):
        assert column in COLUMNS
    assert rows[0]["id"] == "im0" and rows[0]["layer"] == 0 and rows[0]["region"] == ""
    assert all(isinstance(r["image_score"], float) and r["retrieval_rank"] in (1, 2) for r in rows)
    table = list(csv.DictReader(io.StringIO(captions_csv(results))))
    assert len(table) == 12 and table[7]["caption"] == rows[7]["caption"]
