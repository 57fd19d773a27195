"""An Analysis as files: distribution.csv (rows: layers, columns: merged classes), figure.png (stacked
area of the plotted classes over layers), entropy.png (when entropies were given) and summary.json; with
likelihood grounding (phrases with a PMI) also distribution_supported.csv and figure_supported.png, the
same chart of the supported phrases only, the unsupported rest drawn on top in gray.
With nothing to plot (every caption failed, or no class reaches the plot threshold) the files are
still written: summary.json says why in `note`, and figure.png shows that note instead of areas."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from latent_verbalizer.services.categorizer.analysis import Analysis  # noqa: E402
from latent_verbalizer.shared.pmi import TAU  # noqa: E402
from latent_verbalizer.shared.taxonomy import Taxonomy, load_taxonomy  # noqa: E402


def write_report(analysis: Analysis, out_dir: Path, extra: dict | None = None) -> list[Path]:
    """Write the report files into out_dir; `extra` is merged into summary.json. Returns the paths."""
    taxonomy = load_taxonomy()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    note = _note(analysis, taxonomy)
    paths = [
        _write_csv(analysis, out_dir / "distribution.csv"),
        _plot_classes(analysis, taxonomy, out_dir / "figure.png", note),
    ]
    if analysis.supported is not None:
        paths += [_write_csv(analysis, out_dir / "distribution_supported.csv", supported=True),
                  _plot_classes(analysis, taxonomy, out_dir / "figure_supported.png", note, supported=True)]
    if analysis.mean_entropy is not None:
        paths.append(plot_entropy(analysis.layers, analysis.mean_entropy, out_dir / "entropy.png"))
    summary = out_dir / "summary.json"
    notes = {"note": note} if note else {}
    summary.write_text(json.dumps({**_summary(analysis, taxonomy), **notes, **(extra or {})}, indent=1,
                                  allow_nan=False))
    return [*paths, summary]


def _note(analysis: Analysis, taxonomy: Taxonomy) -> str | None:
    """Why the figure has no areas; None when it has some."""
    if analysis.plotted:
        return None
    if not any(c.counted for c in analysis.counts):
        failed = sum(c.failed for c in analysis.counts)
        captions = sum(c.captions for c in analysis.counts)
        return (f"no labels: none of the {captions} captions was labelled ({failed} failed; each caption's error"
                " says why)")
    return f"no class reaches {taxonomy.plot_threshold_percent:g}% of a caption's phrases in any layer"


def _write_csv(analysis: Analysis, path: Path, supported: bool = False) -> Path:
    """The class percentages per layer; `supported`: of the supported phrases, with an `unsupported` column
    (100 minus the row's sum: the phrases the image did not support)."""
    rows = analysis.supported.percent if supported else analysis.percent
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["layer", *analysis.classes, *(["unsupported"] if supported else [])])
        for layer, row in zip(analysis.layers, rows, strict=True):
            writer.writerow([layer, *(f"{v:.6f}" for v in [*row, *([100 - sum(row)] if supported else [])])])
    return path


def _plot_classes(analysis: Analysis, taxonomy: Taxonomy, path: Path, note: str | None,
                  supported: bool = False) -> Path:
    fig = class_figure(analysis, taxonomy, note, supported)
    fig.savefig(path)
    plt.close(fig)
    return path


def class_figure(analysis: Analysis, taxonomy: Taxonomy | None = None, note: str | None = None,
                 supported: bool = False):
    """figure.png's matplotlib Figure: the plotted classes' stacked areas over layers (or the note saying why
    there is nothing to plot); `supported`: figure_supported.png's, the same classes' supported phrases with
    the rest hatched on top."""
    taxonomy = taxonomy or load_taxonomy()
    note = note or _note(analysis, taxonomy)
    fig, ax = plt.subplots(figsize=(9, 5), dpi=120)
    ax.set_title(f"What each layer's caption says that the image supports (phrase PMI > {TAU:g})" if supported
                 else "What each layer's caption talks about")
    ax.set(xlabel="encoder layer", ylabel="mean percentage of class", ylim=(0, 100))
    if note:
        ax.text(0.5, 0.5, note, ha="center", va="center", wrap=True, transform=ax.transAxes)
        return fig
    columns = [analysis.classes.index(c) for c in analysis.plotted]
    rows = analysis.supported.percent if supported else analysis.percent
    areas = [[row[i] for row in rows] for i in columns]
    labels = list(analysis.plotted)  # the classes as distribution.csv names them: one name per class
    colors = [taxonomy.color(c) for c in analysis.plotted]
    if supported:  # the classes not plotted, then what the image did not support, up to 100%
        areas += [[sum(row) - sum(row[i] for i in columns) for row in rows], [100 - sum(row) for row in rows]]
        labels += ["other classes", "not supported by the image"]
        colors += ["#bbbbbb", "#eeeeee"]
    polys = ax.stackplot(analysis.layers, areas, labels=labels, colors=colors)
    if supported:
        polys[-1].set_hatch("//")
        polys[-1].set_edgecolor("#aaaaaa")
    if len(analysis.layers) > 1:
        ax.set_xlim(analysis.layers[0], analysis.layers[-1])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, reverse=True)
    fig.tight_layout()
    return fig


def plot_entropy(layers: list[int], mean_entropy: list[float | None], path: Path) -> Path:
    """Mean caption entropy (bits) per layer; a layer without a value is a gap."""
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(layers, [math.nan if v is None else v for v in mean_entropy], marker="o")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="encoder layer", ylabel="mean token entropy (bits)", title="Decoder uncertainty per layer")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _summary(analysis: Analysis, taxonomy: Taxonomy) -> dict:
    layers = []
    for i, layer in enumerate(analysis.layers):
        row = analysis.row(layer)
        entry = {"layer": layer, **analysis.counts[i].model_dump(), "top_classes": _top(row, 3)}
        if analysis.mean_entropy is not None and not math.isnan(analysis.mean_entropy[i]):
            entry["mean_entropy"] = analysis.mean_entropy[i]
        if analysis.supported is not None:
            entry["supported_share"] = analysis.supported.share[i]
            entry["supported_phrases"] = analysis.supported.phrases[i]
            entry["top_supported_classes"] = _top(dict(zip(analysis.classes, analysis.supported.percent[i])), 3)
        layers.append(entry)
    summary = {
        "taxonomy_version": analysis.taxonomy_version,
        "plotted": {c: c for c in analysis.plotted},  # class -> its name in the figure: the class itself
        "layers": layers,
    }
    if analysis.supported is not None:
        summary["supported"] = {"tau": TAU, "share": analysis.supported.share,
                                "files": ["distribution_supported.csv", "figure_supported.png"]}
    return summary


def _top(row: dict[str, float], n: int) -> dict[str, float]:
    return {c: round(v, 3) for c, v in sorted(row.items(), key=lambda kv: -kv[1])[:n]}
