"""Grounding per layer: how much of what each layer's caption says comes from the image.

The stages write per-caption measures into results.jsonl (each layer record of an image):
  image_score            cosine of the model's contrastive text embedding of the caption with its image's
                         embedding (the model's own "does this text describe this image")
  retrieval_rank         rank of the caption's own image among the run's images by that cosine (1 = best);
                         null for a one-image run; gallery_size: how many images it was ranked among
  prior                  the caption equals the decoder's caption of a null input (flat gray image) at that layer
  prior_overlap          token F1 with that null-input caption
  last_layer_similarity  text-embedding cosine with the same image's caption at the last selected layer
This module aggregates them per layer (the one implementation behind `analyze`, the service's job summary,
the demo and the bench), adds text measures (BLEU-4 with the last layer's caption; BLEU-4 and CIDEr-D against
reference captions where they exist, with pycocoevalcap; METEOR and SPICE where Java can run them) and
writes grounding.csv, grounding.png and the `grounding` block of summary.json.

Reference captions come from each result's `meta` (a shard's key.txt: one caption per line; key.json:
`caption` or `captions`) and from a references file: JSON lines {"id": ..., "captions": [...]} or the
synthetic scenes' manifest.jsonl ({"file": "scene_7_000000.png", "caption": ...}; the id is the file stem).
Where both name an image, the file's captions are used.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from latent_verbalizer.shared.schemas import ImageResult

log = logging.getLogger(__name__)

References = dict[str, list[str]]  # image id -> reference captions
_WORD = re.compile(r"[a-z0-9]+")


class LayerGrounding(BaseModel):
    """One layer's row of grounding.csv and of summary.json's `grounding.layers`. A measure that has no
    values in this run (no references, one image, ...) is null."""

    layer: int
    captions: int
    image_score: float | None = Field(description="mean cosine(caption text embedding, image embedding)")
    image_score_vs_last: float | None = Field(
        description="image_score minus the last selected layer's image_score (cosine units; 0 at that layer)"
    )
    retrieval_r1: float | None = Field(description="share of captions whose own image ranks first")
    gallery_size: int | None = Field(description="images each caption was ranked among (largest in the layer)")
    prior_share: float | None = Field(description="share of captions equal to the null-input caption")
    prior_overlap: float | None = Field(description="mean token F1 with the null-input caption")
    last_layer_similarity: float | None = Field(description="mean text-embedding cosine with the last layer's caption")
    last_layer_bleu4: float | None = Field(description="corpus BLEU-4 against the same image's last-layer caption")
    ref_images: int = Field(description="captions of this layer whose image has reference captions")
    ref_bleu4: float | None = None
    ref_cider: float | None = Field(None, description="CIDEr-D (pycocoevalcap's Cider)")
    ref_meteor: float | None = None
    ref_spice: float | None = None


class Grounding(BaseModel):
    """The per-layer grounding of a set of results."""

    images: int = Field(description="images with captions")
    last_layer: int
    metrics: list[str] = Field(description="text metrics computed in this run")
    not_computed: dict[str, str] = Field(default_factory=dict, description="metric -> why it was not computed")
    layers: list[LayerGrounding]

    def summary(self) -> dict:
        """The `grounding` block of summary.json."""
        return self.model_dump()


# ---- references ----


def read_references(path: Path) -> References:
    """A JSON-lines file of reference captions: {"id": ..., "captions": [...]} (or "caption": "...") per line,
    or a synthetic scenes' manifest.jsonl ({"file": ..., "caption": ...}). Raises ValueError naming the line."""
    refs: References = {}
    for n, line in _lines(path):
        try:
            entry = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{path}:{n}: not JSON: {e}") from e
        if not isinstance(entry, dict):
            raise ValueError(f"{path}:{n}: expected an object with `id` and `captions`")
        image_id = entry.get("id", Path(str(entry["file"])).stem if "file" in entry else None)
        captions = _captions_of(entry)
        if image_id is None or captions is None:
            raise ValueError(f"{path}:{n}: expected `id` (or `file`) and `captions` (or `caption`)")
        refs[str(image_id)] = captions
    return refs


