"""latent-verbalizer from Python (a notebook, a script), through the same functions the commands call:

    import latent_verbalizer as lv
    model = lv.load("coca_synth_demo")             # any --model value; device=, dtype=, family=, prompt=, pretrained=
    run = model.verbalize(["scene.png", pil_image], layers=[0, 3, 5], grounding=True)
    run.results                                    # ImageResult objects, as results.jsonl
    run.to_pandas()                                # one row per image x layer (and region), flat columns
    labels = lv.categorize(run, backend="embedded")
    report = lv.analyze(labels, run)               # class distribution and grounding; report.figure() -> matplotlib
    run.save("runs/x")                             # the files `verbalize --out runs/x` writes

A model is loaded once and reused by every `verbalize` call. `verbalize` writes its run exactly as the
`verbalize` command does (services.cli.verbalize.write_run) into a temporary folder, which `save` moves
into place as the command's --out (a folder holding another run needs overwrite=True) and which is removed
with the Run object otherwise. Images may be paths (files, folders, .tar shards), PIL images, numpy arrays
([H, W, 3] uint8) or tensors ([3, H, W], floats in [0, 1] or uint8). pandas is needed only by `to_pandas`
(`pip install 'latent-verbalizer[notebook]'`).
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from latent_verbalizer.services.categorizer.analysis import Analysis
from latent_verbalizer.services.categorizer.analysis import analyze as class_distribution
from latent_verbalizer.services.categorizer.files import write_labels
from latent_verbalizer.services.categorizer.models import CaptionLabels
from latent_verbalizer.services.categorizer.report import class_figure, write_report
from latent_verbalizer.services.categorizer.stage import categorize_layers, make_labeler
from latent_verbalizer.services.cli.common import open_model, parse_layers
from latent_verbalizer.services.cli.outputs import check_out, staged_run
from latent_verbalizer.services.cli.verbalize import write_run
from latent_verbalizer.services.families import Family
from latent_verbalizer.shared.grounding import Grounding, layer_grounding, read_results, write_grounding
from latent_verbalizer.shared.images import DEFAULT_MAX_PIXELS, ImageItem, check_inputs, iter_items
from latent_verbalizer.shared.regions import Region, parse_regions
from latent_verbalizer.shared.schemas import DecodeParams, ImageResult, resolve_layers
from latent_verbalizer.shared.settings import get_settings
from latent_verbalizer.shared.tables import caption_rows

ImageLike = Any  # str | Path | PIL.Image.Image | numpy.ndarray | torch.Tensor


def load(model: str | None = None, *, pretrained: str | None = None, device: str | None = None,
         dtype: str | None = None, family: str | None = None, prompt: str | None = None) -> Model:
    """Load a model once: anything `--model` takes (an open_clip CoCa name, coca_synth_demo, llava_synth_demo,
    a Hugging Face id, a save_pretrained folder). Unset arguments take the LV_* settings' defaults, as the
    commands do; `pretrained` (CoCa only) defaults to the model's own weights."""
    s = get_settings()
    return Model(open_model(model or s.model, pretrained if pretrained is not None else s.pretrained,
                            device or s.device, dtype or s.dtype, family=family or s.family,
                            prompt=prompt if prompt is not None else s.prompt))


class Model:
    """A loaded model; `verbalize` as often as you like."""

    def __init__(self, family: Family) -> None:
        self.family = family

    @property
    def name(self) -> str:
        return self.family.name

    @property
    def num_layers(self) -> int:
        return self.family.num_layers

    def __repr__(self) -> str:
        return f"<latent_verbalizer.Model {self.family.family} {self.name}: {self.num_layers} layers>"

    def verbalize(
        self,
        images: ImageLike | Iterable[ImageLike],
        layers: Sequence[int] | str | None = None,
        *,
        grounding: bool = True,
        regions: Sequence[str | Region] | None = None,
        attributions: bool = False,
        save_features: bool = False,
        decode: DecodeParams | Mapping | None = None,
        batch_size: int = 32,
        decode_batch: int = 256,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        gallery: int | None = None,
    ) -> Run:
        """Caption every selected layer (a list, or the command's syntax "0-3, -1"; None: every layer) of every
        image, with the `verbalize` command's options. An image that cannot be read gets its `error` and
        the others complete."""
        if isinstance(layers, str):
            layers = parse_layers(layers, self.num_layers)
        layers = None if layers is None else list(layers)
        resolve_layers(layers, self.num_layers)  # a layer that does not exist: ValueError before any work
        params = decode if isinstance(decode, DecodeParams) else DecodeParams(**(decode or {}))
        texts = [r for r in regions or [] if isinstance(r, str)]
        parsed = [*parse_regions(texts), *(r for r in regions or [] if isinstance(r, Region))]
        folder = Path(tempfile.mkdtemp(prefix="latent-verbalizer-run-"))
        run = Run(folder, temporary=True)
        write_run(self.family, _items(images), folder, layers, params, batch_size=batch_size,
                  decode_batch=decode_batch, max_pixels=max_pixels, save_features=save_features,
                  grounding=grounding, gallery=gallery or get_settings().grounding_gallery,
                  attributions=attributions, regions=parsed)
        return run


def _items(images: ImageLike | Iterable[ImageLike]) -> Iterator[ImageItem]:
    """Whatever the caller gave -> the items the pipeline reads (paths as `verbalize` reads them; in-memory
    images as PNG, named image_<position>)."""
    if isinstance(images, (str, Path, Image.Image)) or hasattr(images, "shape"):
        images = [images]
    for position, image in enumerate(images):
        if isinstance(image, (str, Path)):
            check_inputs([image])
            yield from iter_items([image])
            continue
        buffer = io.BytesIO()
        _as_pil(image).convert("RGB").save(buffer, "PNG")
        yield ImageItem(id=f"image_{position}", source=f"<{type(image).__name__} #{position}>",
                        data=buffer.getvalue())


