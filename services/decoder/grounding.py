"""Grounding: is a layer's caption a reading of the image, or the decoder's prior?

Per caption, for every family:
  prior, prior_overlap   the caption equals / its token F1 (over token ids, start/end excluded) with the
                         caption the same layer gives for the null input, a flat mid-gray image (128, 128,
                         128) at the model's input size, through the same preprocessing and decode parameters
  last_layer_similarity  cos(its text embedding, that of the same image's caption at the deepest
                         selected layer); 1.0 at that layer
and where the family has a contrastive head (CoCa's own towers score how well a text describes an image):
  image_score            cos(text embedding of the caption, image embedding of its image)
and, once every image of a run or job is known, `retrieval_rank` among a gallery of its images; and, for
every family, the likelihood grounding of every token, word and caption against the same gray image
(`pmi`, `word_pmi`, `image_pmi`, `supported_share`: services.decoder.pmi). Text
embeddings are the family's contrastive ones (CoCa: `model.encode_text` of the generated ids,
services.decoder.text_embedding; image embeddings `model.encode_image`); a family without that head
leaves image_score and retrieval_rank null and takes last_layer_similarity between MiniLM sentence
embeddings of the captions' texts (services.categorizer.embedded.encoder: no contrastive tower needed).

The null image's latents come from the encoder side with the batch (services.encoder.stage.encode_batch);
its captions are decoded once per (model and its weights, layers, decode parameters), in the same batch
as the first images' rows (a separate decode of L rows would cost nearly a whole batch's steps), and
kept: per process, and on disk under the cache_dir setting (services.decoder.null_cache), so only the
first run of a model/layer set pays for them; later processes read them.
"""

from __future__ import annotations

import functools
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
from torch import nn

from latent_verbalizer.services.decoder import null_cache, pmi
from latent_verbalizer.services.decoder.null_cache import NullCaption
from latent_verbalizer.services.decoder.stage import (
    decode,
    layer_captions,
    layer_masks,
    layer_rows,
    row_keys,
    score,
)
from latent_verbalizer.services.families import Family
from latent_verbalizer.shared.artifacts import ArtifactStore, write_atomic
from latent_verbalizer.shared.jobs import JobRecord
from latent_verbalizer.shared.schemas import DecodeParams, LayerCaption
from latent_verbalizer.shared.settings import get_settings

GALLERY_SEED = 0  # the retrieval gallery's sample is fixed by this seed and the images' order
_NULL_ROW_ID = "\0gray"  # row key of the gray image's rows (seeded sampling)
# per model: {(weights fingerprint, dtype, device type, layers, params): the gray image's captions, per layer}
_null: weakref.WeakKeyDictionary[nn.Module, dict[tuple, list[NullCaption]]] = weakref.WeakKeyDictionary()


@dataclass
class Grounded:
    captions: list[list[LayerCaption]]  # per image, per layer, grounding fields filled (ranks: later)
    text_embeddings: torch.Tensor | None  # [n, L, E] float32, unit length (None: no contrastive head)
    image_embeddings: torch.Tensor | None  # [n, E] float32, unit length (None: no contrastive head)
    null_captions: dict[str, str]  # {"layer_<i>": the gray image's caption}
    cross_attention: list[torch.Tensor] | None = None  # with `attention`: n*L rows (image-major) [steps, N]


