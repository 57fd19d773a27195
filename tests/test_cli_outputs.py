"""Output folders as a user meets them (issue 25, items 1-2): a failed run never damages the previous run's
files, and a reused folder is never a mix of two runs: it is refused (naming --overwrite) or replaced whole."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from service_stack import TINY, image_bytes

from latent_verbalizer.services.cli import main
from latent_verbalizer.services.cli import verbalize as verbalize_cli
from latent_verbalizer.services.cli.outputs import MARKER
from latent_verbalizer.services.pipeline import verbalize

FAST = [*TINY, "--seq-len", "6", "--layers", "0,3"]


def status(argv: list[str]) -> int:
    """The command's exit status, whether it returns it or argparse exits with it."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones included), by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    """Staging or replaced folders a run left beside `folder`."""
    return [p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.")]


@pytest.fixture()
def first_run(photos, tmp_path) -> tuple[Path, dict[str, bytes]]:
    """A good run with regions, features and attributions: every kind of file a run writes."""
    out = tmp_path / "runs" / "keep"
    assert main(["verbalize", str(photos), "--out", str(out), *FAST, "--regions", "grid:1x2", "--save-features",
                 "--attributions"]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"results.jsonl", "captions.json", "prior.json", "regions.csv", "features", "attributions", MARKER} <= names
    return out, snapshot(out)


@pytest.mark.parametrize("bad,message", [
    (["--layers", "99"], "No layer 99: this model has layers 0–3."),
    (["--layers", "5-3"], "Range 5-3 goes backwards"),
    (["--batch-size", "0"], "argument --batch-size: must be a positive number, not 0"),
    (["--seq-len", "3", "--min-seq-len", "3"], "must be smaller than seq_len"),
    (["--regions", "grid:0x2"], "grid"),
    (["--model", "coca_nothing"], "unknown model"),
])
def test_a_run_refused_up_front_leaves_the_previous_run_byte_identical(first_run, photos, capsys, bad, message):
    out, before = first_run
    capsys.readouterr()
    assert status(["verbalize", str(photos), "--out", str(out), *FAST, "--overwrite", *bad]) == 2
    assert message in capsys.readouterr().err
    assert snapshot(out) == before and not leftovers(out)


def test_a_run_that_fails_midway_leaves_the_previous_run_byte_identical(first_run, photos, monkeypatch):
    """The real pipeline, interrupted after its first image (as a crash or out-of-memory would)."""
    out, before = first_run

    def crashing(*args, **kwargs):
        for n, result in enumerate(verbalize(*args, **kwargs)):
            if n == 1:
                raise RuntimeError("out of memory")
            yield result

    monkeypatch.setattr(verbalize_cli, "verbalize", crashing)
    with pytest.raises(RuntimeError, match="out of memory"):
        main(["verbalize", str(photos), "--out", str(out), *FAST, "--batch-size", "1", "--overwrite"])
    assert snapshot(out) == before and not leftovers(out)


def test_a_reused_folder_is_refused_naming_overwrite_or_replaced_whole(first_run, photos, capsys):
    out, before = first_run
    one = photos / "p0.png"
    assert main(["verbalize", str(one), "--out", str(out), *FAST]) == 2
    err = capsys.readouterr().err
    assert f"--out {out} holds an earlier `verbalize` run" in err and "--overwrite" in err
    assert snapshot(out) == before

    (out / "labels.json").write_text("{}")  # something the user added to the run: it goes with the run
    assert main(["verbalize", str(one), "--out", str(out), *FAST, "--overwrite"]) == 0
    names = {p.name for p in out.iterdir()}
    assert names == {"results.jsonl", "captions.json", "captions.csv", "run.json", "prior.json", MARKER}
    assert [json.loads(line)["id"] for line in (out / "results.jsonl").read_text().splitlines()] == ["p0"]
    assert json.loads((out / MARKER).read_text())["command"] == "verbalize" and not leftovers(out)


def test_a_folder_holding_other_files_is_never_replaced(photos, tmp_path, capsys):
    (photos / "notes.txt").write_text("mine")
    before = snapshot(photos)
    for extra in ([], ["--overwrite"]):
        assert main(["verbalize", str(photos), "--out", str(photos), *FAST, *extra]) == 2
        assert "is not empty and holds no latent-verbalizer run (notes.txt, p0.png" in capsys.readouterr().err
    assert snapshot(photos) == before
    # a run folder that holds the run's own inputs: --overwrite would delete them
    out = tmp_path / "run"
    assert main(["verbalize", str(photos / "p0.png"), "--out", str(out), *FAST]) == 0
    (out / "images").mkdir()
    (out / "images" / "p.png").write_bytes(image_bytes(5))
    assert main(["verbalize", str(out / "images"), "--out", str(out), *FAST, "--overwrite"]) == 2
    assert "lies inside --out" in capsys.readouterr().err and (out / "images" / "p.png").is_file()


def test_an_empty_existing_folder_is_used(photos, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert main(["verbalize", str(photos / "p1.png"), "--out", str(out), *FAST]) == 0
    assert (out / "results.jsonl").is_file()


def test_analyze_never_mixes_or_damages_its_folder(tmp_path, capsys):
    results = tmp_path / "results.jsonl"
    line = {"id": "a", "source": "a.png", "layers": [{"layer": 0, "caption": "red", "tokens": [1], "entropy": [1.0],
                                                     "mean_entropy": 1.0, "image_score": 0.2, "prior": False}]}
    results.write_text(json.dumps(line) + "\n")
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"layer_0": [{"caption": "red", "phrases": [{"text": "red", "labels": ["color"]}]}]}))
    out = tmp_path / "analysis"
    assert main(["analyze", str(labels), "--results", str(results), "--out", str(out)]) == 0
    assert (out / "grounding.csv").is_file()
    before = snapshot(out)

    bad = tmp_path / "bad.json"
    bad.write_text("{")
    assert main(["analyze", str(bad), "--out", str(out), "--overwrite"]) == 2
    assert main(["analyze", str(labels), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert snapshot(out) == before and not leftovers(out)

    assert main(["analyze", str(labels), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "grounding.csv").exists() and (out / "distribution.csv").is_file()  # replaced whole


def test_demo_refuses_a_reused_folder_and_a_failed_demo_keeps_the_last_one(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--n", "2"]) == 0
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert all(Path(r["source"]).parent == out / "images" and Path(r["source"]).is_file() for r in results)
    before = snapshot(out)
    assert main(["demo", "--out", str(out), "--n", "2"]) == 2
    assert "holds an earlier `demo` run" in capsys.readouterr().err
    assert main(["demo", "--out", str(out), "--n", "2", "--overwrite", "--model", "coca_nothing"]) == 2
    assert snapshot(out) == before and not leftovers(out)
