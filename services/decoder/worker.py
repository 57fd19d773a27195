"""RQ task of the decoder stage: a chunk's latents -> one caption per layer per image (ImageResult
lines, per-image errors carried through). The worker process loads the model once (`services.chain.tasks.use_model`).
A grounded job's captions carry their grounding measures, and the chunk's image and text embeddings
and the gray image's captions go to the artifact store for the job's finish step (the ranks). A job's
regions are captioned in the same decode as its images (services.decoder.regions). With
attributions, each image's word -> patch maps go straight to the job's outputs
(attributions/<id>.safetensors, services.decoder.attribution)."""

from __future__ import annotations

import json

import torch

from latent_verbalizer.services.chain.tasks import ChunkOutcome, Context, loaded_model, run_chunk
from latent_verbalizer.services.decoder.captions import caption_batch, write_maps
from latent_verbalizer.services.decoder.regions import region_results
from latent_verbalizer.services.families.base import Encoded
from latent_verbalizer.shared.artifacts import write_atomic
from latent_verbalizer.shared.jobs import JobRecord
from latent_verbalizer.shared.schemas import ImageResult

MODEL_FILE = "model.json"  # services.chain.finish reads it


def decode_chunk(job_id: str, chunk: int) -> None:
    run_chunk("decode", job_id, chunk, lambda ctx, job: _decode(ctx, job, chunk))


def _decode(ctx: Context, job: JobRecord, chunk: int) -> ChunkOutcome:
    family = loaded_model("decoder")
    # the job's model, as every chunk decodes it (the finish step puts it in summary.json): written whole
    write_atomic(ctx.store.output(job.id, MODEL_FILE), json.dumps(family.describe()).encode())
    latents, info = ctx.store.read_latents(job.id, chunk)
    options, ids = job.options, info["encoded"]
    fields: dict[str, dict] = {}  # image id -> its result's fields
    grounding: tuple[dict, dict] = ({}, {"ids": [], "prior": {}})  # what the finish step reads
    if latents is not None:
        encoded = _read_encoded(ctx, job, chunk, latents, info["beside"])
        captioned = caption_batch(family, encoded, info["layers"], ids, options.regions, options.decode,
                                  ctx.settings.decode_batch, options.grounding, options.attributions)
        if options.grounding:
            text, image = captioned.ranked_embeddings()  # None without a contrastive head: no ranks
            tensors = {} if text is None else {"image": image, "text": text}
            grounding = (tensors, {"ids": ids, "prior": captioned.grounded.null_captions})
        if options.attributions:
            write_maps(family, ctx.store.attributions(job.id), ids, info["input_box"], captioned, encoded)
        for j, (image_id, captions, region_captions) in enumerate(zip(ids, captioned.captions,
                                                                      captioned.region_captions)):
            fields[image_id] = dict(
                layers=captions, size=info["sizes"][j], input_box=info["input_box"][j],
                regions=region_results(options.regions, info["region_boxes"][j], info["region_patches"][j],
                                       info["region_errors"][j], region_captions) if options.regions else None)
    if options.grounding:
        ctx.store.write_tensors(job.id, "grounding", chunk, *grounding)
    results = [ImageResult(id=item["id"], source=item["source"], meta=item["meta"],
                           **fields.get(item["id"], {"error": item["error"] or "not encoded"}))
               for item in info["items"]]
    ctx.store.write_lines(job.id, "captions", chunk, (r.model_dump_json(exclude_none=True) for r in results))
    return ChunkOutcome(images=len(results))


def _read_encoded(ctx: Context, job: JobRecord, chunk: int, latents: torch.Tensor, beside: list[str]) -> Encoded:
    """The chunk's latents and what the encoder task stored beside them (services.encoder.worker)."""
    return Encoded(latents, **{kind: ctx.store.read_tensors(job.id, kind, chunk)[0][kind] for kind in beside})
