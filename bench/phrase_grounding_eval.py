"""Does likelihood grounding (PMI against the gray null image) tell the words and phrases a layer reads from
the image from those the decoder says anyway? Measured on the shipped demo model and synthetic scenes,
where every object's colour and shape is known (issue 22).

    python bench/phrase_grounding_eval.py --n 200 --seed 2026 --json
    python bench/phrase_grounding_eval.py --tune 12 13 --n 100      # how TAU was chosen (not on --seed)

Captions every encoder layer of N fresh scenes with grounding on, labels the captions' phrases with the
embedded labeler and gives each phrase its PMI (shared/pmi.py), then prints
  phrase_auc                 over every phrase of every layer that names an object (a shape word, with or
                             without a colour) or a background: how well its PMI separates phrases true of
                             the scene (an object of that colour and shape; that background) from false
                             ones (probability that a true phrase scores higher; ties half; 0.5 = chance).
                             Phrases naming neither (relations such as "left of") have no truth and are out
  word_auc                   the same for colour and shape words: true if some object has that colour or shape
  layers                     per layer: supported_share (share of those phrases with pmi > tau), true_share,
                             and the captions' mean supported_share (of content words)
  spearman_supported_vs_true across layers: rank correlation of supported_share with true_share
  contrastive                the same AUCs with the contrastive null instead of the gray image: each caption
                             scored under K other scenes' latents at its layer, the null likelihood their mean
  untempered                 the same AUCs of the gray null's PMI at temperature 1, not pmi.TEMPERATURE
  likelihood                 the same AUCs of ln p(token | prefix, image) alone (no null): what the null adds
  overhead                   what PMI adds to verbalize's wall time: coca_ViT-B-32, random weights, 8 images,
                             every layer, --threads threads, grounding on; the seconds spent in PMI (the null
                             input's scoring and the per-word values) over the rest of the same runs
All of grounding (PMI included) against --no-grounding: bench/grounding_overhead.py.
Targets: phrase_auc >= 0.85, word_auc >= 0.85, spearman >= 0.8, overhead <= 0.15.
--tune SEED...: on those seeds' scenes, the tau that best separates true from false phrases (Youden's J:
true positive rate minus false positive rate) and the figures at the shipped TAU. --out DIR: also the
run's analysis files (README's docs/figure_supported.png is --n 200 --seed 2026's figure_supported.png).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import TRAINING_SEEDS, parse_scene_args, report, scene_parser, targets_met  # noqa: E402
from bench.grounding_eval import auc, spearman  # noqa: E402
from bench.grounding_overhead import random_items  # noqa: E402
from latent_verbalizer.services.categorizer.analysis import analyze  # noqa: E402
from latent_verbalizer.services.categorizer.models import CaptionLabels  # noqa: E402
from latent_verbalizer.services.categorizer.report import write_report  # noqa: E402
from latent_verbalizer.services.categorizer.stage import categorize_layers, make_labeler  # noqa: E402
from latent_verbalizer.services.decoder import grounding  # noqa: E402
from latent_verbalizer.services.decoder.grounding import RunEmbeddings  # noqa: E402
from latent_verbalizer.services.decoder.stage import layer_rows  # noqa: E402
from latent_verbalizer.services.demo.evaluate import scene_items  # noqa: E402
from latent_verbalizer.services.demo.synth import BACKGROUNDS, COLORS, SHAPES, Scene  # noqa: E402
from latent_verbalizer.services.encoder.stage import load_pixels  # noqa: E402
from latent_verbalizer.services.families import Family, load_family  # noqa: E402
from latent_verbalizer.services.pipeline import verbalize  # noqa: E402
from latent_verbalizer.shared import pmi  # noqa: E402
from latent_verbalizer.shared.schemas import ImageResult  # noqa: E402

TARGETS = {"phrase_auc": 0.85, "word_auc": 0.85, "spearman_supported_vs_true": 0.8}
CONTRASTIVE_K = 4


def phrase_truth(text: str, scene: Scene) -> bool | None:
    """True/False when the phrase names an object (shape word, maybe a colour) or a background; None otherwise."""
    words = [pmi.normal(w) for w in text.split()]
    shapes = [w for w in words if w in SHAPES]
    colors = [w for w in words if w in COLORS]
    if shapes:
        return any(o.shape == shapes[-1] and (not colors or o.color == colors[-1]) for o in scene.objects)
    if "background" in words:
        named = [w for w in words if w in BACKGROUNDS]
        return bool(named) and named[-1] == scene.background
    return None


def word_truth(word: str, scene: Scene) -> bool | None:
    w = pmi.normal(word)
    if w in COLORS:
        return any(o.color == w for o in scene.objects)
    if w in SHAPES:
        return any(o.shape == w for o in scene.objects)
    return None


def labelled(results: list[ImageResult]) -> dict[int, list[CaptionLabels]]:
    """Every caption's phrases (embedded labeler) with their PMI, per layer, in the results' image order."""
    captions = {c.layer: [] for c in results[0].layers}
    for r in results:
        for c in r.layers:
            captions[c.layer].append(c.caption)
    labels = categorize_layers(captions, make_labeler("embedded"))
    word_pmi = {layer: [r.layers[i].word_pmi for r in results] for i, layer in enumerate(captions)}
    return {layer: [cl.grounded(w) for cl, w in zip(labels[layer], word_pmi[layer])] for layer in labels}


def evaluate(results: list[ImageResult], truth: dict[str, Scene], labels: dict[int, list[CaptionLabels]],
             tau: float) -> dict:
    phrases, words, layers = [], [], []
    for i, (layer, captions) in enumerate(labels.items()):
        rows = []
        for r, cl in zip(results, captions):
            for p in cl.phrases:
                if p.pmi is not None and (ok := phrase_truth(p.text, truth[r.id])) is not None:
                    rows.append((p.pmi, ok))
            c = r.layers[i]
            for w, v in zip(pmi.caption_words(c.caption), c.word_pmi or []):
                if (ok := word_truth(w, truth[r.id])) is not None:
                    words.append((v, ok))
        phrases += rows
        shares = [r.layers[i].supported_share for r in results if r.layers[i].supported_share is not None]
        layers.append({"layer": layer, "phrases": len(rows),
                       "supported_share": round(sum(v > tau for v, _ in rows) / len(rows), 4) if rows else None,
                       "true_share": round(sum(ok for _, ok in rows) / len(rows), 4) if rows else None,
                       "caption_supported_share": round(statistics.fmean(shares), 4) if shares else None})
    usable = [row for row in layers if row["phrases"]]
    return {
        "phrase_auc": auc([v for v, _ in phrases], [ok for _, ok in phrases]),
        "word_auc": auc([v for v, _ in words], [ok for _, ok in words]),
        "layers": layers,
        "spearman_supported_vs_true": spearman([r["supported_share"] for r in usable],
                                               [r["true_share"] for r in usable]),
        "phrases": len(phrases), "true_phrases": sum(ok for _, ok in phrases),
        "words": len(words), "true_words": sum(ok for _, ok in words),
        "tau_accuracy": round(sum((v > tau) == ok for v, ok in phrases) / len(phrases), 4) if phrases else None,
        "_phrases": phrases,
    }


def best_tau(phrases: list[tuple[float, bool]]) -> float:
    """The threshold (midway between neighbouring PMIs) with the highest Youden's J."""
    values = sorted({v for v, _ in phrases})
    n_pos = sum(ok for _, ok in phrases)
    n_neg = len(phrases) - n_pos

    def youden(t: float) -> float:
        return (sum(v > t and ok for v, ok in phrases) / n_pos) - (sum(v > t and not ok for v, ok in phrases) / n_neg)

    cuts = [(a + b) / 2 for a, b in zip(values, values[1:])]
    return max(cuts, key=youden)


