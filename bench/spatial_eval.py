"""Where: does a region's caption speak for the object in it, and does a word's heatmap point at the object
the word names? Measured on the shipped demo model and synthetic scenes whose objects' places are known.

    python bench/spatial_eval.py --n 200 --seed 2025 --json

Takes the first N scenes of the seed with two or three objects and verbalizes every layer of each, the
whole image with word -> patch attributions and one region per object (its box grown 20% about its
centre, clipped to the image; class token excluded). Prints per layer, and for the last layer:
  region_color_shape_accuracy  over all objects: the region's caption names the object's colour and shape
                               and no other object's (services/demo/scoring.py `region_score`)
  pointing_game                over every colour or shape word of the whole image's caption that matches
                               exactly one object of the scene: the word's heatmap peaks on a patch in that
                               object's box, one patch of slack (services/demo/spatial.py)
  attribution_slowdown         what attributions add to verbalize's wall time, per model
                               (bench/attribution_bench.py: the demo model and coca_ViT-B-32, 8 images)
and per layer what a miss looks like: region_names_own (the object's colour and shape named, whatever
else), region_names_other (another object's named) and region_names_only_it (the object and nothing else,
once: the demo model, trained on whole scenes only, tends to describe a lone object as several).
Targets: region_color_shape_accuracy >= 0.8 and pointing_game >= 0.7 at the last layer.
With --json the last line is one JSON object.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.attribution_bench import slowdown  # noqa: E402
from bench.common import parse_scene_args, report, scene_parser, targets_met  # noqa: E402
from latent_verbalizer.services.demo.evaluate import scene_items  # noqa: E402
from latent_verbalizer.services.demo.scoring import region_score  # noqa: E402
from latent_verbalizer.services.demo.spatial import object_box, pointing_hits  # noqa: E402
from latent_verbalizer.services.demo.synth import Scene  # noqa: E402
from latent_verbalizer.services.families import load_family  # noqa: E402
from latent_verbalizer.services.pipeline import verbalize  # noqa: E402
from latent_verbalizer.shared.attributions import Attributions, attribution_path, map_key, read_attributions  # noqa: E402
from latent_verbalizer.shared.regions import Region  # noqa: E402
from latent_verbalizer.shared.schemas import ImageResult  # noqa: E402

TARGETS = {"region_color_shape_accuracy": 0.8, "pointing_game": 0.7}
REGION_SCALE = 1.2  # each object's box grown 20% about its centre


def object_regions(scene: Scene) -> list[Region]:
    """One region per object, left to right: its box grown REGION_SCALE times, clipped to the image."""
    return [Region(x0=x0, y0=y0, x1=x1, y1=y1, units="px", label=f"object_{k}")
            for k, (x0, y0, x1, y1) in enumerate(object_box(o, REGION_SCALE) for o in scene.objects)]


def scene_verdicts(result: ImageResult, scene: Scene, attributions: Attributions) -> dict[int, dict[str, list[bool]]]:
    """Per layer: "pointing", the pointing game's hits on the whole image's caption, and per object its
    region caption's `region_score` verdicts ("right", "own", "other", "single")."""
    out: dict[int, dict[str, list[bool]]] = {}
    for caption in result.layers or []:
        key = map_key(caption.layer)
        heatmaps = attributions.maps[key].astype(np.float32)  # [S, gh, gw]
        hits = pointing_hits(attributions.tokens[key], heatmaps, scene, attributions.input_box)
        out[caption.layer] = {"pointing": hits, "right": [], "own": [], "other": [], "single": []}
    for obj, region in zip(scene.objects, result.regions or []):
        for caption in region.layers:
            for k, ok in region_score(caption.caption, obj, scene).items():
                out[caption.layer][k].append(ok)
    return out


def share(values: list[bool]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def main() -> int:
    p = scene_parser(__doc__.splitlines()[0], seed=2025)
    p.add_argument("--threads", type=int, default=1, help="CPU threads for the scenes (one image per call: more"
                                                          " threads only add synchronisation)")
    p.add_argument("--slowdown-repeats", type=int, default=3, help="0: skip measuring attribution_slowdown")
    p.add_argument("--slowdown-threads", type=int, default=2, help="CPU threads while measuring it")
    args = parse_scene_args(p)
    torch.set_num_threads(args.threads)
    lm = load_family(args.model, args.pretrained, args.device)
    items, truth = scene_items(args.seed, args.n, min_objects=2)
    per_layer: dict[int, dict[str, list[bool]]] = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for item in items:  # each scene its own regions
            scene = truth[item.id]
            (result,) = verbalize(lm, [item], regions=object_regions(scene), attributions_dir=Path(tmp))
            if result.error:
                raise SystemExit(f"{item.id}: {result.error}")
            attributions = read_attributions(attribution_path(Path(tmp), item.id))
            for layer, verdicts in scene_verdicts(result, scene, attributions).items():
                row = per_layer.setdefault(layer, {k: [] for k in verdicts})
                for k, oks in verdicts.items():
                    row[k] += oks
    seconds = time.perf_counter() - t0
    layers = [{"layer": layer, "region_color_shape_accuracy": share(row["right"]),
               "region_names_own": share(row["own"]), "region_names_other": share(row["other"]),
               "region_names_only_it": share(row["single"]),
               "pointing_game": share(row["pointing"]), "pointing_words": len(row["pointing"])}
              for layer, row in sorted(per_layer.items())]
    last = layers[-1]
    figures = {
        "model": f"{args.model}/{args.pretrained}", "n": args.n, "seed": args.seed, "threads": args.threads,
        "objects": sum(len(truth[i.id].objects) for i in items),
        "region_color_shape_accuracy": last["region_color_shape_accuracy"],
        "pointing_game": last["pointing_game"],
        "layers": layers,
        "seconds": round(seconds, 2),
    }
    if args.slowdown_repeats:  # bench/attribution_bench.py: the demo model and coca_ViT-B-32, 8 images each
        torch.set_num_threads(args.slowdown_threads)
        detail = slowdown(repeats=args.slowdown_repeats, device=args.device)
        figures["attribution_slowdown"] = {k: detail[k]["slowdown"] for k in ("demo", "coca_ViT-B-32")}
        figures["attribution_slowdown_detail"] = detail
    figures["targets_met"] = targets_met(figures, TARGETS)
    if not args.json:
        print(f"{'layer':>5} {'region':>7} {'own':>6} {'other':>6} {'only':>6} {'pointing':>9} {'words':>6}")
        for r in layers:
            print(f"{r['layer']:5d} {r['region_color_shape_accuracy']:7.3f} {r['region_names_own']:6.3f}"
                  f" {r['region_names_other']:6.3f} {r['region_names_only_it']:6.3f} {r['pointing_game'] or 0:9.3f}"
                  f" {r['pointing_words']:6d}")
    report(figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
