"""The in-process pipeline: encoder stage -> decoder stage in one process, no Redis.
The CLI's `verbalize` and the benchmarks drive it; the RQ workers call the same stage functions.

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

from services.decoder import attribution
from services.decoder.grounding import RunEmbeddings, caption_grounded
from services.decoder.regions import attribution_parts, region_results, split_regions, with_regions
from services.decoder.stage import decode_layers, layer_captions
from services.encoder.regions import Located, input_box, place, with_whole_image
from services.encoder.stage import (
    capture_blocks,
    check_layers,
    load_pixels,
    pool_grounded,
    pool_layers,
    pool_regions,
    with_last,
)
from shared.attributions import attribution_path, write_attributions
from shared.images import DEFAULT_MAX_PIXELS, ImageItem
from shared.models import LoadedModel
from shared.regions import Region
from shared.schemas import DecodeParams, ImageResult, LayerCaption


def _batches(items: Iterable[ImageItem], size: int) -> Iterator[list[ImageItem]]:
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch


def verbalize(
    lm: LoadedModel,
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
    an image where a region covers no patch fails with that region's message."""
    visual = lm.model.visual
    layers = check_layers(visual, layers)
    L, regions = len(layers), regions or []
    captured = layers if grounding is None else with_last(visual, layers)  # grounding: the whole tower
    for batch in _batches(items, batch_size):
        pixels, good, errors = load_pixels(lm, batch, max_pixels)
        pixels, good, located = place(lm, pixels, good, regions, errors)  # a region covering no patch: an error
        results = {}
        if pixels is not None:
            ids = [i.id for i in good]
            hidden = capture_blocks(visual, pixels, captured)  # [L', n, T, C]
            if features_dir is not None:
                _save_features(features_dir, good, layers, hidden)
            if grounding is None:
                latents, image_embeddings = pool_layers(visual, hidden), None  # [L, n, Q-1, D]
            else:
                latents, image_embeddings = pool_grounded(visual, hidden, layers)  # [L, n, Q-1, D], [n, E]
            row_ids, mask = ids, None
            if regions:  # each image's regions' rows follow the images' rows
                mask = torch.stack([p.mask for p in located]).to(hidden.device)  # [n, R, T]
                region_latents = pool_regions(visual, hidden[:L], mask)[0]  # [L, n, R, Q-1, D]
                latents, row_ids, image_embeddings = with_regions(latents, region_latents, ids, regions,
                                                                  image_embeddings)
            attend = attributions_dir is not None
            if grounding is None:
                decoded = decode_layers(lm, latents, layers, row_ids, params, decode_batch, attend)
                per_row = layer_captions(decoded, layers, len(row_ids))
                attention = [d.cross_attention for d in decoded]
            else:
                grounded = caption_grounded(lm, latents, image_embeddings, layers, row_ids, params, decode_batch,
                                            attend)
                n = len(ids)  # the ranks are the whole images' only
                grounding.add(ids, grounded.text_embeddings[:n], grounded.image_embeddings[:n], grounded.null_captions)
                per_row, attention = grounded.captions, grounded.cross_attention
            per_image, per_region = split_regions(per_row, len(ids))
            if attributions_dir is not None:  # the pooler's weights for the whole image and each region
                keys = with_whole_image(mask, len(ids), hidden.shape[2], hidden.device)  # [n, 1+R, T]
                pool_attention = pool_regions(visual, hidden[:L], keys, weights=True)[1]  # [L, n, 1+R, Q-1, T]
                parts = attribution_parts(per_image, per_region, attention, pool_attention)
                _save_attributions(lm, attributions_dir, good, parts)
            results = {item.id: _result(item, place_, caps, regions, region_caps)
                       for item, place_, caps, region_caps in zip(good, located, per_image, per_region)}
        for item in batch:
            yield results.get(item.id) or ImageResult(id=item.id, source=item.source, meta=item.meta,
                                                      error=errors[item.id])


def _result(item: ImageItem, located: Located, captions: list[LayerCaption], regions: list[Region],
            region_captions: list[list[LayerCaption]]) -> ImageResult:
    return ImageResult(
        id=item.id, source=item.source, meta=item.meta, layers=captions, size=list(located.size),
        input_box=list(located.input_box),
        regions=region_results(regions, located.boxes, located.patches, region_captions) if regions else None,
    )


def _save_attributions(lm: LoadedModel, out: Path, items: list[ImageItem],
                       parts: list[list[attribution.Captioned]]) -> None:
    """Each item's file, from its captions' parts (the whole image's, then its regions')."""
    grid = tuple(lm.model.visual.grid_size)
    for item, image_parts in zip(items, parts):
        maps = attribution.attributions(lm.tokenizer, grid, input_box(lm.preprocess, *item.size), image_parts)
        write_attributions(attribution_path(out, item.id), maps)


def _save_features(out: Path, items: list[ImageItem], layers: list[int], hidden) -> None:
    for j, item in enumerate(items):
        path = out / f"{item.id}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({f"block_{layer}": hidden[i, j].half().contiguous() for i, layer in enumerate(layers)},
                  str(path))
