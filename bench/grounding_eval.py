"""Does grounding tell what a layer reads from the image from what the decoder says anyway? Measured on
the shipped demo model and synthetic scenes, where every object's colour and shape is known.

    python bench/grounding_eval.py --n 200 --seed 2025 --json

Captions every encoder layer of N fresh scenes with grounding on (ranks among the N scenes), then prints
per layer: mean image score, retrieval R@1, share of null-input (prior) captions, CIDEr-D against the
scenes' true captions, and the share of captions naming every object's colour and shape right
(services/demo/scoring.py); then
  final_layer_retrieval_r1   R@1 of the last layer's captions among the N scenes
  correctness_auc            over every caption of every layer: the probability that a right caption
                             scores higher than a wrong one (ties count half; 0.5 = chance)
  spearman_r1_vs_accuracy    across layers: rank correlation of R@1 with colour+shape accuracy
  overhead                   what grounding adds to verbalize's wall time (bench/grounding_overhead.py:
                             coca_ViT-B-32, random weights, 8 images, every layer, --threads threads),
                             the gray image's captions read from disk as by any run after the first
  overhead_cold              the same for the first run of a model/layer set (it decodes them)
Targets: correctness_auc >= 0.85, spearman >= 0.8, final_layer_retrieval_r1 >= 0.6, overhead <= 0.15.
With --json the last line is one JSON object; --out DIR also writes that run's grounding.csv and
grounding.png (the README's docs/grounding.png is --n 200 --seed 2025).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import parse_scene_args, report, scene_parser, targets_met  # noqa: E402
from bench.grounding_overhead import measure, random_items  # noqa: E402
from latent_verbalizer.services.decoder.grounding import RunEmbeddings, with_ranks  # noqa: E402
from latent_verbalizer.services.demo.evaluate import layer_shares, scene_items  # noqa: E402
from latent_verbalizer.services.demo.scoring import score  # noqa: E402
from latent_verbalizer.services.families import load_family  # noqa: E402
from latent_verbalizer.services.pipeline import verbalize  # noqa: E402
from latent_verbalizer.shared.grounding import layer_grounding, write_grounding  # noqa: E402
from latent_verbalizer.shared.schemas import ImageResult  # noqa: E402

TARGETS = {"correctness_auc": 0.85, "spearman_r1_vs_accuracy": 0.8, "final_layer_retrieval_r1": 0.6}


def average_ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            ranks[order[k]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def auc(scores: Sequence[float], positive: Sequence[bool]) -> float | None:
    """Area under the ROC curve (Mann-Whitney U / (n_pos * n_neg)); None when one class is empty."""
    n_pos = sum(positive)
    n_neg = len(positive) - n_pos
    if not n_pos or not n_neg:
        return None
    ranks = average_ranks(scores)
    rank_sum = sum(r for r, p in zip(ranks, positive) if p)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (Pearson on average ranks); None when either side is constant."""
    rx, ry = average_ranks(x), average_ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx, vy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return cov / (vx * vy) ** 0.5 if vx and vy else None


def grounded_run(model: str, pretrained: str, device: str, n: int, seed: int):
    """The scenes' results with grounding and ranks among the n scenes, their truth, and the seconds it took."""
    lm = load_family(model, pretrained, device)
    items, truth = scene_items(seed, n)
    t0 = time.perf_counter()
    embeddings = RunEmbeddings()
    results = list(verbalize(lm, items, grounding=embeddings))
    ranks = embeddings.ranks(gallery=n)
    results = [ImageResult.model_validate_json(with_ranks(r.model_dump_json(exclude_none=True), ranks))
               for r in results]
    return results, truth, time.perf_counter() - t0


def main() -> int:
    p = scene_parser(__doc__.splitlines()[0], seed=2025)  # --n scenes: also the retrieval gallery
    p.add_argument("--threads", type=int, default=2, help="CPU threads (the overhead budget is for 2)")
    p.add_argument("--overhead-repeats", type=int, default=3, help="0: skip the overhead measurement")
    p.add_argument("--out", type=Path, help="also write grounding.csv and grounding.png there (docs/grounding.png)")
    args = parse_scene_args(p)
    torch.set_num_threads(args.threads)

    results, truth, seconds = grounded_run(args.model, args.pretrained, args.device, args.n, args.seed)
    grounding = layer_grounding(results, {i: [scene.caption] for i, scene in truth.items()})
    if args.out:
        write_grounding(grounding, args.out)
    accuracy = {row["layer"]: row["color_shape"] for row in layer_shares(results, truth)}
    layers = [{"layer": g.layer, "image_score": g.image_score, "retrieval_r1": g.retrieval_r1,
               "prior_share": g.prior_share, "ref_cider": g.ref_cider, "color_shape_accuracy": accuracy[g.layer]}
              for g in grounding.layers]
    captions = [(c.image_score, score(c.caption, truth[r.id])["color_shape"]) for r in results for c in r.layers or []]
    figures = {
        "model": f"{args.model}/{args.pretrained}", "n": args.n, "seed": args.seed,
        "layers": [{k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()} for row in layers],
        "final_layer_retrieval_r1": grounding.layers[-1].retrieval_r1,
        "correctness_auc": auc([s for s, _ in captions], [ok for _, ok in captions]),
        "spearman_r1_vs_accuracy": spearman([r["retrieval_r1"] for r in layers],
                                            [r["color_shape_accuracy"] for r in layers]),
        "captions": len(captions), "right_captions": sum(ok for _, ok in captions),
        "metrics": grounding.metrics, "seconds": round(seconds, 2),
    }
    if args.overhead_repeats:
        lm = load_family("coca_ViT-B-32", None, "cpu")  # random weights
        figures["overhead_detail"] = measure(lm, random_items(8), args.overhead_repeats)
        figures["overhead"] = figures["overhead_detail"]["overhead"]
        figures["overhead_cold"] = figures["overhead_detail"]["overhead_cold"]
    figures["targets_met"] = targets_met(figures, TARGETS)
    if not args.json:
        print(f"{'layer':>5} {'score':>7} {'R@1':>6} {'prior':>6} {'CIDEr':>6} {'right':>6}")
        for r in layers:
            print(f"{r['layer']:5d} {r['image_score']:7.3f} {r['retrieval_r1']:6.3f} {r['prior_share']:6.3f}"
                  f" {r['ref_cider']:6.3f} {r['color_shape_accuracy']:6.3f}")
    report(figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
