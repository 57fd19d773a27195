"""The LLaVA demo model: its vision tower is the CoCa demo's ViT block for block, its processor the CoCa
demo's preprocessing; the shipped directory loads offline and captions a fixed scene right at its feature
layer; training is deterministic and writes a loadable save_pretrained directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from latent_verbalizer.services.cli import main
from latent_verbalizer.services.demo.llava_model import build_processor, clip_vision_from_coca
from latent_verbalizer.services.demo.synth import Scene, SceneObject, render, scenes
from latent_verbalizer.services.demo.train_llava import LlavaTrainConfig, train
from latent_verbalizer.services.encoder.stage import capture_blocks
from latent_verbalizer.services.families.naming import PROJECT_MODELS
from latent_verbalizer.shared.models import load_model
from latent_verbalizer.shared.settings import DEMO_MODEL, DEMO_PRETRAINED, LLAVA_DEMO_MODEL

SHIPPED = Path(PROJECT_MODELS[LLAVA_DEMO_MODEL][1])
FIXED_SCENE = Scene((SceneObject("blue", "square", "small", 16, 20, 17),
                     SceneObject("yellow", "cross", "large", 42, 40, 28)), "striped")


@pytest.fixture(scope="module")
def coca():
    return load_model(DEMO_MODEL, DEMO_PRETRAINED)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    photo_like = render(FIXED_SCENE, 5, 0).resize((150, 97), Image.Resampling.BILINEAR)  # not square, not 64 px
    return [img for _, _, img in scenes(5, 3)] + [photo_like]


def test_converted_tower_equals_the_coca_encoder_after_every_block(coca, images):
    pixels = torch.stack([coca.preprocess(img) for img in images])
    hidden = capture_blocks(coca.model.visual, pixels, list(range(coca.num_layers)))  # [L, n, T, C]
    with torch.no_grad():
        states = clip_vision_from_coca(coca.model.visual)(pixels, output_hidden_states=True).hidden_states
    assert len(states) == coca.num_layers + 1
    for i in range(coca.num_layers):
        assert torch.allclose(states[i + 1], hidden[i], atol=1e-4, rtol=1e-4), f"block {i}"


def test_image_processor_is_the_coca_demo_preprocessing(coca, images):
    ours = build_processor().image_processor(images, return_tensors="pt")["pixel_values"]
    assert torch.allclose(ours, torch.stack([coca.preprocess(img) for img in images]), atol=1e-6)


def test_shipped_model_is_small_fp16_and_in_the_package_data():
    files = list(SHIPPED.iterdir())
    assert sum(f.stat().st_size for f in files) <= 25 * 1024 * 1024
    assert json.loads((SHIPPED / "config.json").read_text())["torch_dtype"] == "float16"
    pyproject = (SHIPPED.parents[2] / "pyproject.toml").read_text()
    assert f'"weights/{LLAVA_DEMO_MODEL}/*"' in pyproject


# In a fresh process with the hub switched off: by its name through the family interface (the pipeline at the
# model's feature layer), and with transformers' own from_pretrained + generate.
OFFLINE_CAPTION = """
import json, sys
from transformers import LlavaForConditionalGeneration, LlavaProcessor
from latent_verbalizer.services.demo.evaluate import png_bytes
from latent_verbalizer.services.demo.synth import Scene, render
from latent_verbalizer.services.demo.train_llava import greedy_captions
from latent_verbalizer.services.families import load_family
from latent_verbalizer.services.families.naming import PROJECT_MODELS
from latent_verbalizer.services.pipeline import verbalize
from latent_verbalizer.shared.images import ImageItem

image = render(Scene.from_dict(json.loads(sys.argv[1])), 123, 0)
family = load_family("llava_synth_demo")
item = ImageItem(id="fixed", source="test", data=png_bytes(image))
(result,) = verbalize(family, [item], layers=[family.feature_layer])
print(family.family, family.feature_layer)
print(result.layers[0].caption)
path = PROJECT_MODELS["llava_synth_demo"][1]
model, processor = LlavaForConditionalGeneration.from_pretrained(path), LlavaProcessor.from_pretrained(path)
print(greedy_captions(model.eval(), processor, [image], prompt=family.prompt)[0])
"""


def test_shipped_model_loads_offline_by_name_and_captions_a_fixed_scene_at_its_feature_layer():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": "/nonexistent"}
    out = subprocess.run([sys.executable, "-c", OFFLINE_CAPTION, json.dumps(FIXED_SCENE.to_dict())], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    family, ours, own_generate = out.stdout.strip().splitlines()[-3:]
    assert family == "llava 4"  # vision_feature_layer -2 of 6 blocks
    assert ours == own_generate == FIXED_SCENE.caption


def test_demo_command_writes_the_coca_demos_files(tmp_path, capsys):
    assert main(["demo", "--model", "llava_synth_demo", "--out", str(tmp_path), "--n", "2"]) == 0
    for name in ("results.jsonl", "captions.json", "prior.json", "labels.json", "distribution.csv", "figure.png",
                 "entropy.png", "grounding.csv", "grounding.png", "summary.json", "report.md", "report.json"):
        assert (tmp_path / name).is_file(), name
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["model"] == LLAVA_DEMO_MODEL and [row["layer"] for row in report["layers"]] == list(range(6))
    assert report["layers"][4]["color_shape"] == 1.0  # its feature layer reads both scenes
    summary = json.loads((tmp_path / "summary.json").read_text())
    grounding = summary["grounding"]["layers"]
    assert all(g["image_score"] is None and g["last_layer_similarity"] is not None for g in grounding)
    assert "feature layer 4:" in capsys.readouterr().out


def test_training_is_deterministic_and_saves_a_loadable_model(tmp_path):
    cfg = LlavaTrainConfig(scenes=16, language_steps=2, projector_steps=2, finetune_steps=2, batch_size=4,
                           warmup=1, eval_every=2, eval_n=2)
    a = train(cfg, tmp_path / "a")
    b = train(replace(cfg), tmp_path / "b")
    wa = LlavaForConditionalGeneration.from_pretrained(a).state_dict()
    wb = LlavaForConditionalGeneration.from_pretrained(b).state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert LlavaProcessor.from_pretrained(a).tokenizer.chat_template
    log = [json.loads(line) for line in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["config"]["finetune_steps"] == 2
    assert [r["stage"] for r in log[1:] if "eval_color_shape" in r] == ["projector", "finetune"]


def test_train_demo_refuses_a_flag_of_the_other_family(tmp_path, capsys):
    assert main(["train-demo", "--family", "llava", "--steps", "3", "--out", str(tmp_path)]) == 2
    assert "--steps do not apply to --family llava" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
