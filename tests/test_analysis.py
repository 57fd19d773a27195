"""The per-layer analysis on hand-made labels with known numbers, the reference-answer parser, the
report files, the taxonomy, and the categorize / analyze commands end to end."""

from __future__ import annotations

import csv
import json
import math

import pytest

from latent_verbalizer.services.categorizer.analysis import analyze
from latent_verbalizer.services.categorizer.models import CaptionLabels, Phrase
from latent_verbalizer.services.categorizer.reference import parse_answer, read_reference_labels
from latent_verbalizer.services.categorizer.report import write_report
from latent_verbalizer.services.cli import main
from latent_verbalizer.shared.pmi import TAU
from latent_verbalizer.shared.schemas import ImageResult, LayerCaption
from latent_verbalizer.shared.taxonomy import UNKNOWN, load_taxonomy


def caption(*mains: str, error: str | None = None) -> CaptionLabels:
    return CaptionLabels(caption="c", phrases=[Phrase(text=m, labels=[m]) for m in mains], error=error)


LABELS = {
    0: [
        caption("color", "color", "UNKNOWN", "object"),  # color 50, UNKNOWN 25, objects 25
        caption("male", "actions"),  # person 50, action 50
        caption(error="HTTP 500"),  # failed: left out
        caption(),  # no phrases: left out
    ],
    3: [caption("gold", "relation")],  # off-list -> UNKNOWN 50; relation -> position 50
}


def test_mean_percentage_of_class_per_layer():
    result = analyze(LABELS)
    assert result.layers == [0, 3]
    row = result.row(0)
    assert row["color"] == pytest.approx(25.0)
    assert row["UNKNOWN"] == pytest.approx(12.5)
    assert row["objects"] == pytest.approx(12.5)
    assert row["person"] == pytest.approx(25.0)
    assert row["action"] == pytest.approx(25.0)
    assert sum(row.values()) == pytest.approx(100.0)
    assert result.row(3)["UNKNOWN"] == pytest.approx(50.0) and result.row(3)["position"] == pytest.approx(50.0)
    assert result.counts[0].model_dump() == {"captions": 4, "counted": 2, "failed": 1, "phrases": 6}
    # the classes reaching 5% in some layer, in the reference figure's order
    assert result.plotted == ["color", "UNKNOWN", "objects", "action", "person", "position"]
    assert result.mean_entropy is None
    assert analyze(LABELS, entropies={0: [1.0, 3.0], 3: [5.0]}).mean_entropy == [2.0, 5.0]
    odd = analyze(LABELS, entropies={0: [1.0, float("inf")], 3: []}).mean_entropy
    assert odd[0] == 1.0 and math.isnan(odd[1])  # non-finite values and empty layers do not poison the mean


