"""The in-process pipeline: encoder stage -> decoder stage in one process, no Redis.
The CLI's `verbalize` and the benchmarks drive it; the RQ workers call the same stage functions. It
knows the model only through the family interface (services.families), and data flows one way:

    images -> load_pixels -> encode_batch (family.encode; the null image too) -> caption_batch
           (family.stepper / family.score through the one decoding loop) -> results and measures

Grounding (services.decoder.grounding): give `verbalize` a `RunEmbeddings` and every caption gets its
per-caption measures as it is yielded; the retrieval ranks need every image of the run, so they come
after the last result: `embeddings.ranks(gallery)`, applied with `with_ranks` / `rewrite_with_ranks`.

Word -> patch attributions (services.decoder.attribution): give `verbalize` an `attributions_dir` and every
caption's tokens get their maps over the layer's patch grid, one file per image there (shared.attributions).
The captions are the same as without: the latents come from the same pooler call, the pooler's weights
from a second, explicit one.

Regions (services.encoder.regions): the same blocks' hidden states pooled once more per region (a key
mask), the regions' rows decoded in the same batch as the images' (services.decoder.regions)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

import torch
from safetensors.torch import save_file

from latent_verbalizer.services.decoder.captions import caption_batch, write_maps
from latent_verbalizer.services.decoder.grounding import RunEmbeddings
from latent_verbalizer.services.decoder.regions import region_results
from latent_verbalizer.services.encoder.regions import Located, place
from latent_verbalizer.services.encoder.stage import encode_batch, load_pixels
from latent_verbalizer.services.families import Family
from latent_verbalizer.shared.images import DEFAULT_MAX_PIXELS, ImageItem
from latent_verbalizer.shared.regions import Region
from latent_verbalizer.shared.schemas import DecodeParams, ImageResult, LayerCaption, resolve_layers


def _batches(items: Iterable[ImageItem], size: int) -> Iterator[list[ImageItem]]:
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch


def verbalize(
    family: Family,
    items: Iterable[ImageItem],
    layers: list[int] | None = None,
    params: DecodeParams = DecodeParams(),
    batch_size: int = 32,
    decode_batch: int = 256,
    features_dir: Path | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    grounding: RunEmbeddings | None = None,
    attributions_dir: Path | None = None,
    regions: list[Region] | None = None,
) -> Iterator[ImageResult]:
    """Caption every selected layer of every item, `batch_size` images per vision forward.
    Yields one result per item, in input order; an unusable image yields its error instead.
    With `features_dir`, each image's raw per-block residual stream is saved there as
    <id>.safetensors (tensors block_<i> [T, C], fp16). With `grounding`, the captions carry their
    grounding measures and the run's embeddings are added to it (for the ranks). With `attributions_dir`,
    each image's word -> patch maps are written there as <id>.safetensors (shared.attributions). With
    `regions` (shared.regions.parse_regions), every region of every image is captioned at every layer too;
    a region that covers no patch of an image fails on that image alone (its `error` in the region's entry)."""
    layers = resolve_layers(layers, family.num_layers)
    regions = regions or []
    if attributions_dir is not None:
        family.require("attributions")
    for batch in _batches(items, batch_size):
        pixels, good, errors = load_pixels(family, batch, max_pixels)
        located = place(family, good, regions)  # a region covering no patch of an image: that region's error
        results = {}
        if pixels is not None:
            ids = [i.id for i in good]
            if features_dir is not None:
                _save_features(features_dir, good, layers, family.hidden_states(pixels, layers))
            mask = torch.stack([p.mask for p in located]) if regions else None  # [n, R, T]
            encoded = encode_batch(family, pixels, layers, grounding=grounding is not None, key_mask=mask,
                                   attributions=attributions_dir is not None)
            captioned = caption_batch(family, encoded, layers, ids, regions, params, decode_batch,
                                      grounding is not None, attributions_dir is not None)
            if grounding is not None:
                grounding.add(ids, *captioned.ranked_embeddings(), captioned.grounded.null_captions)
            if attributions_dir is not None:
                write_maps(family, attributions_dir, ids, [p.input_box for p in located], captioned, encoded)
            results = {item.id: _result(item, place_, caps, regions, region_caps) for item, place_, caps, region_caps
                       in zip(good, located, captioned.captions, captioned.region_captions)}
        for item in batch:
            yield results.get(item.id) or ImageResult(id=item.id, source=item.source, meta=item.meta,
                                                      error=errors[item.id])


def _result(item: ImageItem, located: Located, captions: list[LayerCaption], regions: list[Region],
            region_captions: list[list[LayerCaption]]) -> ImageResult:
    return ImageResult(
        id=item.id, source=item.source, meta=item.meta, layers=captions, size=list(located.size),
        input_box=list(located.input_box),
        regions=region_results(regions, located.boxes, located.patches, located.errors, region_captions)
        if regions else None,
    )


def _save_features(out: Path, items: list[ImageItem], layers: list[int], hidden) -> None:
    for j, item in enumerate(items):
        path = out / f"{item.id}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({f"block_{layer}": hidden[i, j].half().contiguous() for i, layer in enumerate(layers)},
                  str(path))
