"""Quality of the shipped demo models on fresh synthetic scenes.

    python bench/demo_quality.py --n 200 --seed 2024 --json

    python bench/demo_quality.py --model llava_synth_demo --n 200 --seed 2024 --json
    LV_RESCALE_LAYERS=1 python bench/demo_quality.py --model llava_synth_demo ...   (the LLaVA option)

Generates N scenes of a seed the training never saw (bench.common.TRAINING_SEEDS), captions every
vision layer through the pipeline (greedy, 30 tokens) and prints, per layer, the share of captions
naming the right colours, the right shapes and the right colour+shape objects (nothing missing, nothing
extra), then the colour+shape accuracy at the model's feature layer (the layer its text side was trained
on: CoCa's last, llava_synth_demo's second-to-last) and at the last layer. With --json the last line is
one JSON object.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import parse_scene_args, scene_parser  # noqa: E402
from latent_verbalizer.services.demo.evaluate import layer_shares, scene_items  # noqa: E402
from latent_verbalizer.services.families import load_family  # noqa: E402
from latent_verbalizer.services.pipeline import verbalize  # noqa: E402


def main() -> int:
    args = parse_scene_args(scene_parser(__doc__.splitlines()[0], seed=2024))
    lm = load_family(args.model, args.pretrained, args.device)
    items, truth = scene_items(args.seed, args.n)
    t0 = time.perf_counter()
    results = list(verbalize(lm, items))
    seconds = time.perf_counter() - t0
    rows = layer_shares(results, truth)
    feature = lm.feature_layer

    def exact(layer: int) -> float:
        return sum(r.layers[layer].caption == truth[r.id].caption for r in results if r.layers) / args.n

    print(f"{'layer':>5} {'colour':>7} {'shape':>7} {'both':>7} {'entropy':>8}")
    for r in rows:
        print(f"{r['layer']:5d} {r['color']:7.3f} {r['shape']:7.3f} {r['color_shape']:7.3f} {r['mean_entropy']:8.3f}")
    for r in results[:3]:
        caption = r.layers[feature].caption if r.layers else r.error
        print(f"truth:         {truth[r.id].caption}\nfeature layer: {caption}")
    info = lm.describe()
    figures = {
        "model": args.model if args.pretrained is None else f"{args.model}/{args.pretrained}", "family": lm.family,
        "prompt": lm.prompt, "rescale_layers": info.get("rescale_layers"), "n": args.n, "seed": args.seed,
        "feature_layer": feature,
        "feature_layer_color_shape_accuracy": rows[feature]["color_shape"],
        "feature_layer_exact_caption": exact(feature),
        "final_layer_color_shape_accuracy": rows[-1]["color_shape"],
        "final_layer_exact_caption": exact(-1),
        "per_layer": [{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in rows],
        "seconds": round(seconds, 2),
    }
    if args.json:
        import json

        print(json.dumps(figures))
    else:
        print(f"feature layer {feature}: colour+shape {rows[feature]['color_shape']:.3f}, exact {exact(feature):.3f};"
              f" last layer: colour+shape {rows[-1]['color_shape']:.3f}, exact {exact(-1):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