def test_report_files(tmp_path):
    paths = write_report(analyze(LABELS, entropies={0: [2.0], 3: [4.0]}), tmp_path, {"source": "test"})
    assert sorted(p.name for p in paths) == ["distribution.csv", "entropy.png", "figure.png", "summary.json"]
    rows = list(csv.reader((tmp_path / "distribution.csv").open()))
    assert rows[0] == ["layer", *load_taxonomy().classes]
    assert [r[0] for r in rows[1:]] == ["0", "3"]
    assert float(rows[1][rows[0].index("color")]) == pytest.approx(25.0)
    for png in ("figure.png", "entropy.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["source"] == "test" and summary["layers"][0]["counted"] == 2
    assert summary["layers"][1]["mean_entropy"] == 4.0
    assert summary["plotted"]["objects"] == "objects"  # one name per class: distribution.csv's column


def test_reference_parser_keeps_duplicates_and_tolerates_odd_values():
    phrases = parse_answer('{"red": ["color","",""], "red": ["color"], "x": "UNKNOWN", "y": [{"a": 1}], "z": []}')
    assert [(p.text, p.labels) for p in phrases] == [
        ("red", ["color"]),
        ("red", ["color"]),
        ("x", ["UNKNOWN"]),
        ("y", [""]),  # a main label that is not a string folds into UNKNOWN
        ("z", [""]),
    ]
    assert parse_answer('{"red": ["color","",""], "blue": ["col') is None  # cut off
    assert parse_answer('["red"]') is None  # not an object
    assert parse_answer("{}") == []


def reference_folder(tmp_path):
    folder = tmp_path / "answers"
    folder.mkdir()
    answers = ['{"a man": ["person", "male", ""], "riding": ["action", "", ""]}', '{"red": ["color"', "{}"]
    (folder / "layer_4.json").write_text(json.dumps(answers))
    (folder / "layer_0.json").write_text(json.dumps(['{"blue": ["color","",""], "blue": ["color","",""]}']))
    (folder / "notes.txt").write_text("not a layer")
    return folder


def test_read_reference_labels_counts_unparsable_answers(tmp_path):
    labels, unparsed = read_reference_labels(reference_folder(tmp_path))
    assert list(labels) == [0, 4] and unparsed == 1
    assert labels[4][1].error and not labels[4][1].phrases
    result = analyze(labels)
    assert result.row(4)["person"] == pytest.approx(50.0) and result.row(0)["color"] == pytest.approx(100.0)
    assert result.counts[1].model_dump() == {"captions": 3, "counted": 1, "failed": 1, "phrases": 2}


def test_analyze_command_reference_format(tmp_path):
    out = tmp_path / "report"
    assert main(["analyze", "--reference-format", str(reference_folder(tmp_path)), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["unparsed_answers"] == 1
    assert [entry["layer"] for entry in summary["layers"]] == [0, 4]
    assert (out / "figure.png").exists() and not (out / "entropy.png").exists()


def test_categorize_then_analyze_commands(tmp_path):
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({"layer_0": ["red red zuzu", "red red zuzu"], "layer_1": ["a man riding a horse"]}))
    labels = tmp_path / "labels.json"
    assert main(["categorize", str(captions), "--backend", "embedded", "--out", str(labels)]) == 0
    doc = json.loads(labels.read_text())
    assert list(doc) == ["layer_0", "layer_1"] and len(doc["layer_0"]) == 2
    assert [p["text"] for p in doc["layer_1"][0]["phrases"]] == ["a man", "riding", "a horse"]
    assert doc["layer_1"][0]["phrases"][0]["labels"][0] == "person"
    out = tmp_path / "report"
    assert main(["analyze", str(labels), "--out", str(out)]) == 0
    rows = {r["layer"]: r for r in csv.DictReader((out / "distribution.csv").open())}
    assert float(rows["0"]["color"]) == pytest.approx(200 / 3) and float(rows["0"][UNKNOWN]) == pytest.approx(100 / 3)


def test_categorize_reads_results_jsonl_and_carries_entropy(tmp_path):
    def result(i: int, entropy: float) -> str:
        layers = [
            LayerCaption(layer=layer, caption="a red dog", tokens=[], entropy=[], mean_entropy=entropy + layer)
            for layer in (0, 1)
        ]
        return ImageResult(id=str(i), source="x", layers=layers).model_dump_json()

    failed = ImageResult(id="9", source="y", error="unreadable").model_dump_json()
    results = tmp_path / "results.jsonl"
    results.write_text("\n".join([result(0, 1.0), failed, result(1, 3.0)]) + "\n")
    labels, out = tmp_path / "labels.json", tmp_path / "report"
    assert main(["categorize", str(results), "--backend", "embedded", "--out", str(labels)]) == 0
    entries = json.loads(labels.read_text())["layer_1"]
    assert [(e["id"], e["mean_entropy"]) for e in entries] == [("0", 2.0), ("1", 4.0)]  # joins back to the images
    assert main(["analyze", str(labels), "--out", str(out)]) == 0  # no --entropy: the labels carry it
    assert [entry["mean_entropy"] for entry in json.loads((out / "summary.json").read_text())["layers"]] == [2.0, 3.0]
    assert (out / "entropy.png").exists()


def test_categorize_phrases_command(tmp_path):
    phrases, out = tmp_path / "phrases.json", tmp_path / "out.json"
    phrases.write_text(json.dumps(["a dog", "next to", "zzqxv", "a dog"]))
    assert main(["categorize", "--phrases", str(phrases), "--backend", "embedded", "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    assert [p["text"] for p in written] == ["a dog", "next to", "zzqxv", "a dog"]
    assert [p["labels"][0] for p in written] == ["animal", "position", UNKNOWN, "animal"]


BAD_CAPTION_FILES = {  # name -> content of files `categorize` must refuse
    "bad.json": b"{not json",
    "list.json": json.dumps(["a caption"]).encode(),
    "keys.json": json.dumps({"captions": ["a caption"]}).encode(),
    "string_layer.json": json.dumps({"layer_0": "a red dog"}).encode(),
    "numbers.json": json.dumps({"layer_0": [1, 2]}).encode(),
    "empty.json": b"{}",
    "results.jsonl": (ImageResult(id="a", source="x", layers=[]).model_dump_json() + '\n{"id": "b"}\n').encode(),
    "binary.json": b"\xff\xfe\x00bad",
}


@pytest.mark.parametrize("name", [*BAD_CAPTION_FILES, "missing.json", "folder.json"])
def test_categorize_refuses_bad_files_with_one_error_line(tmp_path, capsys, name):
    path = tmp_path / name
    if name == "folder.json":
        path.mkdir()
    elif name != "missing.json":
        path.write_bytes(BAD_CAPTION_FILES[name])
    out = tmp_path / "labels.json"
    assert main(["categorize", str(path), "--backend", "embedded", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}") and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_categorize_phrases_and_analyze_refuse_bad_files(tmp_path, capsys):
    phrases, labels = tmp_path / "phrases.json", tmp_path / "labels.json"
    phrases.write_text(json.dumps({"a dog": 1}))
    labels.write_text(json.dumps({"layer_0": [{"phrases": []}]}))  # no caption
    commands = [
        ["categorize", "--phrases", str(phrases), "--backend", "embedded", "--out", str(tmp_path / "out.json")],
        ["analyze", str(labels), "--out", str(tmp_path / "report")],
        ["analyze", str(tmp_path / "missing.json"), "--out", str(tmp_path / "report")],
        ["analyze", "--reference-format", str(tmp_path / "missing"), "--out", str(tmp_path / "report")],
        ["analyze", str(tmp_path / "phrases.json"), "--entropy", str(labels), "--out", str(tmp_path / "report")],
    ]
    for argv in commands:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, (argv, err)
        assert "Traceback" not in err


def _labels_file(tmp_path, layers: dict[int, list[CaptionLabels]]):
    path = tmp_path / "labels.json"
    path.write_text(json.dumps({f"layer_{k}": [c.model_dump() for c in v] for k, v in layers.items()}))
    return path


def test_analyze_writes_its_files_with_a_note_when_every_caption_failed(tmp_path):
    failed = {layer: [caption(error="HTTP 500"), caption(error="timeout")] for layer in (0, 1)}
    out = tmp_path / "report"
    assert main(["analyze", str(_labels_file(tmp_path, failed)), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["note"].startswith("no labels: none of the 4 captions was labelled (4 failed")
    assert summary["plotted"] == {} and [e["failed"] for e in summary["layers"]] == [2, 2]
    assert (out / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "distribution.csv").exists()


def test_analyze_writes_its_files_with_a_note_when_no_class_reaches_the_threshold(tmp_path):
    taxonomy = load_taxonomy()
    spread = [taxonomy.merged_classes[c][0] or c for c in taxonomy.classes if c != UNKNOWN][:21]  # 21 x 4.8%
    out = tmp_path / "report"
    assert main(["analyze", str(_labels_file(tmp_path, {0: [caption(*spread)]})), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["note"] == "no class reaches 5% of a caption's phrases in any layer"
    assert summary["layers"][0]["counted"] == 1 and (out / "figure.png").exists()


def test_taxonomy_folds_labels_and_colours_every_class():
    taxonomy = load_taxonomy()
    assert taxonomy.merge("male") == "person" and taxonomy.merge(" Color ") == "color"
    assert taxonomy.merge("") == UNKNOWN and taxonomy.merge("no such label") == UNKNOWN
    assert all(taxonomy.merge(label) in taxonomy.classes for label in taxonomy.labels)
    colours = [taxonomy.color(c) for c in taxonomy.classes]
    assert len(set(colours)) == len(colours) and all(c.startswith("#") and len(c) == 7 for c in colours)


def grounded(*phrases: tuple[str, float | None]) -> CaptionLabels:
    """A caption whose phrases (main label, pmi) carry likelihood grounding (supported: pmi > TAU)."""
    return CaptionLabels(caption="c", phrases=[
        Phrase(text=m, labels=[m], pmi=v, supported=None if v is None else v > TAU) for m, v in phrases])


def test_the_chart_of_supported_phrases_counts_only_what_the_image_supports(tmp_path):
    labels = {
        0: [grounded(("color", TAU + 2), ("object", 0.1), ("color", -1.0), ("male", TAU + 1)),  # color 25, person 25
            grounded(("color", 0.0), ("actions", None)),  # the unmatched phrase is out: 0 of 1 supported
            caption("color")],  # no grounding: out
        2: [grounded(("object", TAU + 0.5))],
    }
    result = analyze(labels)
    assert result.supported.share == [pytest.approx(2 / 5), 1.0] and result.supported.phrases == [5, 1]
    row = dict(zip(result.classes, result.supported.percent[0]))
    assert row["color"] == pytest.approx(12.5) and row["person"] == pytest.approx(12.5)  # (25 + 0) / 2 captions
    assert sum(row.values()) == pytest.approx(25.0)  # the layer's mean supported percentage, not 100
    assert analyze(LABELS).supported is None  # no PMI anywhere: no chart of it

    paths = write_report(result, tmp_path)
    assert {"distribution_supported.csv", "figure_supported.png"} <= {p.name for p in paths}
    rows = list(csv.DictReader((tmp_path / "distribution_supported.csv").open()))
    assert float(rows[0]["color"]) == pytest.approx(12.5) and float(rows[0]["unsupported"]) == pytest.approx(75.0)
    assert float(rows[1]["objects"]) == pytest.approx(100.0) and float(rows[1]["unsupported"]) == pytest.approx(0.0)
    assert (tmp_path / "figure_supported.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["supported"]["tau"] == TAU and summary["supported"]["share"] == [pytest.approx(0.4), 1.0]
    assert summary["layers"][0]["supported_share"] == pytest.approx(0.4)
    assert summary["layers"][1]["top_supported_classes"]["objects"] == 100.0
    without = tmp_path / "plain"
    assert "figure_supported.png" not in {p.name for p in write_report(analyze(LABELS), without)}


def test_categorize_gives_phrases_the_pmi_of_their_words_in_each_image(tmp_path):
    def result(i: int, word_pmi: list[float] | None) -> str:
        layer = LayerCaption(layer=0, caption="a man riding a horse", tokens=[], entropy=[], mean_entropy=1.0,
                             word_pmi=word_pmi)
        return ImageResult(id=str(i), source="x", layers=[layer]).model_dump_json()

    results = tmp_path / "results.jsonl"
    word_pmi = [[0.0, 2 * TAU + 2, TAU - 1, 0.0, 2 * TAU], [0.0, 0.2, 0.1, 0.0, 2 * TAU + 6]]
    results.write_text("\n".join([result(0, word_pmi[0]), result(1, word_pmi[1])]))
    labels, out = tmp_path / "labels.json", tmp_path / "report"
    assert main(["categorize", str(results), "--backend", "embedded", "--out", str(labels)]) == 0
    first, second = json.loads(labels.read_text())["layer_0"]  # one caption, labelled once, two images' PMIs
    assert [(p["text"], p["pmi"], p["supported"]) for p in first["phrases"]] == [
        ("a man", TAU + 1, True), ("riding", TAU - 1, False), ("a horse", TAU, False)]
    assert [(p["pmi"], p["supported"]) for p in second["phrases"]] == [(0.1, False), (0.1, False), (TAU + 3, True)]
    assert main(["analyze", str(labels), "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["layers"][0]["supported_share"] == pytest.approx(2 / 6)
    assert (out / "figure_supported.png").exists() and (out / "distribution_supported.csv").exists()