def references_from_meta(results: Sequence[ImageResult]) -> References:
    """Reference captions carried in each result's meta: key.txt (one per line) and key.json's caption(s)."""
    refs: References = {}
    for r in results:
        meta = r.meta or {}
        found = [line.strip() for line in str(meta.get("txt", "")).splitlines() if line.strip()]
        if isinstance(meta.get("json"), dict):
            found += _captions_of(meta["json"]) or []
        if found:
            refs[r.id] = found
    return refs


def _captions_of(entry: dict) -> list[str] | None:
    value = entry.get("captions", entry.get("caption"))
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(c, str) for c in value):
        return list(value)
    return None


# ---- per-layer measures ----


def as_results(results: Sequence[ImageResult | Mapping]) -> list[ImageResult]:
    """The results (ImageResult objects, or results.jsonl lines as dicts) that have captions."""
    parsed = [r if isinstance(r, ImageResult) else ImageResult.model_validate(r) for r in results]
    return [r for r in parsed if r.layers]


def has_grounding(results: Sequence[ImageResult]) -> bool:
    """Whether grounding ran: every family fills `prior` and `last_layer_similarity`, only a contrastive one
    (CoCa) `image_score` too."""
    return any(c.prior is not None or c.image_score is not None for r in results for c in r.layers or [])


def layer_grounding(
    results: Sequence[ImageResult | Mapping], references: References | None = None, java: bool = False
) -> Grounding | None:
    """Per-layer grounding of `results`; None when no caption carries grounding fields (a run with
    grounding off). References from the results' meta are used, and `references` on top. `java`: also
    METEOR and SPICE, where a `java` executable is on PATH (off by default: METEOR's start-up alone took
    41 s on our 2-core machine)."""
    parsed = as_results(results)
    if not has_grounding(parsed):
        return None
    refs = {**references_from_meta(parsed), **(references or {})}
    layers = sorted({c.layer for r in parsed for c in r.layers})
    last_layer = layers[-1]
    by_layer = {layer: {r.id: c for r in parsed for c in r.layers if c.layer == layer} for layer in layers}
    last = {i: c.caption for i, c in by_layer[last_layer].items()}
    text = TextMetrics(java)
    rows = []
    for layer in layers:
        caps = by_layer[layer]
        with_refs = {i: refs[i] for i in caps if refs.get(i)}
        row = {
            "layer": layer,
            "captions": len(caps),
            "image_score": _mean(c.image_score for c in caps.values()),
            "retrieval_r1": _mean(c.retrieval_rank == 1 for c in caps.values() if c.retrieval_rank is not None),
            "gallery_size": max((c.gallery_size for c in caps.values() if c.gallery_size), default=None),
            "prior_share": _mean(c.prior for c in caps.values()),
            "prior_overlap": _mean(c.prior_overlap for c in caps.values()),
            "last_layer_similarity": _mean(c.last_layer_similarity for c in caps.values()),
            "last_layer_bleu4": text.bleu4({i: c.caption for i, c in caps.items() if i in last},
                                           {i: [last[i]] for i in caps if i in last}),
            "ref_images": len(with_refs),
            **text.against_references({i: caps[i].caption for i in with_refs}, with_refs),
        }
        rows.append(row)
    text.close()
    last_score = rows[-1]["image_score"]
    for row in rows:
        s = row["image_score"]
        row["image_score_vs_last"] = None if s is None or last_score is None else s - last_score
    return Grounding(images=len(parsed), last_layer=last_layer, metrics=text.computed(),
                     not_computed=text.skipped, layers=[LayerGrounding(**row) for row in rows])


def _mean(values) -> float | None:
    """Mean of the values that are not None (bools count as 0/1); None when there are none."""
    kept = [float(v) for v in values if v is not None]
    kept = [v for v in kept if math.isfinite(v)]
    return sum(kept) / len(kept) if kept else None


def tokenize(caption: str) -> str:
    """Lower-case words and numbers joined by spaces: what the metrics compare (punctuation dropped, as
    the COCO toolkit's PTB tokenizer does, without needing Java)."""
    return " ".join(_WORD.findall(caption.lower()))


