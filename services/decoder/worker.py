"""RQ task of the decoder stage: a chunk's latents -> one caption per layer per image (ImageResult
lines, per-image errors carried through). The worker process loads the model once (`services.tasks.use_model`).
A grounded job's captions carry their grounding measures, and the chunk's image and text embeddings
and the gray image's captions go to the artifact store for the job's finish step (the ranks). A job's
regions are captioned in the same decode as its images (services.decoder.regions). With
attributions, each image's word -> patch maps go straight to the job's outputs
(attributions/<id>.safetensors, services.decoder.attribution)."""

from __future__ import annotations

import torch

from services.decoder import attribution
from services.decoder.grounding import caption_grounded
from services.decoder.regions import attribution_parts, region_results, split_regions, with_regions
from services.decoder.stage import decode_layers, layer_captions
from services.tasks import ChunkOutcome, Context, loaded_model, run_chunk
from shared.attributions import attribution_path, write_attributions
from shared.jobs import JobRecord
from shared.models import LoadedModel
from shared.schemas import ImageResult, LayerCaption


def decode_chunk(job_id: str, chunk: int) -> None:
    run_chunk("decode", job_id, chunk, lambda ctx, job: _decode(ctx, job, chunk))


def _decode(ctx: Context, job: JobRecord, chunk: int) -> ChunkOutcome:
    lm = loaded_model("decoder")
    latents, info = ctx.store.read_latents(job.id, chunk)
    regions, ids = job.options.regions, info["encoded"]
    fields: dict[str, dict] = {}  # image id -> its result's fields
    grounding: tuple[dict, dict] = ({}, {"ids": [], "prior": {}})  # what the finish step reads
    if latents is not None:
        n, layers = len(ids), info["layers"]
        image = ctx.store.read_tensors(job.id, "image_embeddings", chunk)[0]["image"] if job.options.grounding else None
        row_ids = ids
        if regions:  # each image's regions' rows follow the images' rows
            region_latents = ctx.store.read_tensors(job.id, "region_latents", chunk)[0]["latents"]  # [L, n, R, Q-1, D]
            latents, row_ids, image = with_regions(latents, region_latents, ids, regions, image)
        args = (layers, row_ids, job.options.decode, ctx.settings.decode_batch)
        attend = job.options.attributions
        if job.options.grounding:
            grounded = caption_grounded(lm, latents, image, *args, attention=attend)
            per_row, attention = grounded.captions, grounded.cross_attention
            grounding = ({"image": grounded.image_embeddings[:n], "text": grounded.text_embeddings[:n]},
                         {"ids": ids, "prior": grounded.null_captions})  # the ranks are the whole images' only
        else:
            decoded = decode_layers(lm, latents, *args, attention=attend)
            per_row = layer_captions(decoded, layers, len(row_ids))
            attention = [d.cross_attention for d in decoded]
        per_image, per_region = split_regions(per_row, n)
        if attend:
            _write_attributions(ctx, job, chunk, lm, info, per_image, per_region, attention)
        for j, (image_id, captions, region_captions) in enumerate(zip(ids, per_image, per_region)):
            fields[image_id] = dict(
                layers=captions, size=info["sizes"][j], input_box=info["input_box"][j],
                regions=region_results(regions, info["region_boxes"][j], info["region_patches"][j],
                                       region_captions) if regions else None)
    if job.options.grounding:
        ctx.store.write_tensors(job.id, "grounding", chunk, *grounding)
    results = [ImageResult(id=item["id"], source=item["source"], meta=item["meta"],
                           **fields.get(item["id"], {"error": item["error"] or "not encoded"}))
               for item in info["items"]]
    ctx.store.write_lines(job.id, "captions", chunk, (r.model_dump_json(exclude_none=True) for r in results))
    return ChunkOutcome(images=len(results))


def _write_attributions(ctx: Context, job: JobRecord, chunk: int, lm: LoadedModel, info: dict,
                        captions: list[list[LayerCaption]], region_captions: list[list[list[LayerCaption]]],
                        attention: list[torch.Tensor]) -> None:
    """Compose the chunk's maps with the pooler's attention the encoder task stored; one file per image."""
    pooler, _ = ctx.store.read_tensors(job.id, "pool_attention", chunk)  # [L, n, 1+R, Q-1, T]
    grid = tuple(lm.model.visual.grid_size)
    parts = attribution_parts(captions, region_captions, attention, pooler["pool_attention"])
    for image_id, box, image_parts in zip(info["encoded"], info["input_box"], parts):
        maps = attribution.attributions(lm.tokenizer, grid, tuple(box), image_parts)
        write_attributions(attribution_path(ctx.store.attributions(job.id), image_id), maps)
