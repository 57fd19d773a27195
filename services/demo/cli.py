"""`latent-verbalizer demo --out DIR`: the offline main job, the whole mission on synthetic scenes.

Generates a few synthetic scenes (DIR/images/, with manifest.jsonl), captions every encoder layer of
each with the shipped demo model (or --model/--pretrained), labels the captions' phrases with the
embedded labeler and charts the layers, writing what the real pipeline writes:
  DIR/results.jsonl      one ImageResult per image (every layer's caption, tokens, entropy, grounding)
  DIR/captions.json      captions per layer;  DIR/prior.json  the gray image's caption per layer
  DIR/labels.json        every caption's phrases and labels (embedded labeler)
  DIR/distribution.csv   per layer, the mean percentage of each class;  DIR/figure.png  its stacked areas
  DIR/distribution_supported.csv, DIR/figure_supported.png   the same of the phrases the image supports
  DIR/entropy.png, DIR/grounding.csv, DIR/grounding.png, DIR/summary.json
  DIR/report.md|json     per layer: classes, entropy, grounding and accuracy against the scenes' truth,
                         then every image's ground truth and caption at each layer
No network is needed: the scenes are drawn locally and the weights ship with the package.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from latent_verbalizer.services.categorizer.analysis import Analysis, analyze
from latent_verbalizer.services.categorizer.files import write_labels
from latent_verbalizer.services.categorizer.models import grounded_layers
from latent_verbalizer.services.categorizer.report import write_report
from latent_verbalizer.services.categorizer.stage import categorize_layers, make_labeler
from latent_verbalizer.services.cli.common import add_model_args, model_from_args, positive_int
from latent_verbalizer.services.cli.outputs import OutputError, check_out, staged_run
from latent_verbalizer.services.cli.verbalize import write_run
from latent_verbalizer.services.demo.evaluate import layer_shares
from latent_verbalizer.services.demo.synth import MANIFEST, Scene, read_manifest, write_dataset
from latent_verbalizer.services.families import Family, FamilyError
from latent_verbalizer.shared.grounding import grounding_outputs, read_references, read_results
from latent_verbalizer.shared.images import ImageItem, iter_items
from latent_verbalizer.shared.models import ModelError
from latent_verbalizer.shared.schemas import ImageResult

DEMO_SEED = 7  # not a training seed (0, 1 of the CoCa demo; 10, 11 of the LLaVA demo)
TOP_CLASSES = 3  # dominant classes shown per layer


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("runs/demo"),
                   help="output directory (new or empty; a folder holding an earlier run needs --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the earlier run in --out whole (only once this run has succeeded)")
    p.add_argument("--n", type=positive_int, default=8, help="number of sample scenes")
    p.add_argument("--seed", type=int, default=DEMO_SEED, help="scene seed")
    add_model_args(p)


def run(args: argparse.Namespace) -> int:
    try:
        check_out(args.out, args.overwrite)
        lm = model_from_args(args)
    except (ModelError, FamilyError, OutputError) as e:  # a model or folder that cannot be used, said why
        print(f"error: {e}", file=sys.stderr)
        return 2
    # The run is written beside --out and replaces it only when complete (services.cli.outputs).
    with staged_run(args.out, "demo") as tmp:
        model, results, truth, rows = _write_demo(lm, args, tmp)
    for r in results:  # the layer the model itself reads (CoCa: its last; LLaVA: its vision_feature_layer)
        own = r.layers[lm.feature_layer].caption if r.layers else f"error: {r.error}"
        print(f"{r.id}\n  truth:           {truth[r.id].caption}\n  feature layer {lm.feature_layer}: {own}")
    print(f"\n{model}, {len(results)} synthetic scenes: what each encoder layer's caption says\n")
    print("\n".join(_table(rows)))
    print(f"\nfigure (classes per layer): {args.out / 'figure.png'}, of what the image supports:"
          f" {args.out / 'figure_supported.png'}\n"
          f"grounding curves: {args.out / 'grounding.png'}   report: {args.out / 'report.md'}")
    return 0


def _write_demo(lm: Family, args: argparse.Namespace, out: Path
                ) -> tuple[str, list[ImageResult], dict[str, Scene], list[dict]]:
    """The demo's files, written into `out` (the staging folder of args.out); results name the scenes
    where they will be, under args.out."""
    images = out / "images"
    manifest = write_dataset(images, args.n, args.seed)
    truth = {Path(m["file"]).stem: Scene.from_dict(m) for m in read_manifest(manifest)}
    scenes = sorted(images.glob("*.png"))  # the files, not the folder: its manifest is no image to skip
    write_run(lm, _relocated(iter_items(scenes), out, args.out), out)
    results = read_results(out / "results.jsonl")

    captioned = [r for r in results if r.layers]
    ids = {c.layer: [r.id for r in captioned] for c in captioned[0].layers} if captioned else {}
    captions = {layer: [c.caption for r in captioned for c in r.layers if c.layer == layer] for layer in ids}
    entropies = {layer: [c.mean_entropy for r in captioned for c in r.layers if c.layer == layer] for layer in ids}
    word_pmi = {layer: [c.word_pmi for r in captioned for c in r.layers if c.layer == layer] for layer in ids}
    labels = grounded_layers(categorize_layers(captions, make_labeler("embedded")), word_pmi)
    write_labels(out / "labels.json", labels, ids, entropies)

    analysis = analyze(labels, entropies)
    grounding, _ = grounding_outputs(results, out, read_references(images / MANIFEST))
    model = lm.name if lm.pretrained is None else f"{lm.name}/{lm.pretrained}"
    write_report(analysis, out, {"model": model, "images": len(results),
                                 **({"grounding": grounding} if grounding else {})})
    rows = layer_rows(analysis, grounding, layer_shares(results, truth))
    write_demo_report(out, rows, results, truth, model)
    return model, results, truth, rows


def _relocated(items: Iterable[ImageItem], staging: Path, out: Path) -> Iterator[ImageItem]:
    """Items read from the staging folder, with the source they will have once it becomes `out`."""
    for item in items:
        item.source = str(out / Path(item.source).relative_to(staging))
        yield item


def layer_rows(analysis: Analysis, grounding: dict | None, accuracy: list[dict]) -> list[dict]:
    """One row per layer: its dominant classes, mean entropy, grounding and accuracy against the truth."""
    by_layer = {g["layer"]: g for g in (grounding or {}).get("layers", [])}
    rows = []
    for i, (layer, shares) in enumerate(zip(analysis.layers, accuracy, strict=True)):
        ranked = sorted(zip(analysis.classes, analysis.percent[i]), key=lambda kv: -kv[1])
        g = by_layer.get(layer, {})
        rows.append({
            "layer": layer,
            "classes": {name: round(pct, 1) for name, pct in ranked[:TOP_CLASSES] if pct > 0},
            "mean_entropy": shares["mean_entropy"],
            "color_shape": shares["color_shape"],
            "supported_share": analysis.supported.share[i] if analysis.supported else None,
            **{k: g.get(k) for k in ("image_score", "retrieval_r1", "prior_share", "ref_cider")},
        })
    return rows


def _table(rows: list[dict]) -> list[str]:
    lines = ["| layer | dominant classes (% of phrases) | mean entropy (bits) | colour+shape right |"
             " phrases supported | image score | R@1 | prior | CIDEr-D |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        classes = ", ".join(f"{name} {pct:.0f}" for name, pct in r["classes"].items()) or "(no labels)"
        lines.append(f"| {r['layer']} | {classes} | {r['mean_entropy']:.2f} | {r['color_shape']:.0%} |"
                     f" {_num(r['supported_share'], '.0%')} | {_num(r['image_score'], '.3f')} |"
                     f" {_num(r['retrieval_r1'], '.0%')} |"
                     f" {_num(r['prior_share'], '.0%')} | {_num(r['ref_cider'], '.2f')} |")
    return lines


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def write_demo_report(out: Path, rows: list[dict], results: list[ImageResult], truth: dict[str, Scene],
                      model: str) -> None:
    (out / "report.json").write_text(json.dumps({"model": model, "images": len(results), "layers": rows}, indent=1))
    md = [f"# Per-layer captions: {model}, {len(results)} synthetic scenes", "",
          "Per vision encoder layer: the classes of the captions' phrases (embedded labeler, main label),",
          "mean entropy, grounding (image score: the model's own text-image cosine; R@1: share of captions",
          "whose own scene scores best among the scenes; prior: share equal to a gray image's caption;",
          "CIDEr-D against the true caption), the share of captions naming every object's colour and shape",
          "right, and the share of phrases the image supports (likelihood grounding: phrase PMI against the",
          "gray image above tau).", "", *_table(rows), "",
          "![classes per layer](figure.png)", "", "![supported classes per layer](figure_supported.png)", "",
          "![grounding per layer](grounding.png)", "",
          "![entropy per layer](entropy.png)"]
    for r in results:
        md += ["", f"## {r.id}", "", f"ground truth: *{truth[r.id].caption}*", ""]
        md += [f"- layer {c.layer}: {c.caption}" for c in r.layers or []] or [f"- error: {r.error}"]
    (out / "report.md").write_text("\n".join(md) + "\n")
