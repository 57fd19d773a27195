"""Which weights a model means when the user names none (shared.pretrained), through the commands a user
runs: verbalize, worker and serve with only a model name; and the errors and notes around loading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest

from latent_verbalizer.shared.models import load_model
from latent_verbalizer.shared.pretrained import COCO_CAPTIONING_TAG, default_pretrained, resolve_pretrained
from latent_verbalizer.shared.settings import DEMO_MODEL, DEMO_PRETRAINED
from tests.service_stack import free_port, image_bytes, redis_server, service, service_env


def cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "latent_verbalizer.services.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.mark.parametrize(("model", "expected"), [
    (DEMO_MODEL, DEMO_PRETRAINED),
    ("coca_ViT-B-32", COCO_CAPTIONING_TAG),
    ("coca_ViT-L-14", COCO_CAPTIONING_TAG),
    ("coca_tiny", None),  # a config without weights: random weights
])
def test_the_model_decides_its_default_weights(model, expected):
    assert default_pretrained(model) == expected
    assert resolve_pretrained(model, None) == expected


def test_given_weights_win_and_none_means_random():
    assert resolve_pretrained("coca_ViT-B-32", "laion2b_s13b_b90k") == "laion2b_s13b_b90k"
    assert resolve_pretrained(DEMO_MODEL, "none") is None
    assert resolve_pretrained(DEMO_MODEL, "NONE") is None


@pytest.fixture
def one_image(tmp_path) -> Path:
    path = tmp_path / "img.png"
    path.write_bytes(image_bytes(0))
    return path


def test_verbalize_with_only_a_weightless_model_uses_random_weights(one_image, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "LV_PRETRAINED"}
    r = cli("verbalize", str(one_image), "--model", "coca_tiny", "--out", str(tmp_path / "o"), env=env)
    assert r.returncode == 0, r.stderr
    assert "pretrained=none" in r.stderr or '"pretrained": "none"' in r.stderr
    line = json.loads((tmp_path / "o" / "results.jsonl").read_text().splitlines()[0])
    blocks = open_clip.get_model_config("coca_tiny")["vision_cfg"]["layers"]
    assert [c["layer"] for c in line["layers"]] == list(range(blocks))


def test_verbalize_with_an_open_clip_model_offline_fails_fast_naming_the_chosen_tag(one_image, tmp_path):
    env = {**{k: v for k, v in os.environ.items() if k != "LV_PRETRAINED"}, "HF_HUB_OFFLINE": "1"}
    r = cli("verbalize", str(one_image), "--model", "coca_ViT-B-32", "--out", str(tmp_path / "o"), env=env)
    assert r.returncode == 2
    assert f"coca_ViT-B-32/{COCO_CAPTIONING_TAG} are not in the local cache" in r.stderr
    assert "huggingface.co/laion/mscoco_finetuned_CoCa-ViT-B-32-laion2B-s13B-b90k" in r.stderr
    assert "Retrying" not in r.stderr and "Traceback" not in r.stderr  # one look at the hub, no retries


def test_the_demo_model_loads_without_a_false_random_init_warning(caplog):
    with caplog.at_level("WARNING"):
        load_model(DEMO_MODEL, DEMO_PRETRAINED)
    assert not [r for r in caplog.records if "initialized randomly" in r.getMessage()]


def test_a_photo_sized_image_on_the_demo_model_gets_a_note(tmp_path):
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(image_bytes(1, size=(640, 480), fmt="JPEG"))
    r = cli("verbalize", str(photo), "--layers", "5", "--no-grounding", "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    assert "trained on synthetic coloured shapes only" in r.stderr
    assert "--model coca_ViT-L-14" in r.stderr


@pytest.mark.parametrize("bad", ["missing.png", "empty_dir"])
def test_verbalize_refuses_inputs_with_no_images_before_loading_a_model(tmp_path, bad):
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "empty_dir" / "notes.txt").write_text("no images here")
    r = cli("verbalize", str(tmp_path / bad), "--model", "coca_ViT-B-32", "--out", str(tmp_path / "o"))
    assert r.returncode == 2
    assert str(tmp_path / bad) in r.stderr and r.stderr.startswith("error:")
    assert "weights" not in r.stderr  # failed before choosing or loading any model


def test_worker_with_only_lv_model_loads_that_models_default(tmp_path):
    with redis_server(tmp_path) as url:
        env = service_env(url, tmp_path)
        del env["LV_PRETRAINED"]
        r = cli("worker", "encoder", "--burst", env=env)
    assert r.returncode == 0, r.stderr
    assert "coca_tiny" in r.stderr and "the model's default" in r.stderr


def test_serve_with_only_a_model_reports_the_weights_it_chose(tmp_path):
    port = free_port()
    with redis_server(tmp_path) as url:
        env = service_env(url, tmp_path, LV_PORT=str(port))
        del env["LV_PRETRAINED"]
        with service(["serve", "--model", "coca_tiny", "--port", str(port)], env, tmp_path / "serve.log",
                     port) as client:
            model = client.get("/v1/options").json()["model"]
    assert model["name"] == "coca_tiny"
    assert model["pretrained"] is None
