"""The README's pictures of region captions and word heatmaps, from the shipped demo model.

    python bench/spatial_figures.py --seed 2025 --out docs

Takes the first scene of the seed with three objects of three colours, verbalizes every layer of it with
attributions and one region per object (as bench/spatial_eval.py does), and draws
  region_ladder.png  the image with object --object's region box, and per layer the whole image's caption
                     beside that region's
  word_heatmap.png   the image, then per colour word of the last layer's caption its heatmap over the image
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.spatial_eval import object_regions  # noqa: E402
from latent_verbalizer.services.demo.evaluate import scene_items  # noqa: E402
from latent_verbalizer.services.demo.spatial import caption_words  # noqa: E402
from latent_verbalizer.services.demo.synth import COLORS, IMAGE_SIZE, Scene  # noqa: E402
from latent_verbalizer.services.families import load_family  # noqa: E402
from latent_verbalizer.services.pipeline import verbalize  # noqa: E402
from latent_verbalizer.shared.attributions import Attributions, attribution_path, map_key, read_attributions  # noqa: E402
from latent_verbalizer.shared.images import ImageItem  # noqa: E402
from latent_verbalizer.shared.schemas import ImageResult  # noqa: E402
from latent_verbalizer.shared.settings import DEMO_MODEL, DEMO_PRETRAINED  # noqa: E402


def three_colour_scene(seed: int) -> tuple[ImageItem, Scene]:
    """The first scene of `seed` with three objects of three different colours (among its first 100
    three-object scenes: about half of them are)."""
    items, truth = scene_items(seed, 100, min_objects=3)
    item = next(i for i in items if len({o.color for o in truth[i.id].objects}) == 3)
    return item, truth[item.id]


def show_image(ax: plt.Axes, item: ImageItem) -> None:
    ax.imshow(np.asarray(Image.open(io.BytesIO(item.data)).convert("RGB")), extent=(0, IMAGE_SIZE, IMAGE_SIZE, 0),
              interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def region_ladder(result: ImageResult, item: ImageItem, k: int, out: Path) -> None:
    """The image with region k's box, and per layer the whole image's caption beside region k's."""
    region = result.regions[k]
    fig = plt.figure(figsize=(10, 4.4), dpi=100)
    ax = fig.add_axes((0.01, 0.2, 0.22, 0.6))
    show_image(ax, item)
    x0, y0, x1, y1 = region.box
    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="black", linewidth=1.5, linestyle="--"))
    ax.set_title(f"region {k}: {region.patches} patches", fontsize=9)
    table = fig.add_axes((0.25, 0.02, 0.74, 0.96))
    table.axis("off")
    rows = [("layer", "whole image", f"region {k}")] + [
        (str(w.layer), w.caption, r.caption) for w, r in zip(result.layers, region.layers)]
    for i, (layer, whole, part) in enumerate(rows):
        y = 1 - (i + 0.5) / len(rows)
        weight = "bold" if i == 0 else "normal"
        table.text(0.0, y, layer, fontsize=8.5, va="center", weight=weight)
        for x, text in ((0.075, whole), (0.54, part)):
            table.text(x, y, textwrap.fill(text, 50), fontsize=8.5, va="center", weight=weight, linespacing=1.3)
    fig.savefig(out)
    plt.close(fig)


def word_heatmaps(result: ImageResult, item: ImageItem, attributions: Attributions, out: Path) -> None:
    """The image, then each colour word of the last layer's caption: its map (its tokens' mean) over the image."""
    last = result.layers[-1]
    key = map_key(last.layer)
    words = [(w, positions) for w, positions in caption_words(attributions.tokens[key]) if w in COLORS]
    heat = attributions.maps[key].astype(np.float32)  # [S, gh, gw]
    x0, y0, x1, y1 = attributions.input_box
    fig, axes = plt.subplots(1, 1 + len(words), figsize=(2.2 * (1 + len(words)), 2.8), dpi=100)
    show_image(axes[0], item)
    axes[0].set_title("image", fontsize=9)
    for ax, (word, positions) in zip(axes[1:], words):
        show_image(ax, item)
        ax.imshow(heat[positions].mean(0), extent=(x0, x1, y1, y0), cmap="inferno", alpha=0.6,
                  interpolation="nearest")
        ax.set_title(f'"{word}"', fontsize=9)
    fig.suptitle(textwrap.fill(f'layer {last.layer}: "{last.caption}"', 100), fontsize=9)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=2025)
    p.add_argument("--object", type=int, default=1, help="which object's region ladder (0: leftmost)")
    p.add_argument("--out", type=Path, default=Path("docs"))
    p.add_argument("--model", default=DEMO_MODEL)
    p.add_argument("--pretrained", default=DEMO_PRETRAINED)
    args = p.parse_args()
    lm = load_family(args.model, args.pretrained, "cpu")
    item, scene = three_colour_scene(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        (result,) = verbalize(lm, [item], regions=object_regions(scene), attributions_dir=Path(tmp))
        region_ladder(result, item, args.object, args.out / "region_ladder.png")
        attributions = read_attributions(attribution_path(Path(tmp), item.id))
        word_heatmaps(result, item, attributions, args.out / "word_heatmap.png")
    print(f"{item.id}: {scene.caption} -> {args.out}/region_ladder.png, {args.out}/word_heatmap.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
