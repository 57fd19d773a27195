"""A job's input files -> chunks in the artifact store, the job record, and the encode tasks.

Images are read with shared.images.iter_items, as the CLI reads them (the same ids: file stems and
shard keys, repeated ids suffixed -2, -3, ...). Each uploaded image is decoded here once, so a
truncated, corrupt or oversized one is known at once: when no image of the request is usable the
request is refused (422); otherwise the bad ones travel as per-image errors into the results. Images
inside shards are checked by the encoder."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from itertools import islice

from latent_verbalizer.services.gateway.backends import unusable_reason
from latent_verbalizer.services.gateway.deps import Gateway
from latent_verbalizer.services.gateway.schemas import FieldError
from latent_verbalizer.services.gateway.uploads import JobInput
from latent_verbalizer.shared.images import ImageError, ImageItem, decode_image, iter_items
from latent_verbalizer.shared.jobs import JobOptions
from latent_verbalizer.shared.queue import enqueue

MAX_REASONS = 5


def submit(gw: Gateway, job_id: str, inputs: list[JobInput], options: JobOptions, field: str) -> None:
    """Raises a 422 naming `field` (the request's part that held the inputs: files or shards) when the
    inputs hold no usable image; the caller then drops the job's files."""
    try:
        total, chunks, errors = _write_chunks(gw, job_id, inputs)
    finally:
        shutil.rmtree(gw.store.job_dir(job_id) / "uploads", ignore_errors=True)
    if total == 0:
        raise FieldError(422, f"no images found in the {field} sent (shards hold no .jpg/.png/.webp members)", field)
    if len(errors) == total:
        raise FieldError(422, "no usable image: " + "; ".join(errors[:MAX_REASONS]), field)
    gw.jobs.create(job_id, options, total, chunks)
    try:
        enqueue(gw.client, gw.settings, "encode", job_id, range(chunks))
    except BaseException:
        gw.jobs.delete(job_id)  # no record of a job that nothing would ever run
        raise


def check_backend(gw: Gateway, options: JobOptions) -> None:
    """Refuse (422) a categorized job whose backend this server cannot serve (e.g. openai with no LLM server)."""
    if options.categorize and options.backend and (reason := unusable_reason(gw.settings, options.backend)):
        raise FieldError(422, f"bad options at backend: {reason}", "options.backend")


def _write_chunks(gw: Gateway, job_id: str, inputs: list[JobInput]) -> tuple[int, int, list[str]]:
    """-> images, chunks, and the reasons of the images found unusable."""
    total = chunks = 0
    errors: list[str] = []
    items = _checked(_named(inputs), gw.settings.max_image_pixels, errors)
    while batch := list(islice(items, gw.settings.chunk_size)):
        gw.store.write_inputs(job_id, chunks, batch)
        total += len(batch)
        chunks += 1
    return total, chunks, errors


def _named(inputs: list[JobInput]) -> Iterator[tuple[ImageItem, bool]]:
    """Items with their sources named as the client named the inputs; True for uploaded images.
    iter_items yields the inputs' items in input order, so one pass over the inputs pairs them."""
    pending = iter(inputs)
    current: JobInput | None = None
    for item in iter_items([i.path for i in inputs]):
        while current is None or not (item.source == str(current.path)
                                      or item.source.startswith(f"{current.path}:")):
            current = next(pending)
        item.source = current.name + item.source[len(str(current.path)):]
        yield item, current.kind != "tar"


def _checked(named: Iterator[tuple[ImageItem, bool]], max_pixels: int, errors: list[str]) -> Iterator[ImageItem]:
    for item, uploaded_image in named:
        if uploaded_image and item.error is None:
            try:
                decode_image(item.data, max_pixels)
            except ImageError as e:
                item.error = str(e)
        if item.error is not None:
            errors.append(f"{item.source}: {item.error}")
        yield item