def other_nulls(lm: Family, results: list[ImageResult], seed: int) -> dict[str, list[ImageResult]]:
    """The results with their PMI fields from other scores, the image side teacher-forced under the caption's
    own latents (equal to decoding's: tests/test_pmi.py):
      contrastive  ln p_null(token) = ln mean_k p_T(token | prefix, scene i+k's latents at the caption's layer),
                   k = 1..K (the run's next K scenes, cyclically): the mean likelihood under other images
      untempered   the gray null as shipped, both sides at temperature 1 (the raw softmax) instead of
                   pmi.TEMPERATURE: what the temperature adds
      likelihood   no null at all (ln p_null = 0), at temperature 1: the fields hold ln p(token | prefix,
                   image), the decoder's own confidence, as a baseline for what the null adds."""
    items, _ = scene_items(seed, len(results))
    pixels, _, _ = load_pixels(lm, items)
    layers = [c.layer for c in results[0].layers]
    latents = lm.encode(pixels, layers).latents  # [L, n, N, D]
    null = lm.encode(lm.null_pixels(), layers).latents[:, 0]  # [L, N, D]
    n, L = len(results), len(layers)
    rows, _ = layer_rows(latents, [r.id for r in results], layers)  # image-major [n*L, N, D]
    tokens = [c.tokens for r in results for c in r.layers]
    own = lm.score(rows, None, tokens, pmi.TEMPERATURE)
    raw = lm.score(rows, None, tokens)
    raw_null = lm.score(null[torch.arange(n * L) % L], None, tokens)
    under = [lm.score(rows[torch.tensor([((i + k) % n) * L + j for i in range(n) for j in range(L)])], None, tokens,
                      pmi.TEMPERATURE) for k in range(1, CONTRASTIVE_K + 1)]
    out = {name: [r.model_copy(deep=True) for r in results] for name in ("contrastive", "untempered", "likelihood")}
    captions = zip(*([c for r in out[name] for c in r.layers] for name in out))
    for i, (contrast, untempered, alone) in enumerate(captions):
        t = len(tokens[i])
        mean = torch.logsumexp(torch.stack([u[i][:t] for u in under]), 0) - torch.log(torch.tensor(CONTRASTIVE_K))
        texts = lm.token_texts(tokens[i])
        grounding.pmi.annotate(contrast, own[i][:t].tolist(), mean.tolist(), texts)
        grounding.pmi.annotate(untempered, raw[i][:t].tolist(), raw_null[i][:t].tolist(), texts)
        grounding.pmi.annotate(alone, raw[i][:t].tolist(), [0.0] * t, texts)
    return out


