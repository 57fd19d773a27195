"""`latent-verbalizer verbalize PATH... --out DIR`: the embedded pipeline, one process, no Redis.

Writes DIR/results.jsonl (one ImageResult per input image, in input order, streamed as it goes) and
DIR/captions.json ({"layer_<i>": [captions of the images that succeeded, in results order]}) and
DIR/run.json (the run's summary: the model's family, name, weights, prompt, layers and extras, with
notes on what a family lacks, and the decoding parameters) and DIR/captions.csv (one row per image x
layer and region x layer, with every scalar caption field: shared.tables).
With grounding (the default; --no-grounding turns it off) every caption carries its grounding
measures; once the last image is done results.jsonl is rewritten with the retrieval ranks, and
DIR/prior.json holds the gray image's caption per layer ({"layer_<i>": caption}). With --attributions,
DIR/attributions/<id>.safetensors holds each image's word -> patch maps (shared.attributions). With
--region / --regions, each result also has its regions' captions at every layer (`regions`), and
DIR/regions.csv has them one row per region and layer."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path

from latent_verbalizer.services.cli.common import (
    add_decode_args,
    add_model_args,
    decode_params_from_args,
    layers_from_args,
    model_from_args,
    positive_int,
)
from latent_verbalizer.services.cli.outputs import check_out, staged_run
from latent_verbalizer.services.cli.progress import Progress
from latent_verbalizer.services.decoder.grounding import RunEmbeddings, rewrite_with_ranks, write_prior
from latent_verbalizer.services.families import Family
from latent_verbalizer.services.pipeline import verbalize
from latent_verbalizer.shared.images import DEFAULT_MAX_PIXELS, IMAGE_EXTS, ImageItem, check_inputs, iter_items
from latent_verbalizer.shared.models import ModelError
from latent_verbalizer.shared.regions import Region, check_coverable, parse_regions
from latent_verbalizer.shared.schemas import DecodeParams, resolve_layers
from latent_verbalizer.shared.settings import get_settings
from latent_verbalizer.shared.tables import REGION_COLUMNS, region_rows, write_captions_csv

log = logging.getLogger("verbalize")


def add_arguments(p: argparse.ArgumentParser) -> None:
    s = get_settings()
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files, directories, webdataset .tar shards")
    p.add_argument("--out", required=True, type=Path,
                   help="output directory (new or empty; a folder holding an earlier run needs --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the earlier run in --out whole (only once this run has succeeded)")
    p.add_argument("--layers", default=None,
                   help="vision blocks to caption, e.g. 0,5,-1 or 0-11 (negative: from the end; default all)")
    add_model_args(p)
    add_decode_args(p)
    g = p.add_argument_group("batching and memory")
    g.add_argument("--batch-size", type=positive_int, default=s.encode_batch, help="images per vision forward")
    g.add_argument("--decode-batch", type=positive_int, default=s.decode_batch,
                   help="caption rows (images x layers) decoded together")
    g.add_argument("--max-pixels", type=positive_int, default=DEFAULT_MAX_PIXELS, help="refuse larger images")
    p.add_argument("--save-features", action="store_true",
                   help="also save each image's raw per-block outputs to DIR/features/<id>.safetensors")
    p.add_argument("--attributions", action="store_true",
                   help="also save, per image, every caption token's map over the layer's patches (which patches"
                        " the word was read from) to DIR/attributions/<id>.safetensors")
    g = p.add_argument_group("regions (what does a layer know about THIS part of the image?)")
    g.add_argument("--region", action="append", default=[], metavar="[NAME=]X0,Y0,X1,Y1",
                   help="caption this box of every image too, at every layer: edges in the image's pixels, or"
                        " fractions of its size when all four are in [0, 1] (0,0,0.5,1: the left half); repeatable")
    g.add_argument("--regions", metavar="grid:RxC", help="caption each cell of an R x C grid over the image")
    g.add_argument("--region-cls", action="store_true",
                   help="regions read the class token too (it has seen the whole image); default: patches only")
    g = p.add_argument_group("grounding (is each caption about its image?)")
    g.add_argument("--no-grounding", dest="grounding", action="store_false",
                   help="skip image_score, retrieval_rank, prior and last_layer_similarity")
    g.add_argument("--gallery", type=int, default=s.grounding_gallery,
                   help="most images a caption's retrieval rank is taken among (default %(default)s)")


def run(args: argparse.Namespace) -> int:
    try:
        params = decode_params_from_args(args)
        layers = layers_from_args(args)
        check_inputs(args.paths)
        items = iter_items(args.paths)
        if args.gallery < 2:
            raise ValueError(f"--gallery {args.gallery}: a gallery needs at least 2 images")
        regions = regions_from_args(args)
        check_out(args.out, args.overwrite, args.paths)
        family = model_from_args(args)
        resolve_layers(layers, family.num_layers)
        if regions:
            family.require("regions")
            check_coverable(regions, family.geometry.image_size, family.geometry.patch_size)
        if args.attributions:
            family.require("attributions")
    except (ModelError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # Everything is written into a folder beside --out that replaces it only when the run has succeeded.
    try:
        with staged_run(args.out, "verbalize") as tmp:
            n_ok, n_err = write_run(family, items, tmp, layers, params, batch_size=args.batch_size,
                                    decode_batch=args.decode_batch, max_pixels=args.max_pixels,
                                    save_features=args.save_features, grounding=args.grounding,
                                    gallery=args.gallery, attributions=args.attributions, regions=regions,
                                    total=_count_images(args.paths))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}; {args.out} is as it was", file=sys.stderr)
        return 2
    log.info("written", extra={"out": str(args.out)})
    return 0 if n_ok or not n_err else 1


def _count_images(paths: list[str]) -> int | None:
    """How many items the inputs make, for the progress bar; None when a .tar shard is among them."""
    n = 0
    for path in map(Path, paths):
        files = [f for f in path.rglob("*") if f.is_file()] if path.is_dir() else [path]
        if any(f.suffix.lower() == ".tar" for f in files):
            return None
        n += sum(f.suffix.lower() in IMAGE_EXTS for f in files) if path.is_dir() else 1
    return n


def regions_from_args(args: argparse.Namespace) -> list[Region]:
    """--region (repeated), --regions grid:RxC, --region-cls -> the run's regions (none: []); RegionError
    names a bad one."""
    texts = [*args.region, *([args.regions] if args.regions else [])]
    if args.region_cls and not texts:
        raise ValueError("--region-cls applies to regions: give --region or --regions too")
    return parse_regions(texts, args.region_cls)


def write_run(
    family: Family,
    items: Iterable[ImageItem],
    out: Path,
    layers: list[int] | None = None,
    params: DecodeParams = DecodeParams(),
    *,
    batch_size: int = 32,
    decode_batch: int = 256,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    save_features: bool = False,
    grounding: bool = True,
    gallery: int = 1000,
    attributions: bool = False,
    regions: list[Region] | None = None,
    total: int | None = None,
) -> tuple[int, int]:
    """Verbalize `items` into `out` (results.jsonl, captions.json, captions.csv, run.json, prior.json with
    grounding, regions.csv with regions); the `verbalize` command, `demo` and the Python API write their runs
    with it. -> (images captioned, images failed)."""
    out.mkdir(parents=True, exist_ok=True)
    captions: dict[str, list[str]] = {}
    n_ok = n_err = 0
    progress = Progress(log, "verbalize", "images", "captions", total)
    embeddings = RunEmbeddings() if grounding else None
    results = verbalize(family, items, layers, params, batch_size, decode_batch,
                        out / "features" if save_features else None, max_pixels, embeddings,
                        out / "attributions" if attributions else None, regions)
    with ExitStack() as files:
        f = files.enter_context(open(out / "results.jsonl", "w"))
        table = csv.writer(files.enter_context(open(out / "regions.csv", "w", newline=""))) if regions else None
        if table is not None:
            table.writerow(REGION_COLUMNS)
        for r in results:
            f.write(r.model_dump_json(exclude_none=True) + "\n")
            if table is not None:
                table.writerows(region_rows(r))
            progress.update(1, len(r.layers or []) + sum(len(region.layers) for region in r.regions or []))
            if r.error:
                n_err += 1
                log.warning("image failed", extra={"id": r.id, "source": r.source, "reason": r.error})
                continue
            n_ok += 1
            for c in r.layers:
                captions.setdefault(f"layer_{c.layer}", []).append(c.caption)
    (out / "captions.json").write_text(json.dumps(captions, indent=1))
    run = {**family.describe(), "selected_layers": layers, "decode": params.model_dump(), "grounding": grounding}
    (out / "run.json").write_text(json.dumps(run, indent=1))
    if embeddings is not None and embeddings.ids:
        rewrite_with_ranks(out / "results.jsonl", embeddings.ranks(gallery))
        write_prior(out / "prior.json", embeddings.null_captions)
    write_captions_csv(out / "results.jsonl", out / "captions.csv")
    progress.close(errors=n_err)
    return n_ok, n_err
