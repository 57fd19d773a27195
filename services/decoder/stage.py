"""Decoder stage: latent image tokens -> one caption per row (row = one image at one layer).

`decode(lm, latents, params)` decodes rows [R, N, D] in batches of `batch_rows`. Every row of a
batch advances one token per step through the cached `TextDecoder`; rows that finish are dropped
from the batch (and from the caches), so they stop costing compute.

Semantics follow open_clip's `CoCa.generate` so the same settings give the same captions:
  - a caption starts with the start token and has at most `seq_len` tokens, start token included;
    when only one slot is left the end token is forced;
  - the end token is blocked while fewer than `min_seq_len` tokens (start included) are present;
  - a row is finished when it emits the end token or the pad id 0 (open_clip pads with 0, which is
    also the BPE token "!"; a 0-terminated caption keeps that one "!").
Per caption we keep the token ids (start/end excluded), the entropy in bits of the full softmax of
the model's raw logits at every generated step (end token included), and their mean, and the natural log
of the probability that softmax gave the token chosen at each step (`logprob`, likelihood grounding's
image side: services.decoder.pmi); with `embed`,
also its contrastive text embedding (services.decoder.text_embedding): greedy and sampled rows get it
from their own text-tower caches, copied aside when the row leaves the batch and finished with one
batched step for all rows at the end; beam captions are recomputed from their final tokens through
the same cached steps. With `attention`, also each generated step's cross-attention over the image
tokens (mean over decoder layers and heads, `TextDecoder.step`), for word -> patch attributions
(services.decoder.attribution): greedy and sampled rows record it as they decode, beam search keeps it
with each beam like the entropies. Without it the steps compute exactly what they compute otherwise.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from latent_verbalizer.services.decoder import beam
from latent_verbalizer.services.decoder.model import TextDecoder
from latent_verbalizer.services.decoder.sampling import block_end_token, choose, entropy_bits, repetition_penalty
from latent_verbalizer.services.decoder.text_embedding import TextStates, embed, recompute
from latent_verbalizer.shared.models import LoadedModel
from latent_verbalizer.shared.schemas import DecodeParams, LayerCaption


@dataclass
class Decoded:
    text: str
    tokens: list[int]
    entropy: list[float]
    logprob: list[float]  # ln p(token | prefix, image) from the raw logits, indexed like entropy
    text_embedding: torch.Tensor | None = None  # [E] float32, not normalised (with `embed`)
    cross_attention: torch.Tensor | None = None  # [steps, N] float32, indexed like entropy (with `attention`)

    @property
    def mean_entropy(self) -> float:
        return sum(self.entropy) / len(self.entropy)


def decode(
    lm: LoadedModel,
    latents: torch.Tensor,
    params: DecodeParams = DecodeParams(),
    row_keys: torch.Tensor | None = None,
    batch_rows: int = 256,
    embed_text: bool = False,
    attention: bool = False,
) -> list[Decoded]:
    """latents [R, N, D] -> R captions. `row_keys` [R] (int64) identify rows for seeded sampling
    (default: the row index); give the same key to get the same sampled caption in any batch.
    `embed_text`: also each caption's text embedding; `attention`: each step's cross-attention."""
    decoder = TextDecoder.of(lm.model)
    if params.seq_len > decoder.max_len:
        raise ValueError(f"seq_len {params.seq_len} exceeds the text tower's {decoder.max_len} positions")
    R = latents.shape[0]
    if row_keys is None:
        row_keys = torch.arange(R)
    out: list[Decoded] = []
    for start in range(0, R, batch_rows):
        rows = latents[start : start + batch_rows].to(lm.device, decoder.dtype)
        keys = row_keys[start : start + batch_rows].to(lm.device)
        if params.strategy == "beam":
            tokens, entropy, logprob, attended = beam.search(decoder, lm, rows, params, attention)
            embeddings = _recompute(decoder, lm, tokens, params.seq_len) if embed_text else None
        else:
            tokens, entropy, logprob, embeddings, attended = _decode_batch(decoder, lm, rows, params, keys,
                                                                           embed_text, attention)
        out += [Decoded(lm.tokenizer.decode(t).strip(), t, e, lp, None if embeddings is None else embeddings[i],
                        None if attended is None else attended[i])
                for i, (t, e, lp) in enumerate(zip(tokens, entropy, logprob))]
    return out


def score(
    lm: LoadedModel, rows: torch.Tensor, mask: torch.Tensor | None, tokens: list[list[int]], batch_rows: int = 256,
) -> list[torch.Tensor]:
    """Teacher-forced log-probabilities (TextDecoder.score) of each caption's tokens, then of its end token,
    under rows [R, N, D] (caption r reads row r) or [1, N, D] (every caption reads that one row) -> per
    caption [len(tokens) + 1] float32; a caption that ended with the pad id 0 (open_clip's other end) has
    no end token after it: [len(tokens)]. Captions are scored `batch_rows` at a time, the shortest
    together. CoCa's pooled rows have no mask (regions are pooled before), so `mask` must be None."""
    if mask is not None:
        raise ValueError("CoCa's rows are read whole: no mask")
    decoder = TextDecoder.of(lm.model)
    ends = [[] if t and t[-1] == lm.pad_id else [lm.eot_id] for t in tokens]
    out: list[torch.Tensor] = [torch.empty(0)] * len(tokens)
    order = sorted(range(len(tokens)), key=lambda i: len(tokens[i]))
    for start in range(0, len(order), batch_rows):
        batch = order[start : start + batch_rows]
        seqs = [[lm.sot_id, *tokens[i], *ends[i]] for i in batch]
        ids = torch.full((len(batch), max(map(len, seqs))), lm.pad_id, dtype=torch.long)
        for j, seq in enumerate(seqs):
            ids[j, : len(seq)] = torch.tensor(seq)
        lengths = torch.tensor([len(seq) - 1 for seq in seqs])
        image = rows if rows.shape[0] == 1 else rows[torch.tensor(batch)]
        logp = decoder.score(image.to(lm.device, decoder.dtype), ids.to(lm.device), lengths).cpu()
        for j, i in enumerate(batch):
            out[i] = logp[j, : lengths[j]]
    return out


def _recompute(decoder: TextDecoder, lm: LoadedModel, tokens: list[list[int]], seq_len: int) -> torch.Tensor:
    """Text embeddings [B, E] of finished captions (tokens without start and end token)."""
    ids = torch.full((len(tokens), seq_len), lm.pad_id, dtype=torch.long)
    end = torch.zeros(len(tokens), dtype=torch.long)  # position of each caption's end token
    for i, t in enumerate(tokens):
        seq = [lm.sot_id, *t] + ([] if t and t[-1] == lm.pad_id else [lm.eot_id])  # a 0-ended caption keeps its 0
        ids[i, : len(seq)], end[i] = torch.tensor(seq), len(seq) - 1
    return recompute(decoder, ids.to(lm.device), end.to(lm.device), lm.pad_id)


def row_key(image_id: str, layer: int) -> int:
    """Stable per-caption key for seeded sampling (same in every process and batch)."""
    return zlib.crc32(f"{image_id}\0{layer}".encode())


def caption_layers(
    lm: LoadedModel,
    latents: torch.Tensor,
    layers: list[int],
    image_ids: list[str],
    params: DecodeParams = DecodeParams(),
    batch_rows: int = 256,
) -> list[list[LayerCaption]]:
    """latents [L, n, N, D] from the encoder stage -> per image, its caption at every layer."""
    return layer_captions(decode_layers(lm, latents, layers, image_ids, params, batch_rows), layers, len(image_ids))


def decode_layers(
    lm: LoadedModel,
    latents: torch.Tensor,
    layers: list[int],
    image_ids: list[str],
    params: DecodeParams = DecodeParams(),
    batch_rows: int = 256,
    attention: bool = False,
) -> list[Decoded]:
    """latents [L, n, N, D] -> n x L decoded rows, image-major (image i's layer j is row i*L + j), all
    decoded together; `attention`: with their cross-attention (`decode`)."""
    rows, ids = layer_rows(latents, image_ids, layers)
    return decode(lm, rows, params, row_keys(ids), batch_rows, attention=attention)


def layer_rows(latents: torch.Tensor, image_ids: list[str], layers: list[int]) -> tuple[torch.Tensor, list]:
    """latents [L, n, N, D] -> image-major rows [n*L, N, D] and each row's (image id, layer)."""
    L, n = latents.shape[:2]
    return latents.transpose(0, 1).reshape(n * L, *latents.shape[2:]), [(i, lay) for i in image_ids for lay in layers]


def row_keys(ids: list[tuple[str, int]]) -> torch.Tensor:
    """Rows' (image id, layer) -> their sampling keys [R] int64 (`row_key`)."""
    return torch.tensor([row_key(i, layer) for i, layer in ids], dtype=torch.long)


def layer_captions(decoded: list[Decoded], layers: list[int], n: int) -> list[list[LayerCaption]]:
    """Image-major decoded rows (n images x L layers) -> per image, its caption at every layer."""
    L = len(layers)
    return [
        [
            LayerCaption(layer=layer, caption=d.text, tokens=d.tokens, entropy=d.entropy,
                         mean_entropy=d.mean_entropy)
            for layer, d in zip(layers, decoded[i * L : (i + 1) * L])
        ]
        for i in range(n)
    ]


@torch.inference_mode()
def _decode_batch(
    decoder: TextDecoder, lm: LoadedModel, image_tokens: torch.Tensor, params: DecodeParams, keys: torch.Tensor,
    embed_text: bool = False, attention: bool = False,
) -> tuple[list[list[int]], list[list[float]], list[list[float]], torch.Tensor | None, list[torch.Tensor] | None]:
    B, S, device = image_tokens.shape[0], params.seq_len, image_tokens.device
    image_keys = decoder.image_keys(image_tokens)  # [B, N, D], read by every decoder layer
    caches = decoder.new_caches(B, S, device)
    finished = TextStates(decoder, B, S, device) if embed_text else None  # text-tower states of finished rows
    seqs = torch.full((B, S), lm.pad_id, dtype=torch.long, device=device)  # start + generated
    seqs[:, 0] = lm.sot_id
    entropy = torch.zeros(B, S - 1, device=device)
    logprob = torch.zeros(B, S - 1, device=device)
    attended = torch.zeros(B, S - 1, image_tokens.shape[1], device=device) if attention else None  # [B, S-1, N]
    step_attention = torch.zeros(B, image_tokens.shape[1], device=device) if attention else None  # [b, N]
    steps = torch.zeros(B, dtype=torch.long, device=device)  # generated tokens per row
    alive = torch.arange(B, device=device)  # batch rows still decoding -> their index in seqs
    token = seqs[:, 0]
    for pos in range(S - 1):
        cur_len = pos + 1  # tokens present, start token included
        logits = decoder.step(token, pos, caches, image_keys, step_attention)  # [b, V]
        logp = torch.log_softmax(logits, dim=-1)
        entropy[alive, pos] = entropy_bits(logp)
        if attended is not None:
            attended[alive, pos] = step_attention
        if cur_len + 1 == S:  # last slot: the end token is forced
            token = torch.full_like(token, lm.eot_id)
        else:
            scores = block_end_token(logits, cur_len, params.min_seq_len, lm.eot_id)
            scores = repetition_penalty(scores, seqs[alive, :cur_len], params.repetition_penalty)
            token = choose(scores, params, keys[alive], pos)
        seqs[alive, cur_len] = token
        logprob[alive, pos] = logp.gather(1, token[:, None])[:, 0]
        steps[alive] += 1
        done = (token == lm.eot_id) | (token == lm.pad_id)
        if finished is not None and done.any():
            which = done.nonzero()[:, 0]
            finished.keep(alive[which], caches[: len(decoder.text_blocks)], which)
        if done.all():
            break
        if done.any():  # drop finished rows from the batch, the caches and the image keys
            keep = (~done).nonzero()[:, 0]
            alive, token = alive[keep], token[keep]
            for cache in caches:
                cache.keep(keep)
            image_keys = image_keys.index_select(0, keep)
            if step_attention is not None:
                step_attention = step_attention[: len(keep)]
    tokens, entropies, logprobs = _finish(seqs, steps, entropy, logprob, lm.eot_id)
    # The end token of each row sits at position steps (start token at 0): not yet fed to the text tower.
    embeddings = None if finished is None else embed(decoder, finished, seqs, steps, steps.clone(), lm.pad_id)
    attentions = None if attended is None else [a[:n] for a, n in zip(attended, steps.tolist())]  # [steps, N] each
    return tokens, entropies, logprobs, embeddings, attentions


def _finish(seqs: torch.Tensor, steps: torch.Tensor, entropy: torch.Tensor, logprob: torch.Tensor, eot_id: int):
    """Cut each row at its last generated token; drop the start token and a final end token."""
    tokens, entropies, logprobs = [], [], []
    for seq, n, ent, lp in zip(seqs.tolist(), steps.tolist(), entropy.tolist(), logprob.tolist()):
        generated = seq[1 : n + 1]
        tokens.append(generated[:-1] if generated and generated[-1] == eot_id else generated)
        entropies.append(ent[:n])
        logprobs.append(lp[:n])
    return tokens, entropies, logprobs