@contextmanager
def pmi_seconds() -> Iterator[list[float]]:
    """Adds up the seconds spent in services.decoder.pmi's two calls while the block runs."""
    spent = [0.0]
    originals = {name: getattr(grounding.pmi, name) for name in ("null_logprobs", "annotate")}

    def timed(fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - t0
        return wrapper

    for name, fn in originals.items():
        setattr(grounding.pmi, name, timed(fn))
    try:
        yield spent
    finally:
        for name, fn in originals.items():
            setattr(grounding.pmi, name, fn)


def pmi_overhead(lm: Family, repeats: int) -> dict:
    """verbalize with grounding on 8 random images: the seconds in PMI over the rest of the same run."""
    items = random_items(8)
    runs = []
    for i in range(repeats + 1):  # the first warms up
        with pmi_seconds() as spent:
            t0 = time.perf_counter()
            embeddings = RunEmbeddings()
            list(verbalize(lm, items, batch_size=len(items), grounding=embeddings))
            embeddings.ranks(1000)
            total = time.perf_counter() - t0
        if i:
            runs.append((total, spent[0]))
    ratios = [p / (t - p) for t, p in runs]
    return {"overhead": round(statistics.median(ratios), 4), "runs_s": [round(t, 2) for t, _ in runs],
            "pmi_s": [round(p, 2) for _, p in runs]}


def demo_run(lm: Family, seed: int, n: int) -> tuple[list[ImageResult], dict[str, Scene]]:
    items, truth = scene_items(seed, n)
    return list(verbalize(lm, items, grounding=RunEmbeddings())), truth


def public(figures: dict) -> dict:
    return {k: v for k, v in figures.items() if not k.startswith("_")}


def main() -> int:
    p = scene_parser(__doc__.splitlines()[0], seed=2026)
    p.add_argument("--tune", type=int, nargs="+", metavar="SEED", help="choose tau on these seeds' scenes")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (the overhead budget is for 2)")
    p.add_argument("--overhead-repeats", type=int, default=2, help="0: skip the overhead measurement")
    p.add_argument("--out", type=Path, help="also write the run's analysis there (figure.png, figure_supported.png,"
                   " distribution_supported.csv, ...)")
    args = parse_scene_args(p)
    torch.set_num_threads(args.threads)
    lm = load_family(args.model, args.pretrained, args.device)
    if args.tune:
        if args.seed in args.tune or set(args.tune) & set(TRAINING_SEEDS):
            p.error("tune on seeds that are neither the evaluation seed nor training seeds")
        phrases, per_seed = [], {}
        for seed in args.tune:
            results, truth = demo_run(lm, seed, args.n)
            figures = evaluate(results, truth, labelled(results), pmi.TAU)
            phrases += figures["_phrases"]
            per_seed[seed] = public(figures)
        report({"tune_seeds": args.tune, "n": args.n, "best_tau": round(best_tau(phrases), 3),
                "shipped_tau": pmi.TAU, "at_shipped_tau": per_seed}, args.json)
        return 0

    t0 = time.perf_counter()
    results, truth = demo_run(lm, args.seed, args.n)
    labels = labelled(results)
    if args.out:
        write_report(analyze(labels), args.out, {"model": f"{args.model}/{args.pretrained}", "seed": args.seed})
    figures = {"model": f"{args.model}/{args.pretrained}", "n": args.n, "seed": args.seed, "tau": pmi.TAU,
               **public(evaluate(results, truth, labels, pmi.TAU)), "seconds": round(time.perf_counter() - t0, 2)}
    for name, alt_results in other_nulls(lm, results, args.seed).items():
        alt = evaluate(alt_results, truth, labelled(alt_results), pmi.TAU)
        figures[name] = {"phrase_auc": alt["phrase_auc"], "word_auc": alt["word_auc"]}
    figures["contrastive"]["k"] = CONTRASTIVE_K
    if args.overhead_repeats:
        b32 = load_family("coca_ViT-B-32", None, "cpu")  # random weights
        figures["overhead_detail"] = pmi_overhead(b32, args.overhead_repeats)
        figures["overhead"] = figures["overhead_detail"]["overhead"]
    figures["targets_met"] = targets_met(figures, TARGETS)
    if not args.json:
        print(f"{'layer':>5} {'phrases':>8} {'supported':>9} {'true':>6} {'caption':>8}")
        for r in figures["layers"]:
            print(f"{r['layer']:5d} {r['phrases']:8d} {r['supported_share']:9.3f} {r['true_share']:6.3f}"
                  f" {r['caption_supported_share']:8.3f}")
    report(figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
