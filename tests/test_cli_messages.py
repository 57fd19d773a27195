"""What the commands say when a user gets something wrong, and while they work (issue 25, items 3-9 and 14):
each case through the command as a user runs it (main() in-process, or a subprocess where the terminal,
the environment or the network matter)."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import open_clip
import pytest
import torch
from service_stack import TINY, free_port
from test_cli_outputs import FAST, status

from latent_verbalizer.services.cli import main
from latent_verbalizer.services.cli.common import parse_layers
from latent_verbalizer.shared.models import load_model, save_checkpoint

NO_TINY_DEVICE = [a for a in FAST if a not in ("--device", "cpu")]
STATIC = Path(__file__).parents[1] / "services" / "gateway" / "static"


def cli(*args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "latent_verbalizer.services.cli", *args], capture_output=True,
                          text=True, timeout=600, env={**os.environ, **(env or {})}, **kw)


# --- 3. devices ---

@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_on_a_machine_without_a_gpu_says_so_and_what_auto_does(photos, tmp_path, capsys):
    assert main(["verbalize", str(photos), "--out", str(tmp_path / "o"), *NO_TINY_DEVICE, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "device 'cuda': no CUDA device is available on this machine" in err
    assert "--device auto, which takes the GPU where there is one and the CPU otherwise" in err
    assert "not in the local cache" not in err and not (tmp_path / "o").exists()
    # the same through LV_DEVICE, and for the demo
    r = cli("demo", "--out", str(tmp_path / "d"), "--n", "1", env={"LV_DEVICE": "cuda"})
    assert r.returncode == 2 and "no CUDA device is available" in r.stderr and "copy None" not in r.stderr
    assert not (tmp_path / "d").exists()


def test_an_unknown_device_is_one_line_listing_the_valid_ones(photos, tmp_path, capsys):
    assert main(["verbalize", str(photos), "--out", str(tmp_path / "o"), *NO_TINY_DEVICE, "--device", "gpu"]) == 2
    err = capsys.readouterr().err
    assert "error: device 'gpu' is not one of auto, cpu, cuda, cuda:N, mps (--device or LV_DEVICE)" in err
    assert "Traceback" not in err


# --- 4. sizes ---

@pytest.mark.parametrize("flag,value", [("--batch-size", "0"), ("--decode-batch", "0"), ("--decode-batch", "-2"),
                                        ("--max-pixels", "0"), ("--batch-size", "x")])
def test_a_non_positive_size_is_refused_up_front(photos, tmp_path, capsys, flag, value):
    assert status(["verbalize", str(photos), "--out", str(tmp_path / "o"), *FAST, flag, value]) == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: must be a " in err and ("positive number" in err or "whole number" in err)
    assert not (tmp_path / "o").exists()


def test_demo_refuses_zero_scenes(tmp_path, capsys):
    assert status(["demo", "--out", str(tmp_path / "d"), "--n", "0"]) == 2
    assert "argument --n: must be a positive number, not 0" in capsys.readouterr().err


# --- 5. layers ---

@pytest.mark.parametrize("text,message", [
    ("5-3", "--layers 5-3: Range 5-3 goes backwards."),
    ("a", "--layers a: “a” is not a layer number or range."),
    ("1-", "--layers 1-: “1-” is not a layer number or range."),
    ("", "--layers is empty"),
    ("9", "--layers 9: No layer 9: this model has layers 0–3."),
    ("0,-4", "A layer is listed twice."),
])
def test_bad_layers_get_the_viewers_messages(photos, tmp_path, capsys, text, message):
    assert main(["verbalize", str(photos), "--out", str(tmp_path / "o"), *TINY, "--layers", text]) == 2
    assert message in capsys.readouterr().err


def test_layers_are_checked_against_the_config_before_the_model_loads(photos, tmp_path, capsys):
    """coca_ViT-L-14's weights are not here (offline): the layer error comes first, from its config."""
    assert main(["verbalize", str(photos), "--out", str(tmp_path / "o"), "--model", "coca_ViT-L-14",
                 "--layers", "0,24"]) == 2
    err = capsys.readouterr().err
    assert "No layer 24: this model has layers 0–23." in err and "weights" not in err


@pytest.mark.skipif(not any(os.access(os.path.join(p, "node"), os.X_OK) for p in os.environ["PATH"].split(":")),
                    reason="node is not installed")
def test_the_cli_parses_layers_as_the_viewer_does():
    cases = ["0-3, 8, -1", "0-2,-1", "5-3", "a", "1-", "", "all", "9", "-5", "0,-4", "1..3", "2–3", "0;1 2", "-3--1"]
    script = (f"import {{ parseLayers }} from '{(STATIC / 'form.js').as_uri()}';"
              f"console.log(JSON.stringify({json.dumps(cases)}.map((t) => parseLayers(t, 4))));")
    viewer = json.loads(subprocess.run(["node", "--input-type=module", "-e", script], capture_output=True, text=True,
                                       check=True).stdout)
    for text, expected in zip(cases, viewer, strict=True):
        try:
            got = {"layers": parse_layers(text, 4)}
        except ValueError as e:
            got = {"error": str(e)}
        assert got == expected, text


