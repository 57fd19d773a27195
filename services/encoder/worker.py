"""RQ task of the encoder stage: a chunk's images -> per-layer latents in the artifact store (and, when
the job is grounded, the images' contrastive embeddings beside them; with regions, each region's latents;
with attributions, the pooler's attention weights, which the decoder task composes into word -> patch maps).
An image where a region covers no patch is a per-image error, as an unreadable one.
The worker process loads the model once (`services.tasks.use_model`); RQ then calls `encode_chunk` per chunk."""

from __future__ import annotations

import torch
from open_clip.transformer import VisionTransformer

from services.encoder.regions import place, with_whole_image
from services.encoder.stage import (
    capture_blocks,
    check_layers,
    load_pixels,
    pool_grounded,
    pool_layers,
    pool_regions,
    with_last,
)
from services.tasks import ChunkOutcome, Context, loaded_model, run_chunk
from shared.jobs import JobOptions, JobRecord


def encode_chunk(job_id: str, chunk: int) -> None:
    run_chunk("encode", job_id, chunk, lambda ctx, job: _encode(ctx, job, chunk))


def _encode(ctx: Context, job: JobRecord, chunk: int) -> ChunkOutcome:
    lm = loaded_model("encoder")
    visual = lm.model.visual
    items = ctx.store.read_inputs(job.id, chunk)
    layers = check_layers(visual, job.options.layers)
    pixels, good, errors = load_pixels(lm, items, ctx.settings.max_image_pixels)
    pixels, good, located = place(lm, pixels, good, job.options.regions, errors)  # a region covering no patch: an error
    out: dict[str, torch.Tensor] = {}
    if pixels is not None:  # vision forwards of at most encode_batch images
        step = ctx.settings.encode_batch
        mask = torch.stack([p.mask for p in located]) if job.options.regions else None  # [n, R, T]
        parts = [_encode_batch(visual, pixels[i : i + step], layers, job.options,
                               None if mask is None else mask[i : i + step]) for i in range(0, len(pixels), step)]
        out = {name: torch.cat([p[name] for p in parts], dim=_IMAGE_DIM[name]) for name in parts[0]}
    info = {
        "layers": layers,
        "items": [{"id": i.id, "source": i.source, "meta": i.meta, "error": errors.get(i.id)} for i in items],
        "encoded": [i.id for i in good],  # the images latents [L, n, ...] hold, in order
        # per encoded image: its (w, h), the part of it the model's input shows, its regions' boxes and patches
        "sizes": [list(p.size) for p in located],
        "input_box": [list(p.input_box) for p in located],
        "region_boxes": [[list(b) for b in p.boxes] for p in located],
        "region_patches": [p.patches for p in located],
    }
    for name, kind, key in _BESIDE_LATENTS:
        if name in out:
            ctx.store.write_tensors(job.id, kind, chunk, {key: out[name]}, {"encoded": info["encoded"]})
    ctx.store.write_latents(job.id, chunk, out.get("latents"), info)
    return ChunkOutcome(images=len(items), failed_images=len(errors))


_IMAGE_DIM = {"latents": 1, "image": 0, "region_latents": 1, "pool_attention": 1}  # where each output's images are
# (output, artifact kind, tensor name) of what is stored beside the latents when the job asks for it
_BESIDE_LATENTS = [("image", "image_embeddings", "image"), ("region_latents", "region_latents", "latents"),
                   ("pool_attention", "pool_attention", "pool_attention")]


@torch.inference_mode()
def _encode_batch(visual: VisionTransformer, pixels: torch.Tensor, layers: list[int],
                  options: JobOptions, mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """One vision forward -> latents [L, b, Q-1, D], with grounding image embeddings [b, E], with regions
    (key mask [b, R, T]) their latents [L, b, R, Q-1, D], with attributions the pooler's attention for the
    whole image and each region [L, b, 1+R, Q-1, T]."""
    hidden = capture_blocks(visual, pixels, with_last(visual, layers) if options.grounding else layers)
    out = {}
    if options.grounding:
        out["latents"], out["image"] = pool_grounded(visual, hidden, layers)
    else:
        out["latents"] = pool_layers(visual, hidden)
    if mask is not None:
        mask = mask.to(hidden.device)
        out["region_latents"] = pool_regions(visual, hidden[: len(layers)], mask)[0]
    if options.attributions:
        keys = with_whole_image(mask, len(pixels), hidden.shape[2], hidden.device)  # [b, 1+R, T]
        out["pool_attention"] = pool_regions(visual, hidden[: len(layers)], keys, weights=True)[1]
    return out