class TextMetrics:
    """pycocoevalcap's scorers over tokenized captions: corpus BLEU-4 and CIDEr-D always; METEOR and SPICE
    when Java is there (and SPICE's CoreNLP jars, which pycocoevalcap would otherwise download).
    Records which metrics were computed and why others were not."""

    def __init__(self, java: bool) -> None:
        self.used: set[str] = set()
        self.skipped: dict[str, str] = {}
        self._meteor = None
        if not java:
            off = "not asked for (analyze --java-metrics)"
            self.skipped = dict.fromkeys(("meteor", "spice"), off)
        elif shutil.which("java") is None:
            self.skipped = dict.fromkeys(("meteor", "spice"), "no java executable")
        elif not _spice_ready():
            self.skipped["spice"] = "Stanford CoreNLP jars not installed (pycocoevalcap would download them)"

    def computed(self) -> list[str]:
        order = ["bleu4", "cider", "meteor", "spice"]
        return [m for m in order if m in self.used]

    def bleu4(self, hyps: Mapping[str, str], refs: Mapping[str, list[str]]) -> float | None:
        if not hyps:
            return None
        from pycocoevalcap.bleu.bleu import Bleu

        score, _ = Bleu(4).compute_score(*_prepared(hyps, refs), verbose=0)
        self.used.add("bleu4")
        return float(score[3])

    def against_references(self, hyps: Mapping[str, str], refs: Mapping[str, list[str]]) -> dict[str, float | None]:
        """ref_bleu4, ref_cider (and ref_meteor, ref_spice where computed) of hyps against refs."""
        out: dict[str, float | None] = {"ref_bleu4": self.bleu4(hyps, refs)}
        if not hyps:
            return out
        from pycocoevalcap.cider.cider import Cider

        gts, res = _prepared(hyps, refs)
        out["ref_cider"] = float(Cider().compute_score(gts, res)[0])
        self.used.add("cider")
        if "meteor" not in self.skipped:
            out["ref_meteor"] = self._run("meteor", lambda: self._meteor_scorer().compute_score(gts, res)[0])
        if "spice" not in self.skipped:
            out["ref_spice"] = self._run("spice", lambda: _spice().compute_score(gts, res)[0])
        return out

    def _run(self, name: str, compute) -> float | None:
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                value = float(compute())
        except Exception as e:  # a Java metric that cannot run here is skipped, not fatal
            self.skipped[name] = f"failed: {type(e).__name__}: {e}"
            log.warning("metric skipped", extra={"metric": name, "reason": self.skipped[name]})
            return None
        self.used.add(name)
        return value

    def _meteor_scorer(self):
        if self._meteor is None:
            from pycocoevalcap.meteor.meteor import Meteor

            self._meteor = Meteor()
        return self._meteor

    def close(self) -> None:
        """Stop METEOR's Java process (pycocoevalcap's Meteor stops it when the object is deleted)."""
        self._meteor = None


def _prepared(hyps: Mapping[str, str], refs: Mapping[str, list[str]]) -> tuple[dict, dict]:
    """pycocoevalcap's input: {id: [reference, ...]} and {id: [hypothesis]}, tokenized."""
    ids = sorted(hyps)
    return {i: [tokenize(r) for r in refs[i]] for i in ids}, {i: [tokenize(hyps[i])] for i in ids}


def _spice_ready() -> bool:
    try:
        import pycocoevalcap.spice as spice
    except ImportError:
        return False
    return (Path(spice.__file__).parent / "lib" / "stanford-corenlp-3.6.0.jar").is_file()


def _spice():
    from pycocoevalcap.spice.spice import Spice

    return Spice()


# ---- files ----

CSV_NAME = "grounding.csv"
FIGURE_NAME = "grounding.png"