# --- 6. hub ids offline ---

def test_a_hub_model_offline_fails_in_one_look_with_the_copy_advice(photos, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env |= {"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "HF_HOME": str(tmp_path / "hf")}  # nothing listens
    repo = "laion/mscoco_finetuned_CoCa-ViT-B-32-laion2B-s13B-b90k"
    r = subprocess.run([sys.executable, "-m", "latent_verbalizer.services.cli", "verbalize", str(photos), "--out",
                        str(tmp_path / "o"), "--model", f"hf-hub:{repo}", "--layers", "0"], capture_output=True,
                       text=True, timeout=600, env=env)
    assert r.returncode == 2
    assert f"the hub model {repo} (its config and weights) are not in the local cache and the hub cannot be reached" \
           in r.stderr
    assert f"https://huggingface.co/{repo} into one folder and pass --model local-dir:FOLDER" in r.stderr
    assert "Retrying" not in r.stderr and "Traceback" not in r.stderr
    assert f"pretrained=the hub repository's own ({repo}) chosen=the model's default" in r.stderr


def test_the_copy_advice_works_a_local_dir_model_runs(photos, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    save_checkpoint(load_model("coca_tiny").model, folder / "open_clip_model.safetensors")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": open_clip.get_model_config("coca_tiny")}))
    out = tmp_path / "o"
    assert main(["verbalize", str(photos), "--out", str(out), "--model", f"local-dir:{folder}", "--layers", "0,-1",
                 "--seq-len", "6"]) == 0
    line = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    assert [c["layer"] for c in line["layers"]] == [0, 3]


# --- 7. a checkpoint of another architecture ---

def test_a_checkpoint_of_another_architecture_names_its_keys_and_shapes(photos, tmp_path, capsys):
    ckpt = tmp_path / "tiny.safetensors"
    save_checkpoint(load_model("coca_tiny").model, ckpt)
    assert main(["verbalize", str(photos), "--out", str(tmp_path / "o"), "--model", "coca_synth_demo",
                 "--pretrained", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {ckpt} does not match the coca_synth_demo architecture: missing visual.transformer" \
           ".resblocks.4." in err
    assert "other shapes: text.cls_emb [48] where the model has [64]" in err


# --- 8 and 14: random weights said once; open_clip's chatter gone; progress and rates ---

def test_a_random_weight_model_says_so_once_and_progress_has_rates(photos, tmp_path):
    r = cli("verbalize", str(photos), "--out", str(tmp_path / "o"), *FAST)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert sum("coca_tiny has random weights" in line and "captions are noise" in line for line in lines) == 1
    assert not [line for line in lines if " root: " in line]  # open_clip's "Parsing model identifier", ...
    progress = [line for line in lines if "verbalize: progress" in line]
    assert progress and "of=3" in progress[0] and "images_per_s=" in progress[0] and "captions_per_s=" in progress[0]
    done = next(line for line in lines if "verbalize: done" in line)
    assert "images=3" in done and "captions=6" in done and "captions_per_s=" in done


def test_on_a_terminal_verbalize_draws_a_bar(photos, tmp_path):
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # 24 rows, 120 columns
    proc = subprocess.Popen([sys.executable, "-m", "latent_verbalizer.services.cli", "verbalize", str(photos),
                             "--out", str(tmp_path / "o"), *FAST], stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the process closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    assert proc.wait(timeout=600) == 0
    text = seen.decode(errors="replace")
    assert "verbalize: 100%" in text and "3/3" in text and "captions/s" in text


# --- 9. analyze on captions; skipped files ---

def test_analyze_on_captions_says_to_categorize_first(photos, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["verbalize", str(photos), "--out", str(out), *FAST]) == 0
    capsys.readouterr()
    assert main(["analyze", str(out / "captions.json"), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert f"{out / 'captions.json'} holds captions, not labels: label them first with `latent-verbalizer" \
           f" categorize {out / 'captions.json'} --out LABELS.json`" in err


def test_files_skipped_in_an_input_folder_are_counted_and_named(photos, tmp_path, capsys):
    (photos / "scan.bmp").write_bytes(b"BM....")
    (photos / "notes.txt").write_text("x")
    assert main(["verbalize", str(photos), "--out", str(tmp_path / "o"), *FAST]) == 0
    err = capsys.readouterr().err
    assert f"skipped 2 file(s) in {photos} that are not .jpeg/.jpg/.png/.webp images or .tar shards: notes.txt," \
           " scan.bmp" in err
