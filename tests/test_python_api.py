"""The Python API as a notebook user meets it: the README's example as written, the flat table, the one
import package an install adds, and the quickstart notebook executed end to end."""

import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from latent_verbalizer.services.demo.synth import write_dataset

ROOT = Path(__file__).resolve().parents[1]


def readme_python_example() -> str:
    section = (ROOT / "README.md").read_text().split("## From Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_runs_as_written(tmp_path):
    """In a fresh process, in a folder where `make demo` left its scenes, the README's code runs unchanged;
    then its objects are what it says they are."""
    write_dataset(tmp_path / "runs" / "demo" / "images", 2, 7)
    check = """
from latent_verbalizer.shared.schemas import ImageResult
assert len(run.results) == 2 and all(isinstance(r, ImageResult) for r in run.results)
df = run.to_pandas()
assert len(df) == 2 * 3 and sorted(set(df.layer)) == [0, 3, 5]
assert df.image_score.notna().all() and df.prior.notna().all() and set(df.retrieval_rank) <= {1, 2}
import matplotlib.figure
assert isinstance(report.figure(), matplotlib.figure.Figure)
assert sorted(labels.layers) == [0, 3, 5]
print("OK")
"""
    done = subprocess.run([sys.executable, "-c", readme_python_example() + check], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("OK"), done.stderr[-3000:]
    saved = tmp_path / "runs" / "x"
    assert {"results.jsonl", "captions.json", "captions.csv", "run.json", "prior.json"} <= {p.name for p in
                                                                                          saved.iterdir()}
    assert json.loads((saved / "run.json").read_text())["model"] == "coca_synth_demo"


def test_paths_images_arrays_and_tensors_go_in(tmp_path):
    import numpy as np
    import torch
    from PIL import Image

    import latent_verbalizer as lv

    write_dataset(tmp_path, 1, 7)
    path = next(tmp_path.glob("*.png"))
    pil = Image.open(path).convert("RGB")
    array = np.array(pil)
    tensor = torch.from_numpy(array).permute(2, 0, 1).float() / 255
    model = lv.load("coca_synth_demo")
    run = model.verbalize([path, pil, array, tensor], layers="4-5", grounding=False)
    captions = [[c.caption for c in r.layers] for r in run.results]
    assert captions[0] == captions[1] == captions[2]  # the same pixels, however they came
    assert len(captions[3]) == 2  # a float tensor goes through 8-bit rounding: captioned, not compared
    assert [r.id for r in run.results][1:] == ["image_1", "image_2", "image_3"]
    with pytest.raises(ValueError, match="layer"):
        model.verbalize([path], layers=[9])
    with pytest.raises(TypeError, match="not an image"):
        model.verbalize([3.5])
    out = run.save(tmp_path / "run")
    with pytest.raises(ValueError, match="--overwrite"):
        run.save(out)  # a folder holding a run is not replaced unless asked
    assert lv.Run(out).captions(5)[path.stem] == captions[0][1]


def test_an_install_adds_one_import_package(tmp_path):
    """The wheel holds latent_verbalizer (with services and shared inside it) and no other top-level name; a
    fresh virtual environment with it (and no dependencies) imports it and finds no `shared` or `services`."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                    str(tmp_path / "dist"), str(ROOT)], check=True, capture_output=True, timeout=600)
    wheel = next((tmp_path / "dist").glob("latent_verbalizer-*.whl"))
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"latent_verbalizer"}, tops
    assert any(n.startswith("latent_verbalizer/shared/weights/") for n in zipfile.ZipFile(wheel).namelist())
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True)
    site = next((tmp_path / "venv" / "lib").glob("python3.*/site-packages"))
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)  # what pip install --no-deps puts there
    probe = ("import importlib.util, latent_verbalizer; print(latent_verbalizer.__file__);"
             " print(importlib.util.find_spec('shared'), importlib.util.find_spec('services'))")
    done = subprocess.run([str(tmp_path / "venv" / "bin" / "python"), "-c", probe], cwd=tmp_path,
                          capture_output=True, text=True, check=True)
    where, specs = done.stdout.splitlines()
    assert where.startswith(str(site)) and specs == "None None"


def test_quickstart_notebook_executes(tmp_path):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(ROOT / "examples" / "quickstart.ipynb", as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
                   ).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert (tmp_path / "runs" / "quickstart" / "captions.csv").is_file()
    assert (tmp_path / "compare" / "grounding.png").is_file()
