"""RQ task of the decoder stage: a chunk's latents -> one caption per layer per image (ImageResult
lines, per-image errors carried through). The worker process loads the model once (`services.tasks.use_model`).
A grounded job's captions carry their grounding measures, and the chunk's image and text embeddings
and the gray image's captions go to the artifact store for the job's finish step (the ranks)."""

from __future__ import annotations

from services.decoder.grounding import caption_grounded
from services.decoder.stage import caption_layers
from services.tasks import ChunkOutcome, Context, loaded_model, run_chunk
from shared.jobs import JobRecord
from shared.schemas import ImageResult


def decode_chunk(job_id: str, chunk: int) -> None:
    run_chunk("decode", job_id, chunk, lambda ctx, job: _decode(ctx, job, chunk))


def _decode(ctx: Context, job: JobRecord, chunk: int) -> ChunkOutcome:
    lm = loaded_model("decoder")
    latents, info = ctx.store.read_latents(job.id, chunk)
    captions = {}
    grounding: tuple[dict, dict] = ({}, {"ids": [], "prior": {}})  # what the finish step reads
    if latents is not None:
        args = (info["layers"], info["encoded"], job.options.decode, ctx.settings.decode_batch)
        if job.options.grounding:
            image, _ = ctx.store.read_tensors(job.id, "image_embeddings", chunk)
            grounded = caption_grounded(lm, latents, image["image"], *args)
            per_image = grounded.captions
            grounding = ({"image": grounded.image_embeddings, "text": grounded.text_embeddings},
                         {"ids": info["encoded"], "prior": grounded.null_captions})
        else:
            per_image = caption_layers(lm, latents, *args)
        captions = dict(zip(info["encoded"], per_image))
    if job.options.grounding:
        ctx.store.write_tensors(job.id, "grounding", chunk, *grounding)
    results = [
        ImageResult(id=item["id"], source=item["source"], meta=item["meta"], layers=captions.get(item["id"]),
                    error=None if item["id"] in captions else item["error"] or "not encoded")
        for item in info["items"]
    ]
    ctx.store.write_lines(job.id, "captions", chunk, (r.model_dump_json(exclude_none=True) for r in results))
    return ChunkOutcome(images=len(results))
