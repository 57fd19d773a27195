"""Region captions ride in the same decode batch as their images' rows.

The encoder stage gives every image's latents [L, n, N, D] and, with regions, either each region's own
latents [L, n, R, N, D] (CoCa: its pooler over the region's tokens) or a mask [n, R, N] over the image's
N positions (LLaVA, BLIP: the image's latents, of which the region's rows read only those positions).
A region is decoded as one more "image": its rows follow the n images' rows, with its own sampling key
(the image's id and the region's label), so `decode_layers` and `caption_grounded` caption them
unchanged. With grounding, a region's caption is scored against its WHOLE image's embedding (the model
has no embedding of a region), compared with the gray image's caption at its layer (the prior) and with
the same region's caption at the deepest layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from latent_verbalizer.services.decoder.attribution import Captioned, per_image
from latent_verbalizer.services.families.base import Encoded
from latent_verbalizer.shared.regions import Region
from latent_verbalizer.shared.schemas import LayerCaption, RegionResult


def region_id(image_id: str, label: str) -> str:
    """The row id of an image's region (sampling keys: services.decoder.stage.row_key)."""
    return f"{image_id}\0region\0{label}"


def with_regions(
    encoded: Encoded, image_ids: list[str], regions: Sequence[Region],
) -> tuple[torch.Tensor, list[str], torch.Tensor | None, torch.Tensor | None]:
    """The images' rows, then each image's regions' -> (latents [L, n + n*R, N, D], their ids, (grounding)
    image embeddings [n + n*R, E] (a region's is its image's), and the positions each reads [n + n*R, N]
    (None when every row reads all: regions with latents of their own))."""
    latents, image = encoded.latents, encoded.image_embeddings
    (L, n, N), R = latents.shape[:3], len(regions)
    masks = None
    if encoded.region_latents is not None:
        region_rows = encoded.region_latents.reshape(L, n * R, *latents.shape[2:]).to(latents)
    else:  # the image's latents again, each region's rows reading its positions only
        region_rows = latents.repeat_interleave(R, dim=1)  # [L, n*R, N, D]
        whole = torch.ones(n, N, dtype=torch.bool, device=latents.device)
        masks = torch.cat([whole, encoded.region_mask.reshape(n * R, N).to(whole.device)])
    rows = torch.cat([latents, region_rows], dim=1)
    ids = image_ids + [region_id(i, r.label) for i in image_ids for r in regions]
    if image is not None:
        image = torch.cat([image, image.repeat_interleave(R, dim=0)])
    return rows, ids, image, masks


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
    attention: list[torch.Tensor], pool_attention: torch.Tensor | None,
) -> list[list[Captioned]]:
    """Per image, what its word -> patch maps are made of: its own captions' part, then region k's
    (k = 0, 1, ...). captions: per image (L layers); region_captions: per image, per region; attention: the
    decoded rows' attention in `with_regions` order (n*(1+R)*L); pool_attention [L, n, 1+R, N, T]: CoCa's
    pooler weights for the whole image (index 0) and each region (1+k); None: the attention is over the
    image positions themselves."""
    n = len(captions)
    L, R = len(captions[0]) if n else 0, len(region_captions[0]) if n else 0

    def pool(k: int) -> torch.Tensor | None:
        return None if pool_attention is None else pool_attention[:, :, k]

    parts = [[part] for part in per_image(captions, attention[: n * L], pool(0))]
    for k in range(R):
        rows = [n + i * R + k for i in range(n)]  # region k's decoded rows, one per image (L layers each)
        rows_attention = [a for r in rows for a in attention[r * L : (r + 1) * L]]
        region_k = [region_captions[i][k] for i in range(n)]
        for image, part in zip(parts, per_image(region_k, rows_attention, pool(1 + k), k)):
            image.append(part)
    return parts