def caption_grounded(
    family: Family,
    latents: torch.Tensor,
    image_embeddings: torch.Tensor | None,
    null_latents: torch.Tensor,
    layers: list[int],
    image_ids: list[str],
    params: DecodeParams = DecodeParams(),
    batch_rows: int = 256,
    attention: bool = False,
    masks: torch.Tensor | None = None,
) -> Grounded:
    """latents [L, n, N, D], image embeddings [n, E] (None without a contrastive head) and the null image's
    latents [L, 1, N, D] from `encode_batch` -> per image its caption at every layer with its grounding
    measures, PMI included; `attention`: with each caption's attention (services.decoder.stage.decode); masks [n, N]:
    the positions each image row reads (regions)."""
    L, n = latents.shape[:2]
    contrastive = family.has("contrastive")
    rows, ids = layer_rows(latents, image_ids, layers)  # [n*L, N, D]
    row_masks = layer_masks(masks, L)  # [n*L, N] or None
    kept = _null.setdefault(family.model, {})
    key = (null_cache.weights_fingerprint(family.model), family.dtype, family.device.type, tuple(layers), params)
    null = kept.get(key)
    if null is None:
        entry = null_cache.entry_name(family, family.null_pixels(), layers, params)
        null = null_cache.read(entry, layers)
        if null is None:  # the gray image's rows ride along with this batch
            rows = torch.cat([rows, null_latents[:, 0].to(rows)])  # + [L, N, D]
            ids += [(_NULL_ROW_ID, layer) for layer in layers]
            if row_masks is not None:
                row_masks = torch.cat([row_masks, row_masks.new_ones(L, row_masks.shape[1])])
    decoded = decode(family, rows, params, row_keys(ids), batch_rows, embed_text=contrastive, attention=attention,
                     masks=row_masks)
    if null is None:
        null = [NullCaption(d.text, d.tokens) for d in decoded[n * L :]]
        null_cache.write(entry, family.name, layers, null)
    kept[key] = null
    captions = layer_captions(decoded[: n * L], layers, n)
    null_logprobs = pmi.null_logprobs(partial(score, family, batch_rows=batch_rows), null_latents[:, 0],
                                      list(range(L)) * n, [d.tokens for d in decoded[: n * L]])
    if contrastive:
        text = F.normalize(torch.stack([d.text_embedding for d in decoded[: n * L]]), dim=-1).view(n, L, -1)
        image = F.normalize(image_embeddings.float().to(text.device), dim=-1)  # [n, E]
        scores = torch.einsum("nle,ne->nl", text, image)  # [n, L]
    else:  # no contrastive tower: the captions' texts through MiniLM, for last_layer_similarity only
        text, image, scores = sentence_embeddings([d.text for d in decoded[: n * L]]).view(n, L, -1), None, None
    deepest = layers.index(max(layers))
    to_last = torch.einsum("nle,ne->nl", text, text[:, deepest])  # [n, L]
    for i, per_image in enumerate(captions):
        for j, c in enumerate(per_image):
            c.image_score = None if scores is None else float(scores[i, j])
            c.prior = c.caption == null[j].text
            c.prior_overlap = token_f1(c.tokens, null[j].tokens)
            c.last_layer_similarity = float(to_last[i, j])
            d = decoded[i * L + j]
            pmi.annotate(c, d.logprob, null_logprobs[i * L + j], family.token_texts(d.tokens))
    return Grounded(captions, text if contrastive else None, image,
                    {f"layer_{layer}": d.text for layer, d in zip(layers, null)},
                    [d.cross_attention for d in decoded[: n * L]] if attention else None)


@functools.cache
def _sentence_encoder():
    from latent_verbalizer.services.categorizer.embedded.encoder import TextEncoder

    return TextEncoder()


def sentence_embeddings(texts: list[str]) -> torch.Tensor:
    """MiniLM sentence embeddings of texts [len, 384] float32, unit length (the embedded labeler's encoder,
    loaded once per process)."""
    return torch.from_numpy(_sentence_encoder().encode(texts))


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
    coca_ViT-L-14, 24 layers, E = 768: 38 KB per image). A family without a contrastive head has none:
    its run has no ranks."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self._text: list[torch.Tensor] = []
        self._image: list[torch.Tensor] = []
        self.null_captions: dict[str, str] = {}

    def add(self, ids: list[str], text: torch.Tensor | None, image: torch.Tensor | None,
            null_captions: dict[str, str]) -> None:
        """text [n, L, E], image [n, E] of the images `ids` (None: no contrastive head)."""
        self.ids += ids
        if text is not None:
            self._text.append(text.detach().to("cpu", torch.float16))
            self._image.append(image.detach().to("cpu", torch.float16))
        self.null_captions = null_captions

    def ranks(self, gallery: int) -> dict[str, tuple[list[int], int]]:
        """{image id: (rank per layer, gallery size)}; empty for fewer than two images or no embeddings."""
        if len(self.ids) < 2 or not self._text:
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
            embeddings.add(info["ids"], tensors.get("text"), tensors.get("image"), info["prior"])
    rewrite_with_ranks(results_path, embeddings.ranks(get_settings().grounding_gallery))
    if embeddings.null_captions:
        write_prior(store.output(job.id, "prior.json"), embeddings.null_captions)


def forget_null_captions(model: nn.Module) -> None:
    """Drop the model's gray-image captions and weights fingerprint kept in this process, as a fresh
    process starts: the next grounded batch takes the fingerprint again and reads the captions from disk,
    or decodes them when there is no entry (null_cache.clear). The overhead bench times both."""
    _null.pop(model, None)
    null_cache.forget(model)
