"""`latent-verbalizer verbalize` end to end: files, directories, shards, and bad images."""

import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from latent_verbalizer.services.cli import main
from latent_verbalizer.shared.images import ImageError, decode_image, iter_items

TINY = ["--model", "coca_tiny", "--pretrained", "none", "--device", "cpu"]


def png_bytes(seed: int, size=(40, 30), fmt="PNG") -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 255, (*size[::-1], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture()
def image_dir(tmp_path):
    d = tmp_path / "images"
    (d / "sub").mkdir(parents=True)
    (d / "a.png").write_bytes(png_bytes(0))
    (d / "b.jpg").write_bytes(png_bytes(1, fmt="JPEG"))
    (d / "sub" / "c.webp").write_bytes(png_bytes(2, fmt="WEBP"))
    (d / "broken.jpg").write_bytes(png_bytes(3, size=(200, 200), fmt="JPEG")[:700])  # truncated
    (d / "notes.txt").write_text("not an image, not an image extension: skipped")
    return d


def read_results(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_directory_with_one_corrupt_file(image_dir, tmp_path):
    out = tmp_path / "out"
    assert main(["verbalize", str(image_dir), "--out", str(out), *TINY]) == 0
    results = {r["id"]: r for r in read_results(out)}
    assert sorted(results) == ["a", "b", "broken", "sub/c"]
    assert "corrupt jpeg image" in results["broken"]["error"]
    assert "layers" not in results["broken"]
    for rid in ("a", "b", "sub/c"):
        r = results[rid]
        assert "error" not in r and r["source"].endswith(("a.png", "b.jpg", "c.webp"))
        assert [c["layer"] for c in r["layers"]] == [0, 1, 2, 3]
        for c in r["layers"]:
            assert c["caption"] and c["tokens"] and len(c["entropy"]) >= 1
            assert c["mean_entropy"] == pytest.approx(sum(c["entropy"]) / len(c["entropy"]))
    captions = json.loads((out / "captions.json").read_text())
    assert sorted(captions) == ["layer_0", "layer_1", "layer_2", "layer_3"]
    assert all(len(v) == 3 for v in captions.values())
    assert captions["layer_2"][0] == results["a"]["layers"][2]["caption"]


def test_shard_with_metadata_layers_and_features(tmp_path):
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in [("k1.jpg", png_bytes(4, fmt="JPEG")), ("k1.json", b'{"caption": "x"}'),
                           ("k2.png", png_bytes(5)), ("k2.txt", b"hello"), ("k3.png", b"")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "out"
    assert main(["verbalize", str(shard), "--out", str(out), "--layers", "0,-1", "--save-features",
                 "--batch-size", "2", *TINY]) == 0
    r1, r2, r3 = read_results(out)
    assert (r1["id"], r1["meta"]) == ("k1", {"json": {"caption": "x"}})
    assert r2["meta"] == {"txt": "hello"}
    assert [c["layer"] for c in r1["layers"]] == [0, 3]
    assert r3["error"] == "empty file (0 bytes)"
    from safetensors.torch import load_file

    feats = load_file(str(out / "features" / "k1.safetensors"))
    assert sorted(feats) == ["block_0", "block_3"] and feats["block_0"].shape == (17, 64)


def test_console_script(image_dir, tmp_path):
    ok = subprocess.run([sys.executable, "-m", "latent_verbalizer.services.cli", "verbalize", str(image_dir / "a.png"),
                         "--out", str(tmp_path / "o"), "--layers", "3", *TINY], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert len(read_results(tmp_path / "o")) == 1


@pytest.mark.parametrize("args,message", [
    (["--layers", "9"], "No layer 9: this model has layers 0–3."),
    (["--seq-len", "3", "--min-seq-len", "3"], "must be smaller than seq_len"),
    (["--model", "ViT-B-32"], "needs a multimodal text decoder"),
])
def test_bad_options_are_named(image_dir, tmp_path, capsys, args, message):
    assert main(["verbalize", str(image_dir), "--out", str(tmp_path / "x"), *TINY, *args]) == 2
    assert message in capsys.readouterr().err


def test_missing_input_is_named(tmp_path, capsys):
    assert main(["verbalize", "/no/such/dir", "--out", str(tmp_path / "y"), *TINY]) == 2
    assert "input not found: /no/such/dir" in capsys.readouterr().err


@pytest.mark.parametrize("data,reason", [
    (b"", "empty file"),
    (b"GIF89a....", "not a JPEG, PNG or WebP"),
    (png_bytes(6)[:60], "corrupt png"),
])
def test_decode_image_names_the_problem(data, reason):
    with pytest.raises(ImageError, match=reason):
        decode_image(data)


def test_decompression_bomb_is_refused():
    with pytest.raises(ImageError, match="too large"):
        decode_image(png_bytes(7, size=(300, 300)), max_pixels=10_000)


def test_duplicate_ids_are_made_unique(tmp_path):
    for d in ("x", "y"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "img.png").write_bytes(png_bytes(8))
    ids = [i.id for i in iter_items([tmp_path / "x", tmp_path / "y"])]
    assert ids == ["img", "img-2"]
