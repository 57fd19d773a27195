"""The in-process pipeline: encoder stage -> decoder stage in one process, no Redis.
The CLI's `verbalize` and the benchmarks drive it; the RQ workers call the same stage functions.

Grounding (services.decoder.grounding): give `verbalize` a `RunEmbeddings` and every caption gets its
per-caption measures as it is yielded; the retrieval ranks need every image of the run, so they come
after the last result: `embeddings.ranks(gallery)`, applied with `with_ranks` / `rewrite_with_ranks`."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

from safetensors.torch import save_file

from services.decoder.grounding import RunEmbeddings, caption_grounded
from services.decoder.stage import caption_layers
from services.encoder.stage import capture_blocks, check_layers, load_pixels, pool_grounded, pool_layers, with_last
from shared.images import DEFAULT_MAX_PIXELS, ImageItem
from shared.models import LoadedModel
from shared.schemas import DecodeParams, ImageResult


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
) -> Iterator[ImageResult]:
    """Caption every selected layer of every item, `batch_size` images per vision forward.
    Yields one result per item, in input order; an unusable image yields its error instead.
    With `features_dir`, each image's raw per-block residual stream is saved there as
    <id>.safetensors (tensors block_<i> [T, C], fp16). With `grounding`, the captions carry their
    grounding measures and the run's embeddings are added to it (for the ranks)."""
    visual = lm.model.visual
    layers = check_layers(visual, layers)
    captured = layers if grounding is None else with_last(visual, layers)  # grounding: the whole tower
    for batch in _batches(items, batch_size):
        pixels, good, errors = load_pixels(lm, batch, max_pixels)
        captions = {}
        if pixels is not None:
            ids = [i.id for i in good]
            hidden = capture_blocks(visual, pixels, captured)  # [L', n, T, C]
            if features_dir is not None:
                _save_features(features_dir, good, layers, hidden)
            if grounding is None:
                per_image = caption_layers(lm, pool_layers(visual, hidden), layers, ids, params, decode_batch)
            else:
                latents, image_embeddings = pool_grounded(visual, hidden, layers)  # [L, n, Q-1, D], [n, E]
                grounded = caption_grounded(lm, latents, image_embeddings, layers, ids, params, decode_batch)
                grounding.add_grounded(ids, grounded)
                per_image = grounded.captions
            captions = {item.id: caps for item, caps in zip(good, per_image)}
        for item in batch:
            if item.id in captions:
                yield ImageResult(id=item.id, source=item.source, meta=item.meta, layers=captions[item.id])
            else:
                yield ImageResult(id=item.id, source=item.source, meta=item.meta, error=errors[item.id])


def _save_features(out: Path, items: list[ImageItem], layers: list[int], hidden) -> None:
    for j, item in enumerate(items):
        path = out / f"{item.id}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({f"block_{layer}": hidden[i, j].half().contiguous() for i, layer in enumerate(layers)},
                  str(path))
