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


OFFLINE_CAPTION = """
import sys
from transformers import LlavaForConditionalGeneration, LlavaProcessor
from latent_verbalizer.services.demo.synth import Scene
from latent_verbalizer.services.demo.train_llava import greedy_captions
from latent_verbalizer.services.families.naming import PROJECT_MODELS
import json
path = PROJECT_MODELS["llava_synth_demo"][1]
model = LlavaForConditionalGeneration.from_pretrained(path).eval()
processor = LlavaProcessor.from_pretrained(path)
scene = Scene.from_dict(json.loads(sys.argv[1]))
from latent_verbalizer.services.demo.synth import render
print(greedy_captions(model, processor, [render(scene, 123, 0)])[0])
"""


def test_shipped_model_loads_offline_and_captions_a_fixed_scene_at_its_feature_layer():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": "/nonexistent"}
    out = subprocess.run([sys.executable, "-c", OFFLINE_CAPTION, json.dumps(FIXED_SCENE.to_dict())], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == FIXED_SCENE.caption


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