def _as_pil(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if hasattr(image, "detach"):  # a torch tensor [3, H, W]: floats in [0, 1] or uint8
        from torchvision.transforms.functional import to_pil_image

        return to_pil_image(image.detach().cpu())
    if hasattr(image, "shape"):  # a numpy array [H, W, 3] (or [H, W]) uint8
        return Image.fromarray(image)
    raise TypeError(f"not an image: {type(image).__name__} (give a path, a PIL image, an array or a tensor)")


def _pandas():
    try:
        import pandas
    except ImportError as e:
        raise ImportError("to_pandas needs pandas: pip install 'latent-verbalizer[notebook]'") from e
    return pandas


class Run:
    """One run's files (those `verbalize` writes) and their contents. A run from `Model.verbalize` lives in a
    temporary folder until `save`; `Run(path)` opens a folder the command wrote."""

    def __init__(self, path: str | Path, temporary: bool = False) -> None:
        self.path = Path(path)
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.path, True) if temporary else None

    @property
    def results(self) -> list[ImageResult]:
        """One ImageResult per image, in input order (results.jsonl)."""
        return read_results(self.path / "results.jsonl")

    @property
    def info(self) -> dict:
        """What the run records of itself (run.json: the model, its family, layers, decoding)."""
        return json.loads((self.path / "run.json").read_text())

    @property
    def prior(self) -> dict[str, str]:
        """The null (flat gray) image's caption per layer (prior.json; empty without grounding)."""
        path = self.path / "prior.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def captions(self, layer: int) -> dict[str, str]:
        """{image id: its whole-image caption at `layer`}."""
        return {r.id: c.caption for r in self.results for c in r.layers or [] if c.layer == layer}

    def to_pandas(self):
        """A DataFrame with one row per image x layer (and region x layer): id, source, region, layer, caption,
        mean_entropy and every grounding column (shared.tables, as captions.csv)."""
        return _pandas().DataFrame(list(caption_rows(self.results)))

    def save(self, out: str | Path, overwrite: bool = False) -> Path:
        """Put the run's files in `out`, as `verbalize --out out` would (a folder holding another run needs
        overwrite=True, which replaces it whole; the files move only once they are all there)."""
        out = Path(out)
        check_out(out, overwrite)
        with staged_run(out, "verbalize") as tmp:
            shutil.copytree(self.path, tmp, dirs_exist_ok=True)
        if self._cleanup is not None:
            self._cleanup()
            self._cleanup = None
        self.path = out
        return out

    def __repr__(self) -> str:
        return f"<latent_verbalizer.Run {self.path}>"


@dataclass
class Labels:
    """Every caption's phrases and labels, per layer (labels.json's content)."""

    layers: dict[int, list[CaptionLabels]]
    ids: dict[int, list[str]]
    entropies: dict[int, list[float]]

    def save(self, path: str | Path) -> Path:
        """labels.json, as `categorize --out` writes it."""
        write_labels(Path(path), self.layers, self.ids, self.entropies)
        return Path(path)


def categorize(run: Run, backend: str = "embedded") -> Labels:
    """Label every whole-image caption's phrases with the taxonomy (the `categorize` command's labelers:
    "embedded", offline; "openai", the LLM server the LV_LLM_* settings name)."""
    captioned = [r for r in run.results if r.layers]
    layers = sorted({c.layer for r in captioned for c in r.layers})
    ids = {layer: [r.id for r in captioned] for layer in layers}
    texts = {layer: [c.caption for r in captioned for c in r.layers if c.layer == layer] for layer in layers}
    entropies = {layer: [c.mean_entropy for r in captioned for c in r.layers if c.layer == layer] for layer in layers}
    return Labels(categorize_layers(texts, make_labeler(backend)), ids, entropies)


@dataclass
class Report:
    """Per layer, which kinds of information the captions name (`analysis`) and whether they are grounded
    (`grounding`, when the run has its measures)."""

    analysis: Analysis
    grounding: Grounding | None

    def figure(self):
        """The class distribution's stacked areas over layers (figure.png) as a matplotlib Figure."""
        return class_figure(self.analysis)

    def to_pandas(self):
        """The class distribution (distribution.csv): rows layers, columns merged classes, mean percentages."""
        pd = _pandas()
        return pd.DataFrame(self.analysis.percent, index=pd.Index(self.analysis.layers, name="layer"),
                            columns=self.analysis.classes)

    def save(self, out: str | Path) -> list[Path]:
        """distribution.csv, figure.png, entropy.png, summary.json (and grounding.csv/png), as `analyze` writes."""
        out = Path(out)
        extra = {"grounding": self.grounding.summary()} if self.grounding else {}
        paths = write_report(self.analysis, out, extra)
        return paths + (write_grounding(self.grounding, out) if self.grounding else [])


def analyze(labels: Labels, run: Run | None = None) -> Report:
    """The per-layer class distribution of the labels, with the run's grounding per layer when given."""
    analysis = class_distribution(labels.layers, labels.entropies)
    grounding = layer_grounding([r for r in run.results if r.layers]) if run is not None else None
    return Report(analysis, grounding)


def compare(runs: Sequence[Run | str | Path], out: str | Path, names: Sequence[str] | None = None) -> list[Path]:
    """The `compare` command: two or more runs side by side (layers aligned by relative depth) into `out`."""
    from latent_verbalizer.services.categorizer.compare import read_run, run_names, write_comparison

    paths = [r.path if isinstance(r, Run) else Path(r) for r in runs]
    chosen = run_names(paths, list(names) if names else None)
    return write_comparison([read_run(p, n) for p, n in zip(paths, chosen)], Path(out))
