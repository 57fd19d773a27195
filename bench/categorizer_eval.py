"""How close a categorizer backend comes to the reference labeler (Llama-3.1-70B-Instruct).

Reads the reference material (never shipped with the project): captions per layer, the reference's
raw LLM answers for the layers that have them, and the reference figure's numbers. Prints

  phrase_agreement           share of the reference's phrases whose merged class, from our main
                             label of that phrase, equals the reference's
  layer_distribution_mae_pp  mean |difference| in percentage points, over labelled layers x the
                             reference figure's classes (taxonomy plot_names), between our analysis
                             of the captions (our phrases, our labels) and that of the reference labels
  captions_per_s             captions labelled per second, model loading excluded (load_s)
  unparsed_reference_answers reference answers that are not JSON objects (left out of the analysis)
  reference_vs_paper_max_pp  largest |difference| in any cell between the analysis of the reference
                             labels and the paper's figure (5k images), on the labelled layers
  unlabelled_layers_paper_mae_pp
                             our analysis of the layers that have no reference labels against the
                             paper's figure (mean over those layers x plot classes): a held-out check

    python bench/categorizer_eval.py [--backend embedded] [--labels-dir DIR] [--json]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latent_verbalizer.services.categorizer.analysis import Analysis, analyze  # noqa: E402
from latent_verbalizer.services.categorizer.files import read_captions  # noqa: E402
from latent_verbalizer.services.categorizer.reference import read_reference_labels  # noqa: E402
from latent_verbalizer.services.categorizer.stage import categorize, categorize_phrases, make_labeler  # noqa: E402
from latent_verbalizer.shared.taxonomy import load_taxonomy  # noqa: E402

SEED = Path(__file__).resolve().parents[2] / "shared" / "seed"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="embedded", choices=["embedded", "openai"])
    parser.add_argument("--captions", type=Path, default=SEED / "captions_batch0.json")
    parser.add_argument("--labels-dir", type=Path, default=SEED / "llama70b_labels_dev")
    parser.add_argument("--paper", type=Path, default=SEED / "paper_layer_class_distribution.csv")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args()

    taxonomy = load_taxonomy()
    plot_classes = list(taxonomy.plot_names)
    reference, unparsed = read_reference_labels(args.labels_dir)
    captions = read_captions(args.captions).captions
    paper = _read_paper(args.paper)

    started = time.perf_counter()
    labeler = make_labeler(args.backend)
    if hasattr(labeler, "load_encoder"):  # embedded: MiniLM otherwise loads at the first unknown word
        labeler.load_encoder()
    load_s = time.perf_counter() - started
    started = time.perf_counter()
    ours = {layer: categorize(captions[layer], labeler) for layer in reference}
    elapsed = time.perf_counter() - started

    ref_phrases = [p for caps in reference.values() for c in caps for p in c.phrases]
    our_labels = categorize_phrases([p.text for p in ref_phrases], labeler)
    pairs = [(taxonomy.merge(p.main), taxonomy.merge(labels[0])) for p, labels in zip(ref_phrases, our_labels)]

    ours_a, ref_a = analyze(ours), analyze(reference)
    errors = {layer: {c: abs(ours_a.row(layer)[c] - ref_a.row(layer)[c]) for c in plot_classes} for layer in reference}
    held_out = [layer for layer in captions if layer not in reference and layer in paper]
    held_out_a = analyze({layer: categorize(captions[layer], labeler) for layer in held_out}) if held_out else None

    result = {
        "backend": args.backend,
        "layers": list(reference),
        "reference_phrases": len(pairs),
        "phrase_agreement": round(sum(r == o for r, o in pairs) / len(pairs), 4),
        "layer_distribution_mae_pp": round(_mean(v for e in errors.values() for v in e.values()), 3),
        "captions_per_s": round(sum(map(len, ours.values())) / elapsed, 1),
        "load_s": round(load_s, 2),
        "unparsed_reference_answers": unparsed,
        "reference_vs_paper_max_pp": round(max(_paper_diffs(ref_a, paper, ref_a.classes)), 3),
        "unlabelled_layers_paper_mae_pp": round(_mean(_paper_diffs(held_out_a, paper, plot_classes)), 3)
        if held_out_a
        else None,
    }
    if not args.json:
        _details(pairs, errors, ours_a, ref_a, plot_classes)
    print(json.dumps(result) if args.json else json.dumps(result, indent=1))
    return 0


def _read_paper(path: Path) -> dict[int, dict[str, float]]:
    """The reference figure's numbers: one row per layer (0, 1, ...), one column per merged class."""
    with path.open() as f:
        return {layer: {c: float(v) for c, v in row.items()} for layer, row in enumerate(csv.DictReader(f))}


def _paper_diffs(analysis: Analysis, paper: dict[int, dict[str, float]], classes: list[str]) -> list[float]:
    return [abs(analysis.row(layer)[c] - paper[layer][c]) for layer in analysis.layers for c in classes]


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _details(pairs, errors, ours_a, ref_a, plot_classes) -> None:
    """Where the disagreements are: the most frequent class confusions and per-layer errors."""
    print("most frequent confusions (reference -> ours):")
    for (r, o), n in Counter(p for p in pairs if p[0] != p[1]).most_common(15):
        print(f"  {n:6d}  {r} -> {o}")
    print("layer  mae_pp  worst class (ours vs reference %)")
    for layer, e in errors.items():
        worst = max(e, key=e.get)
        print(
            f"  {layer:3d}  {_mean(e.values()):6.2f}  {worst}: "
            f"{ours_a.row(layer)[worst]:.1f} vs {ref_a.row(layer)[worst]:.1f}"
        )
    print("class  mean |diff| pp")
    for c in plot_classes:
        print(f"  {c:28s} {_mean(e[c] for e in errors.values()):6.2f}")


if __name__ == "__main__":
    sys.exit(main())