def write_grounding(grounding: Grounding, out_dir: Path) -> list[Path]:
    """grounding.csv (one row per layer) and grounding.png (curves over layers) in out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [_write_csv(grounding, out_dir / CSV_NAME), plot_grounding(grounding, out_dir / FIGURE_NAME)]


def grounding_outputs(
    results: Sequence[ImageResult | Mapping], out_dir: Path, references: References | None = None,
    java: bool = False,
) -> tuple[dict | None, list[Path]]:
    """For a finished run: (summary.json's `grounding` block, the files written), or (None, []) when the
    results carry no grounding fields (grounding was off). `java`: also METEOR/SPICE (see layer_grounding)."""
    grounding = layer_grounding(results, references, java)
    if grounding is None:
        log.info("no grounding fields in the results: no grounding outputs")
        return None, []
    return grounding.summary(), write_grounding(grounding, out_dir)


def _write_csv(grounding: Grounding, path: Path) -> Path:
    columns = list(LayerGrounding.model_fields)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in grounding.layers:
            values = row.model_dump()
            writer.writerow(["" if values[c] is None else _cell(values[c]) for c in columns])
    return path


def _cell(value: float | int) -> str:
    return f"{value:.6f}" if isinstance(value, float) else str(value)


CIDER_AXIS_MIN_TOP = 1.0  # CIDEr-D of fair captions is near 1: below that, differences are not worth a tall slope


def cider_axis(values: Sequence[float]) -> tuple[float, float]:
    """The CIDEr-D axis: from 0, up to at least CIDER_AXIS_MIN_TOP (so scores of 0.0053 and 0.0060 lie flat
    near zero, as they are, instead of spanning the panel), and above the highest score."""
    top = max([CIDER_AXIS_MIN_TOP, *(1.05 * v for v in values)])
    return -0.03 * top, top * 1.03


def plot_grounding(grounding: Grounding, path: Path) -> Path:
    """Panels over layers: cosines (image score, similarity to the last layer), shares (R@1, prior captions)
    and, where references exist, CIDEr-D and BLEU-4 against them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = grounding.layers
    layers = [r.layer for r in rows]
    has_refs = any(r.ref_cider is not None for r in rows)
    panels = 3 if has_refs else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.2), dpi=120)
    twin = None

    def curve(ax, field: str, label: str, **style) -> None:
        values = [getattr(r, field) for r in rows]
        if any(v is not None for v in values):
            ax.plot(layers, [math.nan if v is None else v for v in values], marker="o", label=label, **style)

    ax = axes[0]
    curve(ax, "image_score", "image score: cosine(caption, image)", color="tab:blue")
    curve(ax, "last_layer_similarity", "similarity to the last layer's caption", color="tab:gray", linestyle="--")
    ax.set(title="Model's own scores (cosine)", ylabel="cosine")
    ax = axes[1]
    gallery = next((r.gallery_size for r in rows if r.gallery_size), None)
    curve(ax, "retrieval_r1", f"R@1: own image ranks first (of {gallery})" if gallery else "R@1", color="tab:green")
    curve(ax, "prior_share", "prior: caption = null-input caption", color="tab:red")
    if gallery:
        ax.axhline(1 / gallery, color="tab:green", linestyle=":", linewidth=1, label=f"R@1 by chance (1/{gallery})")
    ax.set(title="Shares of captions", ylabel="share", ylim=(-0.03, 1.03))
    if has_refs:
        ax = axes[2]
        curve(ax, "ref_cider", "CIDEr-D (left axis)", color="tab:purple")
        twin = ax.twinx()  # BLEU-4 lies in [0, 1], CIDEr-D in [0, 10]
        curve(twin, "ref_bleu4", "BLEU-4 (right axis)", color="tab:orange")
        twin.set(ylabel="BLEU-4", ylim=(-0.03, 1.03))
        n = max(r.ref_images for r in rows)
        ax.set(title=f"Against reference captions ({n} images)", ylabel="CIDEr-D",
               ylim=cider_axis([r.ref_cider for r in rows if r.ref_cider is not None]))
    for ax in axes:
        ax.set_xlabel("encoder layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        if twin is not None and ax is axes[-1]:  # the right axis's curve joins its panel's legend
            more_handles, more_labels = twin.get_legend_handles_labels()
            handles, labels = handles + more_handles, labels + more_labels
        if handles:
            ax.legend(handles, labels, fontsize=8, loc="best")
    fig.suptitle(f"Grounding per layer ({grounding.images} images)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def read_results(path: Path) -> list[ImageResult]:
    """results.jsonl as grounding reads it; raises ValueError naming the bad line."""
    out = []
    for n, line in _lines(path):
        try:
            out.append(ImageResult.model_validate_json(line))
        except ValidationError as e:
            raise ValueError(f"{path}:{n}: not a result line: {e.errors()[0]['msg']}") from e
    return out


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a JSON-lines file's non-blank lines."""
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            yield n, line
