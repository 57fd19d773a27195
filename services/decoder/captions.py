"""The decoder stage on one encoded batch, as the in-process pipeline and the decoder worker both run it:

    Encoded (services.encoder.stage.encode_batch)
      -> the images' rows, then their regions' rows (services.decoder.regions.with_regions)
      -> one decode, grounded (services.decoder.grounding) or not, keeping the cross-attention on request
      -> per image its captions at every layer, and its regions'
and, with attributions, each image's word -> patch maps (services.decoder.attribution) written to one
file per image (shared.attributions).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from latent_verbalizer.services.decoder import attribution
from latent_verbalizer.services.decoder.grounding import Grounded, caption_grounded
from latent_verbalizer.services.decoder.regions import attribution_parts, split_regions, with_regions
from latent_verbalizer.services.decoder.stage import decode_layers, layer_captions
from latent_verbalizer.services.families import Family
from latent_verbalizer.services.families.base import Encoded
from latent_verbalizer.shared.attributions import attribution_path, write_attributions
from latent_verbalizer.shared.regions import Region
from latent_verbalizer.shared.schemas import DecodeParams, LayerCaption

Box = tuple[float, float, float, float]


@dataclass
class CaptionedBatch:
    captions: list[list[LayerCaption]]  # per image, per layer
    region_captions: list[list[list[LayerCaption]]]  # per image, per region, per layer
    grounded: Grounded | None  # with grounding: every row's embeddings (the images' rows first) and the prior
    cross_attention: list | None  # with attention: per decoded row (images' then regions', L each) [steps, Q-1]

    def ranked_embeddings(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(text [n, L, E], image [n, E]) of the whole images: the retrieval ranks are theirs only (None, None:
        the family has no contrastive head)."""
        n, g = len(self.captions), self.grounded
        if g.text_embeddings is None:
            return None, None
        return g.text_embeddings[:n], g.image_embeddings[:n]


def caption_batch(
    family: Family, encoded: Encoded, layers: list[int], ids: list[str], regions: list[Region],
    params: DecodeParams, batch_rows: int, grounding: bool, attention: bool,
) -> CaptionedBatch:
    """Caption n images (`ids`, in `encoded`'s order) and their regions at every layer, in one decode."""
    latents, row_ids, image, masks = encoded.latents, ids, encoded.image_embeddings, None
    if regions:  # each image's regions' rows follow the images' rows
        latents, row_ids, image, masks = with_regions(encoded, ids, regions)
    grounded = None
    if grounding:
        grounded = caption_grounded(family, latents, image, encoded.null_latents, layers, row_ids, params,
                                    batch_rows, attention, masks)
        per_row, cross = grounded.captions, grounded.cross_attention
    else:
        decoded = decode_layers(family, latents, layers, row_ids, params, batch_rows, attention, masks)
        per_row, cross = layer_captions(decoded, layers, len(row_ids)), [d.cross_attention for d in decoded]
    per_image, per_region = split_regions(per_row, len(ids))
    return CaptionedBatch(per_image, per_region, grounded, cross)


def write_maps(family: Family, out: Path, ids: list[str], input_boxes: list[Box], batch: CaptionedBatch,
               encoded: Encoded) -> None:
    """Each image's word -> patch maps (its captions', then its regions'), from the decoded rows' attention
    and, for CoCa, its pooler's (`Encoded.pool_attention` [L, n, 1+R, N, T]), to out/<id>.safetensors."""
    pool = encoded.pool_attention
    method = attribution.METHOD if pool is not None else attribution.DIRECT_METHOD.format(family=family.family)
    parts = attribution_parts(batch.captions, batch.region_captions, batch.cross_attention, pool)
    for image_id, box, image_parts in zip(ids, input_boxes, parts, strict=True):
        maps = attribution.attributions(family.token_texts, family.geometry.grid, tuple(box), image_parts, method)
        write_attributions(attribution_path(out, image_id), maps)
