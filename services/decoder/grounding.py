"""Grounding: is a layer's caption a reading of the image, or the decoder's prior?

CoCa's own contrastive towers score how well a text describes an image. Per caption:
  image_score            cos(text embedding of the caption, image embedding of its image)
  prior, prior_overlap   the caption equals / its token F1 (over BPE ids, start/end excluded) with the
                         caption the same layer gives for a flat mid-gray image (128, 128, 128) at the
                         model's input size, through the same preprocessing and decode parameters
  last_layer_similarity  cos(its text embedding, that of the same image's caption at the deepest
                         selected layer); 1.0 at that layer
and, once every image of a run or job is known, `retrieval_rank` among a gallery of its images; and the
likelihood grounding of every token, word and caption against the same gray image (`pmi`, `word_pmi`,
`image_pmi`, `supported_share`: services.decoder.pmi), its captions scored under the gray image's latents.
Text embeddings are `model.encode_text` of the generated ids (services.decoder.text_embedding);
image embeddings `model.encode_image` (services.encoder.stage.encode_grounded).

The gray image's captions are decoded once per (model and its weights, layers, decode parameters), in the
same batch as the first images' rows (a separate decode of L rows would cost nearly a whole batch's
steps), and kept: per process, and on disk under the cache_dir setting (services.decoder.null_cache), so
only the first run of a model/layer set pays for them; later processes read them. Its latents (one vision
forward of one image) are kept per process with them.
"""

from __future__ import annotations

import json
import os
import uuid
import weakref
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from latent_verbalizer.services.decoder import null_cache, pmi
from latent_verbalizer.services.decoder.null_cache import NullCaption
from latent_verbalizer.services.decoder.stage import decode, layer_captions, layer_rows, row_keys, score
from latent_verbalizer.services.encoder.stage import encode
from latent_verbalizer.shared.artifacts import ArtifactStore, write_atomic
from latent_verbalizer.shared.jobs import JobRecord
from latent_verbalizer.shared.models import LoadedModel
from latent_verbalizer.shared.schemas import DecodeParams, LayerCaption
from latent_verbalizer.shared.settings import get_settings

GRAY = (128, 128, 128)
GALLERY_SEED = 0  # the retrieval gallery's sample is fixed by this seed and the images' order
_NULL_ROW_ID = "\0gray"  # row key of the gray image's rows (seeded sampling)
# per model: {(weights fingerprint, dtype, device type, layers, params): the gray image's captions, per layer,
# and its latents [L, N, D]}
_null: weakref.WeakKeyDictionary[nn.Module, dict[tuple, tuple[list[NullCaption], torch.Tensor]]] = (
    weakref.WeakKeyDictionary())


@dataclass
class Grounded:
    captions: list[list[LayerCaption]]  # per image, per layer, grounding fields filled (ranks: later)
    text_embeddings: torch.Tensor  # [n, L, E] float32, unit length
    image_embeddings: torch.Tensor  # [n, E] float32, unit length
    null_captions: dict[str, str]  # {"layer_<i>": the gray image's caption}
    cross_attention: list[torch.Tensor] | None = None  # with `attention`: n*L rows (image-major) [steps, N]


def gray_pixels(lm: LoadedModel) -> torch.Tensor:
    """The null input: a flat mid-gray image at the model's input size, preprocessed -> [1, 3, H, W]."""
    size = lm.model.visual.image_size
    h, w = (size, size) if isinstance(size, int) else size
    return lm.preprocess(Image.new("RGB", (w, h), GRAY))[None].to(lm.device, lm.dtype)


