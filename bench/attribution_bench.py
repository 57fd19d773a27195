"""What word -> patch attributions cost `verbalize` (issue 15's attribution_slowdown), and which of the
decoder's layers their cross-attention is best averaged over (the choice services/decoder/attribution.py
documents).

slowdown: each repeat runs the in-process pipeline on the same images, every layer, default decoding, no
grounding, without and with attributions (the order alternating; the maps written to a temporary directory);
slowdown = median(with) / median(without) - 1. Models: the demo model (on its synthetic scenes) and
coca_ViT-B-32 with random weights (on random-noise 256x256 images). `measure(lm, items)` is what
bench/spatial_eval.py calls.

--layers-choice: on the demo model's synthetic scenes (two or three objects), the pointing game
(services.demo.spatial) of the last vision layer's whole-image captions, with the decoder's cross-attention
averaged over all its layers, its last layer, its last half and its first layer. Each decoder layer's weights
come from open_clip's own modules (tests/open_clip_reference.py, the tests' reference) on the teacher-forced
caption.

    python bench/attribution_bench.py --json                     # the slowdown, both models, 8 images
    python bench/attribution_bench.py --layers-choice --n 60     # the averaging choice
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import base_parser, device_name, report  # noqa: E402
from bench.grounding_overhead import random_items  # noqa: E402
from latent_verbalizer.services.demo.evaluate import scene_items  # noqa: E402
from latent_verbalizer.services.demo.spatial import pointing_hits  # noqa: E402
from latent_verbalizer.services.encoder.regions import input_box  # noqa: E402
from latent_verbalizer.services.families import Family, load_family  # noqa: E402
from latent_verbalizer.services.pipeline import verbalize  # noqa: E402
from latent_verbalizer.shared.images import ImageItem, decode_image  # noqa: E402
from latent_verbalizer.shared.settings import DEMO_MODEL, DEMO_PRETRAINED  # noqa: E402
from tests import open_clip_reference as reference  # noqa: E402

SCENE_SEED = 2026  # not a training seed (bench.common.TRAINING_SEEDS)


def measure(lm: Family, items: list[ImageItem], repeats: int = 3) -> dict:
    """Median wall seconds of verbalize on `items` (every layer, default decoding, no grounding) without and
    with attributions, the slowdown ratio and every run's seconds."""

    def run(attributions: bool) -> float:
        with tempfile.TemporaryDirectory(prefix="lv-attributions-") as tmp:
            t0 = time.perf_counter()
            results = list(verbalize(lm, items, batch_size=len(items),
                                     attributions_dir=Path(tmp) if attributions else None))
            seconds = time.perf_counter() - t0
        assert all(r.layers for r in results)
        return seconds

    run(False), run(True)  # warm-up: weight views, allocator
    times: dict[bool, list[float]] = {False: [], True: []}
    for i in range(repeats):
        for attributions in ((False, True) if i % 2 == 0 else (True, False)):
            times[attributions].append(run(attributions))
    without, with_ = statistics.median(times[False]), statistics.median(times[True])
    return {"seconds_without": round(without, 3), "seconds_with": round(with_, 3),
            "slowdown": round(with_ / without - 1, 4),
            "runs": {"without": [round(t, 3) for t in times[False]], "with": [round(t, 3) for t in times[True]]}}


def slowdown(images: int = 8, repeats: int = 3, device: str = "cpu") -> dict:
    """attribution_slowdown on both models: {"demo": measure(...), "coca_ViT-B-32": measure(...)}."""
    demo = load_family(DEMO_MODEL, DEMO_PRETRAINED, device)
    b32 = load_family("coca_ViT-B-32", None, device)
    return {"demo": measure(demo, scene_items(SCENE_SEED, images)[0], repeats),
            "coca_ViT-B-32": measure(b32, random_items(images), repeats),
            "images": images, "device": device_name(demo.device)}


def layers_choice(n: int, device: str = "cpu") -> dict:
    """Pointing game of the last vision layer's captions per decoder-layer average (module docstring)."""
    lm = load_family(DEMO_MODEL, DEMO_PRETRAINED, device)
    visual, last = lm.model.visual, lm.num_layers - 1
    depth = len(lm.model.text_decoder.cross_attn)
    choices = {"all": slice(None), "last": slice(depth - 1, None), "last_half": slice(depth // 2, None),
               "first": slice(0, 1)}
    hits: dict[str, list[bool]] = {name: [] for name in choices}
    items, truth = scene_items(SCENE_SEED, n, min_objects=2)
    for item, result in zip(items, verbalize(lm, items, [last])):
        image = decode_image(item.data)
        tokens = result.layers[0].tokens
        image_tokens, pool_weights = reference.pooler_weights(visual, lm.preprocess(image)[None].to(lm.device), last)
        per_layer = reference.cross_attention(lm.model, image_tokens, tokens, lm.start_id)  # [layers, S, Q-1]
        pieces = [lm.tokenizer.decode([t]) for t in tokens]
        box = input_box(lm.preprocess, *image.size)
        for name, layers in choices.items():
            maps = reference.maps(pool_weights, per_layer[layers].mean(0), tuple(visual.grid_size)).cpu().numpy()
            hits[name] += pointing_hits(pieces, maps, truth[item.id], box)
    return {"pointing_game": {k: round(float(np.mean(v)), 4) if v else None for k, v in hits.items()},
            "words": len(hits["all"]), "scenes": n, "decoder_layers": depth, "vision_layer": last}


def main() -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=8, help="images per verbalize run (slowdown)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--layers-choice", action="store_true", help="measure the decoder-layer averaging instead")
    p.add_argument("--n", type=int, default=60, help="scenes for --layers-choice")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.layers_choice:
        figures = layers_choice(args.n, args.device)
    else:
        figures = slowdown(args.images, args.repeats, args.device)
        figures["attribution_slowdown"] = {k: figures[k]["slowdown"] for k in ("demo", "coca_ViT-B-32")}
    report(figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
