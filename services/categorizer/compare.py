"""`latent-verbalizer compare RUN_A RUN_B [...] --out DIR`: two or more runs side by side, layer by layer
(two models, two prompts, two decoding settings, one model's layers on two datasets).

A run is a folder `verbalize` (or `demo`) wrote: results.jsonl is required; labels.json (from
`categorize`) adds the class distributions. Layers of models of different depth are aligned by relative
depth, layer / (layers - 1), where 0 is the first block and 1 the last; the axes say so. The model's depth
is the run's `num_layers` (run.json / summary.json), else its deepest captioned layer + 1.

Writes into DIR:
  grounding.csv      run, model, layer, depth and the per-layer grounding measures (shared/grounding.py)
  distribution.csv   run, model, layer, depth and the mean percentage of every class (runs with labels)
  grounding.png      R@1 and prior share overlaid (comparable across models: shares of captions);
                     image_score per run in its own panel (a model's own cosine scale: compare within a model)
  distributions.png  each run's stacked class areas, one panel per run, the same colours
  report.md          the runs, the per-layer table, and per image the caption ladders side by side
  summary.json       the runs and the rows of both tables
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

from latent_verbalizer.services.categorizer.analysis import Analysis, analyze
from latent_verbalizer.services.categorizer.files import BadFile, read_labels
from latent_verbalizer.shared.artifacts import write_atomic
from latent_verbalizer.shared.grounding import Grounding, layer_grounding, read_results
from latent_verbalizer.shared.schemas import ImageResult
from latent_verbalizer.shared.taxonomy import load_taxonomy

GROUNDING_COLUMNS = ["retrieval_r1", "gallery_size", "prior_share", "prior_overlap", "image_score",
                     "last_layer_similarity"]
LADDER_IMAGES = 8  # images shown side by side in report.md


@dataclass
class RunData:
    """One run folder as compare reads it."""

    name: str
    path: Path
    model: str | None
    num_layers: int
    results: list[ImageResult]
    grounding: Grounding | None
    analysis: Analysis | None

    def depth(self, layer: int) -> float:
        return layer / (self.num_layers - 1) if self.num_layers > 1 else 0.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run folders (each with results.jsonl)")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--names", help="comma-separated names for the runs (default: the folders' names)")


def run(args: argparse.Namespace) -> int:
    try:
        names = run_names(args.runs, args.names.split(",") if args.names else None)
        runs = [read_run(path, name) for path, name in zip(args.runs, names)]
    except (BadFile, ValueError, FileNotFoundError) as e:
        print(f"error: {e}")
        return 2
    paths = write_comparison(runs, args.out)
    print("\n".join(str(p) for p in paths))
    return 0


def run_names(paths: list[Path], names: list[str] | None) -> list[str]:
    """The runs' names (default: their folders'), checked: two or more runs, one distinct name each."""
    if len(paths) < 2:
        raise ValueError("compare needs two or more run folders")
    chosen = [n.strip() for n in names] if names else [p.resolve().name for p in paths]
    if len(chosen) != len(paths):
        raise ValueError(f"--names gives {len(chosen)} names for {len(paths)} runs")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"runs need distinct names, got {', '.join(chosen)} (use --names)")
    return chosen


def read_run(path: Path, name: str) -> RunData:
    """A run folder -> its results, per-layer grounding and (with labels.json) class distribution."""
    results_path = path / "results.jsonl"
    if not results_path.is_file():
        raise FileNotFoundError(f"{path}: no results.jsonl (is it a folder `verbalize --out` wrote?)")
    results = read_results(results_path)
    captioned = [r for r in results if r.layers]
    if not captioned:
        raise ValueError(f"{results_path}: no image has captions")
    info = _run_info(path)
    depth = info.get("layers") if isinstance(info.get("layers"), int) else None  # the model's, in run.json
    deepest = max(c.layer for r in captioned for c in r.layers)
    analysis = None
    if (path / "labels.json").is_file():
        labels, _ = read_labels(path / "labels.json")
        analysis = analyze(labels)
    return RunData(name=name, path=path, model=info.get("model"), num_layers=depth or deepest + 1,
                   results=results, grounding=layer_grounding(captioned), analysis=analysis)


def _run_info(path: Path) -> dict:
    """What the run says of itself: run.json (verbalize), else summary.json (analyze / demo)."""
    for name in ("run.json", "summary.json"):
        if (path / name).is_file():
            try:
                return json.loads((path / name).read_text())
            except ValueError as e:
                raise BadFile(f"{path / name}: not JSON: {e}") from e
    return {}


def write_comparison(runs: list[RunData], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    aligned = len({r.num_layers for r in runs}) > 1  # different depths: the x axis is relative depth
    grounding_rows = _grounding_rows(runs)
    distribution_rows = _distribution_rows(runs)
    paths = [_plot_grounding(runs, out / "grounding.png", aligned)]
    if grounding_rows:
        paths.append(_write_csv(out / "grounding.csv", grounding_rows))
    if distribution_rows:
        paths += [_write_csv(out / "distribution.csv", distribution_rows),
                  _plot_distributions(runs, out / "distributions.png", aligned)]
    report = out / "report.md"
    write_atomic(report, _report(runs, grounding_rows, aligned).encode())
    summary = out / "summary.json"
    write_atomic(summary, json.dumps({
        "runs": [{"name": r.name, "path": str(r.path), "model": r.model, "num_layers": r.num_layers,
                  "images": len(r.results), "labelled": r.analysis is not None} for r in runs],
        "x_axis": "relative depth: layer / (layers - 1)" if aligned else "layer",
        "grounding": grounding_rows, "distribution": distribution_rows,
    }, indent=1, allow_nan=False).encode())
    return [*paths, report, summary]


def _grounding_rows(runs: list[RunData]) -> list[dict]:
    rows = []
    for r in runs:
        for g in r.grounding.layers if r.grounding else []:
            rows.append({"run": r.name, "model": r.model, "layer": g.layer, "depth": round(r.depth(g.layer), 4),
                         **{c: getattr(g, c) for c in GROUNDING_COLUMNS}})
    return rows


def _distribution_rows(runs: list[RunData]) -> list[dict]:
    rows = []
    for r in runs:
        if r.analysis is None:
            continue
        for layer in r.analysis.layers:
            percent = {c: round(v, 6) for c, v in r.analysis.row(layer).items()}
            rows.append({"run": r.name, "model": r.model, "layer": layer, "depth": round(r.depth(layer), 4),
                         **percent})
    return rows


def _write_csv(path: Path, rows: list[dict]) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()} for row in rows)
    write_atomic(path, buffer.getvalue().encode())
    return path


def _x(run: RunData, layers: list[int], aligned: bool) -> list[float]:
    return [run.depth(layer) for layer in layers] if aligned else layers


def _x_label(aligned: bool) -> str:
    return "relative depth: layer / (layers - 1)" if aligned else "encoder layer"


def _plot_grounding(runs: list[RunData], path: Path, aligned: bool) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3), dpi=120)
    panels = [("retrieval_r1", "R@1: own image ranks first", (-0.03, 1.03)),
              ("prior_share", "prior share: caption = null-input caption", (-0.03, 1.03)),
              ("image_score", "image score (each model's own cosine scale:\ncompare within a model, not across)", None)]
    for ax, (field, title, ylim) in zip(axes, panels):
        for i, r in enumerate(runs):
            rows = r.grounding.layers if r.grounding else []
            values = [getattr(g, field) for g in rows]
            if any(v is not None for v in values):
                ax.plot(_x(r, [g.layer for g in rows], aligned), [math.nan if v is None else v for v in values],
                        marker="o", color=f"C{i}", label=_label(r))
        ax.set(title=title, xlabel=_x_label(aligned))
        if ylim:
            ax.set_ylim(*ylim)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
    fig.suptitle("Grounding per layer, run against run")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _label(run: RunData) -> str:
    return f"{run.name} ({run.model})" if run.model and run.model != run.name else run.name


def _plot_distributions(runs: list[RunData], path: Path, aligned: bool) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    taxonomy = load_taxonomy()
    labelled = [r for r in runs if r.analysis is not None]
    shown = [c for c in taxonomy.classes if any(c in r.analysis.plotted for r in labelled)]
    fig, axes = plt.subplots(1, len(labelled), figsize=(5.5 * len(labelled) + 2, 4.5), dpi=120, squeeze=False)
    for ax, r in zip(axes[0], labelled):
        a = r.analysis
        ax.stackplot(_x(r, a.layers, aligned), [[a.row(layer)[c] for layer in a.layers] for c in shown],
                     labels=shown, colors=[taxonomy.color(c) for c in shown])
        ax.set(title=_label(r), xlabel=_x_label(aligned), ylabel="mean percentage of class", ylim=(0, 100))
    handles, labels = axes[0][-1].get_legend_handles_labels()
    fig.legend(handles[::-1], labels[::-1], loc="center right", fontsize=8)
    fig.suptitle("What each layer's captions talk about, run by run")
    fig.tight_layout(rect=(0, 0, 1 - 1.8 / fig.get_figwidth(), 1))
    fig.savefig(path)
    plt.close(fig)
    return path


def _report(runs: list[RunData], grounding_rows: list[dict], aligned: bool) -> str:
    lines = ["# Comparison", "", "| run | model | layers | images | labelled |", "|---|---|---:|---:|---|"]
    for r in runs:
        lines.append(f"| {r.name} | {r.model or ''} | {r.num_layers} | {len(r.results)} | "
                     f"{'yes' if r.analysis else 'no'} |")
    lines += ["", f"x axis: {_x_label(aligned)}.", "", "![grounding](grounding.png)", ""]
    if any(r.analysis for r in runs):
        lines += ["![class distributions](distributions.png)", ""]
    if grounding_rows:
        lines += ["## Grounding per layer", "", "| run | layer | depth | R@1 | prior share | image score |",
                  "|---|---:|---:|---:|---:|---:|"]
        for row in grounding_rows:
            lines.append(f"| {row['run']} | {row['layer']} | {row['depth']:.2f} | {_fmt(row['retrieval_r1'])} | "
                         f"{_fmt(row['prior_share'])} | {_fmt(row['image_score'])} |")
        lines.append("")
    lines += _ladders(runs, aligned)
    return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def _ladders(runs: list[RunData], aligned: bool) -> list[str]:
    """Per image the runs have in common, its caption ladders side by side: rows follow the first run's
    layers; another run shows its layer at the nearest relative depth (named) when depths differ."""
    by_run = [{res.id: {c.layer: c.caption for c in res.layers} for res in r.results if res.layers} for r in runs]
    common = [i for i in by_run[0] if all(i in other for other in by_run[1:])]
    if not common:
        return ["No image is in every run: no ladders side by side.", ""]
    lines = [f"## Captions side by side ({min(len(common), LADDER_IMAGES)} of {len(common)} common images)", ""]
    for image_id in common[:LADDER_IMAGES]:
        lines += [f"### {image_id}", "", "| layer | " + " | ".join(r.name for r in runs) + " |",
                  "|---:|" + "---|" * len(runs)]
        for layer, caption in sorted(by_run[0][image_id].items()):
            cells = [caption]
            for r, captions in zip(runs[1:], by_run[1:]):
                own = captions[image_id]
                nearest = min(own, key=lambda lay: abs(r.depth(lay) - runs[0].depth(layer)))
                cells.append(f"(L{nearest}) {own[nearest]}" if aligned else own.get(layer, ""))
            lines.append(f"| {layer} | " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        lines.append("")
    return lines