def caption_grounded(
    lm: LoadedModel,
    latents: torch.Tensor,
    image_embeddings: torch.Tensor,
    layers: list[int],
    image_ids: list[str],
    params: DecodeParams = DecodeParams(),
    batch_rows: int = 256,
    attention: bool = False,
) -> Grounded:
    """latents [L, n, N, D] and image embeddings [n, E] from `encode_grounded` -> per image its caption
    at every layer with image_score, prior, prior_overlap, last_layer_similarity and its PMI fields;
    `attention`: with each caption's cross-attention (services.decoder.stage.decode)."""
    L, n = latents.shape[:2]
    rows, ids = layer_rows(latents, image_ids, layers)  # [n*L, N, D]
    kept = _null.setdefault(lm.model, {})
    key = (null_cache.weights_fingerprint(lm.model), lm.dtype, lm.device.type, tuple(layers), params)
    null, null_latents = kept.get(key, (None, None))
    if null is None:
        gray = gray_pixels(lm)
        null_latents = encode(lm.model.visual, gray, layers)[:, 0].to(rows)  # [L, N, D]
        entry = null_cache.entry_name(lm, gray, layers, params)
        null = null_cache.read(entry, layers)
        if null is None:  # the gray image's rows ride along with this batch
            rows = torch.cat([rows, null_latents])
            ids += [(_NULL_ROW_ID, layer) for layer in layers]
    decoded = decode(lm, rows, params, row_keys(ids), batch_rows, embed_text=True, attention=attention)
    if null is None:
        null = [NullCaption(d.text, d.tokens) for d in decoded[n * L :]]
        null_cache.write(entry, lm.name, layers, null)
    kept.setdefault(key, (null, null_latents))
    null_logprobs = pmi.null_logprobs(partial(score, lm, batch_rows=batch_rows), null_latents,
                                      list(range(L)) * n, [d.tokens for d in decoded[: n * L]])
    text = F.normalize(torch.stack([d.text_embedding for d in decoded[: n * L]]), dim=-1).view(n, L, -1)
    image = F.normalize(image_embeddings.float().to(text.device), dim=-1)  # [n, E]
    scores = torch.einsum("nle,ne->nl", text, image)  # [n, L]
    deepest = layers.index(max(layers))
    to_last = torch.einsum("nle,ne->nl", text, text[:, deepest])  # [n, L]
    captions = layer_captions(decoded[: n * L], layers, n)
    for i, per_image in enumerate(captions):
        for j, c in enumerate(per_image):
            c.image_score = float(scores[i, j])
            c.prior = c.caption == null[j].text
            c.prior_overlap = token_f1(c.tokens, null[j].tokens)
            c.last_layer_similarity = float(to_last[i, j])
            d = decoded[i * L + j]
            pmi.annotate(c, d.logprob, null_logprobs[i * L + j], [lm.tokenizer.decode([t]) for t in d.tokens])
    return Grounded(captions, text, image, {f"layer_{layer}": d.text for layer, d in zip(layers, null)},
                    [d.cross_attention for d in decoded[: n * L]] if attention else None)


def token_f1(a: Sequence[int], b: Sequence[int]) -> float:
    """F1 of the multiset overlap of two token sequences (1.0 for two empty ones)."""
    if not a and not b:
        return 1.0
    common = sum((Counter(a) & Counter(b)).values())
    return 2 * common / (len(a) + len(b))


