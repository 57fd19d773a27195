"""Region captions ride in the same decode batch as their images' rows.

The encoder stage gives every image's latents [L, n, Q-1, D] and, with regions, each region's
[L, n, R, Q-1, D] (services.encoder.stage.pool_regions). A region is decoded as one more "image": its
rows follow the n images' rows, with its own sampling key (the image's id and the region's label), so
`decode_layers` and `caption_grounded` caption them unchanged. With grounding, a region's caption is
scored against its WHOLE image's embedding (the model has no embedding of a region), compared with the
gray image's caption at its layer (the prior) and with the same region's caption at the deepest layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from latent_verbalizer.services.decoder.attribution import Captioned, per_image
from latent_verbalizer.shared.regions import Region
from latent_verbalizer.shared.schemas import LayerCaption, RegionResult


def region_id(image_id: str, label: str) -> str:
    """The row id of an image's region (sampling keys: services.decoder.stage.row_key)."""
    return f"{image_id}\0region\0{label}"


def with_regions(
    latents: torch.Tensor, region_latents: torch.Tensor, image_ids: list[str], regions: Sequence[Region],
    image_embeddings: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[str], torch.Tensor | None]:
    """latents [L, n, N, D] + region_latents [L, n, R, N, D] -> rows of both [L, n + n*R, N, D] (the images,
    then each image's regions), their ids, and (grounding) image embeddings [n, E] -> [n + n*R, E]: a
    region's is its image's."""
    L, n, R = region_latents.shape[:3]
    rows = torch.cat([latents, region_latents.reshape(L, n * R, *region_latents.shape[3:]).to(latents)], dim=1)
    ids = image_ids + [region_id(i, r.label) for i in image_ids for r in regions]
    if image_embeddings is not None:
        image_embeddings = torch.cat([image_embeddings, image_embeddings.repeat_interleave(R, dim=0)])
    return rows, ids, image_embeddings


def split_regions(per_row: list[list[LayerCaption]], n: int) -> tuple[list[list[LayerCaption]], list[list]]:
    """Captions of `with_regions` rows -> (per image its captions, per image its regions' captions)."""
    R = (len(per_row) - n) // n if n else 0
    return per_row[:n], [per_row[n + i * R : n + (i + 1) * R] for i in range(n)]


def region_results(regions: Sequence[Region], boxes: Sequence[Sequence[float]], patches: Sequence[int],
                   errors: Sequence[str | None], captions: Sequence[list[LayerCaption]]) -> list[RegionResult]:
    """One image's RegionResults, in the regions' order; a region that failed on this image (its error
    from services.encoder.regions.locate) has no captions (its placeholder row's are dropped)."""
    return [RegionResult(region=r, box=list(b), patches=p, layers=[], error=e) if e is not None
            else RegionResult(region=r, box=list(b), patches=p, layers=c)
            for r, b, p, e, c in zip(regions, boxes, patches, errors, captions, strict=True)]


def attribution_parts(
    captions: list[list[LayerCaption]], region_captions: list[list[list[LayerCaption]]],
    attention: list[torch.Tensor], pool_attention: torch.Tensor,
) -> list[list[Captioned]]:
    """Per image, what its word -> patch maps are made of: its own captions' part, then region k's
    (k = 0, 1, ...). captions: per image (L layers); region_captions: per image, per region; attention: the
    decoded rows' cross-attention in `with_regions` order (n*(1+R)*L); pool_attention [L, n, 1+R, Q-1, T]:
    the pooler's weights for the whole image (index 0) and each region (1+k)."""
    L, n, R = pool_attention.shape[0], len(captions), pool_attention.shape[2] - 1
    parts = [[part] for part in per_image(captions, attention[: n * L], pool_attention[:, :, 0])]
    for k in range(R):
        rows = [n + i * R + k for i in range(n)]  # region k's decoded rows, one per image (L layers each)
        rows_attention = [a for r in rows for a in attention[r * L : (r + 1) * L]]
        region_k = [region_captions[i][k] for i in range(n)]
        for image, part in zip(parts, per_image(region_k, rows_attention, pool_attention[:, :, 1 + k], k)):
            image.append(part)
    return parts
