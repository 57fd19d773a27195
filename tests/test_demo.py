"""The shipped demo model: loads offline, captions fixed scenes right at the last layer; the demo
command and the training loop work end to end."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open

from latent_verbalizer.services.cli import main
from latent_verbalizer.services.demo.evaluate import png_bytes
from latent_verbalizer.services.demo.scoring import score
from latent_verbalizer.services.demo.synth import Scene, SceneObject, render
from latent_verbalizer.services.demo.train import TrainConfig, train
from latent_verbalizer.services.families.coca import CocaFamily
from latent_verbalizer.services.pipeline import verbalize
from latent_verbalizer.shared.images import ImageItem
from latent_verbalizer.shared.models import PROJECT_WEIGHTS, load_model
from latent_verbalizer.shared.settings import DEMO_MODEL, DEMO_PRETRAINED

FIXED_SCENES = [
    Scene((SceneObject("red", "circle", "large", 30, 34, 27),), "gray"),
    Scene((SceneObject("blue", "square", "small", 16, 20, 17),
           SceneObject("yellow", "cross", "large", 42, 40, 28)), "striped"),
    Scene((SceneObject("green", "triangle", "large", 15, 16, 26),
           SceneObject("purple", "cross", "small", 33, 46, 17),
           SceneObject("orange", "circle", "small", 51, 17, 16)), "white"),
]


@pytest.fixture(scope="module")
def demo():
    return CocaFamily(load_model(DEMO_MODEL, DEMO_PRETRAINED))


def test_shipped_weights_are_small_fp16():
    path = PROJECT_WEIGHTS[(DEMO_MODEL, DEMO_PRETRAINED)]
    assert path.stat().st_size <= 25 * 1024 * 1024
    with safe_open(str(path), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert torch.float16 in dtypes and torch.float32 not in dtypes


def test_demo_model_captions_fixed_scenes(demo):
    items = [ImageItem(id=f"fixed{i}", source="test", data=png_bytes(render(s, 123, i)))
             for i, s in enumerate(FIXED_SCENES)]
    last = demo.num_layers - 1
    results = list(verbalize(demo, items, layers=[last]))
    captions = [r.layers[0].caption for r in results]
    for scene, caption in zip(FIXED_SCENES, captions):
        assert score(caption, scene)["color_shape"], (scene.caption, caption)


def test_demo_command_writes_what_the_real_pipeline_makes_and_ends_with_the_layer_table(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--n", "3"]) == 0
    for name in ("results.jsonl", "captions.json", "prior.json", "labels.json", "distribution.csv", "figure.png",
                 "entropy.png", "grounding.csv", "grounding.png", "summary.json", "report.md", "report.json"):
        assert (tmp_path / name).is_file(), name
    results = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(results) == 3 and all(len(r["layers"]) == 6 for r in results)
    labels = json.loads((tmp_path / "labels.json").read_text())
    assert [e["id"] for e in labels["layer_5"]] == [r["id"] for r in results]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["plotted"] and [g["layer"] for g in summary["grounding"]["layers"]] == list(range(6))
    report = json.loads((tmp_path / "report.json").read_text())
    assert [row["layer"] for row in report["layers"]] == list(range(6))
    assert report["layers"][-1]["color_shape"] == 1.0  # the demo model reads every scene at its last layer
    assert all(row["classes"] for row in report["layers"])
    md = (tmp_path / "report.md").read_text()
    assert "ground truth" in md and "](figure.png)" in md and "](grounding.png)" in md
    table = capsys.readouterr().out.split("what each encoder layer's caption says")[1]
    assert sum(line.startswith("| ") for line in table.splitlines()) == 1 + 6  # header, one row per layer
    assert str(tmp_path / "figure.png") in table


def test_training_is_deterministic_with_or_without_loader_workers(tmp_path):
    cfg = TrainConfig(steps=2, batch_size=4, warmup=1, threads=1, eval_every=2, eval_n=2)
    a = load_model(DEMO_MODEL, str(train(cfg, tmp_path / "a"))).model.state_dict()
    b = load_model(DEMO_MODEL, str(train(replace(cfg, workers=2), tmp_path / "b"))).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(line) for line in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["config"]["steps"] == 2 and "eval_color_shape" in log[-1]
