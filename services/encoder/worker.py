"""RQ task of the encoder stage: a chunk's images -> per-layer latents in the artifact store (and, when
the job is grounded, the images' contrastive embeddings beside them).
The worker process loads the model once (`services.tasks.use_model`); RQ then calls `encode_chunk` per chunk."""

from __future__ import annotations

import torch

from services.encoder.stage import check_layers, encode, encode_grounded, load_pixels
from services.tasks import ChunkOutcome, Context, loaded_model, run_chunk
from shared.jobs import JobRecord


def encode_chunk(job_id: str, chunk: int) -> None:
    run_chunk("encode", job_id, chunk, lambda ctx, job: _encode(ctx, job, chunk))


def _encode(ctx: Context, job: JobRecord, chunk: int) -> ChunkOutcome:
    lm = loaded_model("encoder")
    visual = lm.model.visual
    items = ctx.store.read_inputs(job.id, chunk)
    layers = check_layers(visual, job.options.layers)
    pixels, good, errors = load_pixels(lm, items, ctx.settings.max_image_pixels)
    latents = embeddings = None
    if pixels is not None:  # vision forwards of at most encode_batch images
        step = ctx.settings.encode_batch
        batches = [pixels[i : i + step] for i in range(0, len(pixels), step)]
        if job.options.grounding:
            parts = [encode_grounded(visual, b, layers) for b in batches]  # ([L, b, Q-1, D], [b, E]) each
            latents, embeddings = torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts])
        else:
            latents = torch.cat([encode(visual, b, layers) for b in batches], dim=1)
    info = {
        "layers": layers,
        "items": [{"id": i.id, "source": i.source, "meta": i.meta, "error": errors.get(i.id)} for i in items],
        "encoded": [i.id for i in good],  # the images latents [L, n, ...] hold, in order
    }
    if embeddings is not None:
        ctx.store.write_tensors(job.id, "image_embeddings", chunk, {"image": embeddings}, {"encoded": info["encoded"]})
    ctx.store.write_latents(job.id, chunk, latents, info)
    return ChunkOutcome(images=len(items), failed_images=len(errors))
