"""RQ task of the encoder stage: a chunk's images -> per-layer latents in the artifact store (and, when
the job is grounded, the images' contrastive embeddings beside them; with regions, each region's latents;
with attributions, the pooler's attention weights, which the decoder task composes into word -> patch maps).
A region that covers no patch of an image fails on that image alone (the region's error in its results).
The worker process loads the model once (`services.chain.tasks.use_model`); RQ then calls `encode_chunk` per chunk."""

from __future__ import annotations

import torch

from latent_verbalizer.services.chain.tasks import ChunkOutcome, Context, loaded_model, run_chunk
from latent_verbalizer.services.encoder.regions import place
from latent_verbalizer.services.encoder.stage import (
    Encoded,
    capture_blocks,
    captured_layers,
    check_layers,
    load_pixels,
    pool_encoded,
)
from latent_verbalizer.shared.jobs import JobRecord


def encode_chunk(job_id: str, chunk: int) -> None:
    run_chunk("encode", job_id, chunk, lambda ctx, job: _encode(ctx, job, chunk))


def _encode(ctx: Context, job: JobRecord, chunk: int) -> ChunkOutcome:
    lm = loaded_model("encoder")
    visual = lm.model.visual
    items = ctx.store.read_inputs(job.id, chunk)
    layers = check_layers(visual, job.options.layers)
    pixels, good, errors = load_pixels(lm, items, ctx.settings.max_image_pixels)
    located = place(lm, good, job.options.regions)  # a region covering no patch of an image: that region's error
    encoded = None
    if pixels is not None:  # vision forwards of at most encode_batch images
        step, options = ctx.settings.encode_batch, job.options
        mask = torch.stack([p.mask for p in located]) if options.regions else None  # [n, R, T]
        captured = captured_layers(visual, layers, options.grounding)
        encoded = Encoded.cat([
            pool_encoded(visual, capture_blocks(visual, pixels[i : i + step], captured), layers, options.grounding,
                         None if mask is None else mask[i : i + step], options.attributions)
            for i in range(0, len(pixels), step)])
    info = {
        "layers": layers,
        "items": [{"id": i.id, "source": i.source, "meta": i.meta, "error": errors.get(i.id)} for i in items],
        "encoded": [i.id for i in good],  # the images latents [L, n, ...] hold, in order
        # per encoded image: its (w, h), the part of it the model's input shows, its regions' boxes and patches
        "sizes": [list(p.size) for p in located],
        "input_box": [list(p.input_box) for p in located],
        "region_boxes": [[list(b) for b in p.boxes] for p in located],
        "region_patches": [p.patches for p in located],
        "region_errors": [p.errors for p in located],
    }
    beside = {} if encoded is None else encoded.tensors()
    latents = beside.pop("latents", None)
    for name, tensor in beside.items():  # image embeddings, region latents, pooler attention: when asked for
        ctx.store.write_tensors(job.id, name, chunk, {name: tensor}, {"encoded": info["encoded"]})
    ctx.store.write_latents(job.id, chunk, latents, info)
    return ChunkOutcome(images=len(items), failed_images=len(errors))
