"""RQ task of the encoder stage: a chunk's images -> per-layer latents in the artifact store (and beside
them what the job asks for: with grounding the null image's latents and, where the family has them, the
images' contrastive embeddings; with regions, each region's latents or mask; with attributions, CoCa's
pooler weights, which the decoder task composes into word -> patch maps). See encoder.stage.encode_batch.
A region that covers no patch of an image fails on that image alone (the region's error in its results).
The worker process loads the model once (`services.chain.tasks.use_model`); RQ then calls `encode_chunk` per chunk."""

from __future__ import annotations

import torch

from latent_verbalizer.services.chain.tasks import ChunkOutcome, Context, loaded_model, run_chunk
from latent_verbalizer.services.encoder.regions import place
from latent_verbalizer.services.encoder.stage import encode_batch, load_pixels
from latent_verbalizer.shared.jobs import JobRecord
from latent_verbalizer.shared.schemas import resolve_layers


def encode_chunk(job_id: str, chunk: int) -> None:
    run_chunk("encode", job_id, chunk, lambda ctx, job: _encode(ctx, job, chunk))


def _encode(ctx: Context, job: JobRecord, chunk: int) -> ChunkOutcome:
    family = loaded_model("encoder")
    items = ctx.store.read_inputs(job.id, chunk)
    layers = resolve_layers(job.options.layers, family.num_layers)
    pixels, good, errors = load_pixels(family, items, ctx.settings.max_image_pixels)
    located = place(family, good, job.options.regions)  # a region covering no patch of an image: that region's error
    encoded = None
    if pixels is not None:  # vision forwards of at most encode_batch images
        options = job.options
        mask = torch.stack([p.mask for p in located]) if options.regions else None  # [n, R, T]
        encoded = encode_batch(family, pixels, layers, grounding=options.grounding, key_mask=mask,
                               attributions=options.attributions, step=ctx.settings.encode_batch)
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
    for name, tensor in beside.items():  # null latents, image embeddings, regions, pooler attention: when asked for
        ctx.store.write_tensors(job.id, name, chunk, {name: tensor}, {"encoded": info["encoded"]})
    info["beside"] = list(beside)  # what the decoder task reads back (services.decoder.worker)
    ctx.store.write_latents(job.id, chunk, latents, info)
    return ChunkOutcome(images=len(items), failed_images=len(errors))