def retrieval_ranks(text: torch.Tensor, image: torch.Tensor, gallery: int,
                    seed: int = GALLERY_SEED) -> tuple[torch.Tensor, int]:
    """text [n, L, E], image [n, E] (unit length) -> (rank of each caption's own image among the
    gallery by cosine, 1 = best [n, L], gallery size). The gallery is a fixed sample (`seed`) of
    min(n, gallery) images; an image outside it takes the place of the sample's last one in its own
    gallery. Ties count in the own image's favour. Memory: one [rows, gallery] block at a time."""
    n = image.shape[0]
    size = min(n, gallery)
    sample = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size].to(image.device)  # [G]
    member = torch.zeros(n, dtype=torch.bool, device=image.device)
    member[sample] = True
    ranks = torch.empty(text.shape[:2], dtype=torch.long)
    step = max(1, 2**22 // (size * text.shape[1]))  # images per block
    for start in range(0, n, step):
        own = torch.arange(start, min(start + step, n), device=image.device)  # [b]
        t = text[own].float()  # [b, L, E]
        own_score = torch.einsum("ble,be->bl", t, image[own].float())  # [b, L]
        scores = torch.einsum("ble,ge->blg", t, image[sample].float())  # [b, L, G]
        # the sample's last image is left out of the gallery of an image outside the sample
        counted = torch.ones(len(own), 1, size, dtype=torch.bool, device=image.device)
        counted[~member[own], :, -1] = False
        counted &= (sample[None, None, :] != own[:, None, None])  # the own image is not its own rival
        ranks[start : start + len(own)] = (1 + ((scores > own_score[..., None]) & counted).sum(-1)).cpu()
    return ranks, size


class RunEmbeddings:
    """A run's or job's embeddings, kept until every image is known and the ranks can be taken:
    fp16 on the CPU, n x (L + 1) x E x 2 bytes (coca_ViT-B-32, 12 layers, E = 512: 13 KB per image;
    coca_ViT-L-14, 24 layers, E = 768: 38 KB per image)."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self._text: list[torch.Tensor] = []
        self._image: list[torch.Tensor] = []
        self.null_captions: dict[str, str] = {}

    def add(self, ids: list[str], text: torch.Tensor, image: torch.Tensor, null_captions: dict[str, str]) -> None:
        """text [n, L, E], image [n, E] of the images `ids`."""
        self.ids += ids
        self._text.append(text.detach().to("cpu", torch.float16))
        self._image.append(image.detach().to("cpu", torch.float16))
        self.null_captions = null_captions

    def add_grounded(self, ids: list[str], grounded: Grounded) -> None:
        self.add(ids, grounded.text_embeddings, grounded.image_embeddings, grounded.null_captions)

    def ranks(self, gallery: int) -> dict[str, tuple[list[int], int]]:
        """{image id: (rank per layer, gallery size)}; empty for fewer than two images."""
        if len(self.ids) < 2:
            return {}
        ranks, size = retrieval_ranks(torch.cat(self._text), torch.cat(self._image), gallery)
        return {i: (r, size) for i, r in zip(self.ids, ranks.tolist())}


def with_ranks(line: str, ranks: dict[str, tuple[list[int], int]]) -> str:
    """A results.jsonl line (ImageResult, or a categorized one) with its captions' ranks set."""
    result = json.loads(line)
    if result["id"] in ranks and result.get("layers"):
        per_layer, size = ranks[result["id"]]
        for caption, rank in zip(result["layers"], per_layer):
            caption["retrieval_rank"], caption["gallery_size"] = rank, size
    return json.dumps(result, separators=(",", ":"), ensure_ascii=False)


def rewrite_with_ranks(path: Path, ranks: dict[str, tuple[list[int], int]]) -> None:
    """Rewrite a results.jsonl in place (whole or not at all), line by line."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with path.open() as src, tmp.open("w") as out:
        for line in src:
            out.write(with_ranks(line, ranks) + "\n")
    os.replace(tmp, path)


def write_prior(path: Path, null_captions: dict[str, str]) -> None:
    """prior.json: {"layer_<i>": the gray image's caption} (whole or not at all)."""
    write_atomic(path, json.dumps(null_captions, indent=1).encode())


def rank_job(store: ArtifactStore, job: JobRecord, results_path: Path) -> None:
    """A grounded job's finish: its chunks' embeddings (services.decoder.worker) -> retrieval ranks over
    the whole job into results.jsonl, and the job's prior.json."""
    embeddings = RunEmbeddings()
    for chunk in range(job.chunks):
        tensors, info = store.read_tensors(job.id, "grounding", chunk)
        if info["ids"]:
            embeddings.add(info["ids"], tensors["text"], tensors["image"], info["prior"])
    rewrite_with_ranks(results_path, embeddings.ranks(get_settings().grounding_gallery))
    if embeddings.null_captions:
        write_prior(store.output(job.id, "prior.json"), embeddings.null_captions)


def forget_null_captions(model: nn.Module) -> None:
    """Drop the model's gray-image captions and weights fingerprint kept in this process, as a fresh
    process starts: the next grounded batch takes the fingerprint again and reads the captions from disk,
    or decodes them when there is no entry (null_cache.clear). The overhead bench times both."""
    _null.pop(model, None)
    null_cache.forget(model)
