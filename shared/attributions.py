"""Word -> patch attribution files (services.decoder.attribution makes the maps): one safetensors file
per image, `attributions/<image id>.safetensors` beside results.jsonl.

    layer_<i>               fp16 [S, gh, gw]  the whole image's caption at vision layer i: row s is
                                              generated token s's map over the layer's patch grid
                                              (S tokens in the order of LayerCaption.tokens, end
                                              token excluded); each row sums to 1
    region_<k>.layer_<i>    fp16 [S, gh, gw]  the same for region k's caption (k: its index in the
                                              image's `regions`)
    metadata  grid       "gh,gw"
              input_box  "x0,y0,x1,y1"  the part of the image, in its own pixels, that the model's
                                        input (and so the grid) shows
              method     how the maps were made, in words
              tokens     JSON {key: [text of each token, as the tokenizer decodes it alone]}

Read one back with `read_attributions(path)` (numpy only: no torch needed):

    a = read_attributions("runs/mine/attributions/cat.safetensors")
    a.map(layer=11)            # [S, gh, gw] float16 (a.layers[11] too); a.map(11, region=0)
    a.tokens[map_key(11)]      # ["a ", "red ", "circle "]
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save

from latent_verbalizer.shared.artifacts import write_atomic


def map_key(layer: int, region: int | None = None) -> str:
    """The tensor name of a caption's maps: layer_<i>, or region_<k>.layer_<i> for region k."""
    return f"layer_{layer}" if region is None else f"region_{region}.layer_{layer}"


def attribution_path(directory: Path, image_id: str) -> Path:
    """Where an image's file lives under `directory`. An id's "/" makes a subfolder (ids of images in
    folders and shards hold them); an empty, "." or ".." part of it becomes "_", so no id leads outside."""
    parts = [part if part not in ("", ".", "..") else "_" for part in image_id.split("/")]
    return directory.joinpath(*parts[:-1], f"{parts[-1]}.safetensors")


@dataclass(frozen=True)
class Attributions:
    """One image's word -> patch maps: what `write_attributions` writes and `read_attributions` returns."""

    grid: tuple[int, int]  # (gh, gw)
    input_box: tuple[float, float, float, float]  # x0, y0, x1, y1 in the image's own pixels
    method: str
    maps: dict[str, np.ndarray]  # key (`map_key`) -> [S, gh, gw] float16, each row summing to 1
    tokens: dict[str, list[str]]  # key -> the S tokens' texts

    @property
    def layers(self) -> dict[int, np.ndarray]:
        """The whole image's maps by layer: {i: [S, gh, gw]}."""
        return {int(k.removeprefix("layer_")): v for k, v in self.maps.items() if k.startswith("layer_")}

    def map(self, layer: int, region: int | None = None) -> np.ndarray:
        """The maps [S, gh, gw] of the caption at `layer` (of region `region`); KeyError names what exists."""
        key = map_key(layer, region)
        if key not in self.maps:
            raise KeyError(f"no maps for {key}; this file holds {sorted(self.maps)}")
        return self.maps[key]


def write_attributions(path: Path, a: Attributions) -> None:
    """Write one image's maps (fp16) and metadata, atomically."""
    for key, heat in a.maps.items():
        if heat.shape != (len(a.tokens[key]), *a.grid):
            raise ValueError(f"{key}: maps {heat.shape} for {len(a.tokens[key])} tokens on a {a.grid} grid")
    metadata = {
        "grid": f"{a.grid[0]},{a.grid[1]}",
        "input_box": ",".join(str(float(v)) for v in a.input_box),
        "method": a.method,
        "tokens": json.dumps(a.tokens),
    }
    arrays = {key: np.ascontiguousarray(heat, dtype=np.float16) for key, heat in a.maps.items()}
    write_atomic(path, save(arrays, metadata=metadata))


def read_attributions(path: str | Path) -> Attributions:
    """Read a file `write_attributions` wrote."""
    with safe_open(str(path), "np") as f:
        meta = f.metadata()
        maps = {key: f.get_tensor(key) for key in f.keys()}
    gh, gw = (int(v) for v in meta["grid"].split(","))
    x0, y0, x1, y1 = (float(v) for v in meta["input_box"].split(","))
    return Attributions((gh, gw), (x0, y0, x1, y1), meta["method"], maps, json.loads(meta["tokens"]))
