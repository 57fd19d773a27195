"""Decoder stage: latent image tokens -> one caption per row (row = one image at one layer), for every
model family: the ONE decoding loop (greedy and sampled here, beam search in services.decoder.beam).

`decode(family, latents, params)` decodes rows [R, N, D] in batches of `batch_rows`. Every row of a
batch advances one token per step through the family's `Stepper` (services.families.base); rows that
finish leave the batch (`Stepper.keep`), so they stop costing compute.

Semantics follow the models' own generate (for CoCa open_clip's `CoCa.generate`), so the same settings
give the same captions:
  - a caption starts with the start slot and has at most `seq_len` tokens, start slot included; a
    family with `force_end_at_limit` (CoCa) gets its end token in the last slot, the others just stop;
  - the end tokens are blocked while fewer than `min_seq_len` tokens (start slot included) are present;
  - a row is finished when it emits one of the family's `stop_ids` (CoCa: the end token or the pad id 0,
    which is also the BPE token "!"; a 0-terminated caption keeps that one "!").
Per caption we keep the token ids (start slot and a final end token excluded), the entropy in bits of
the full softmax of the model's raw logits at every generated step (end token included), and their
mean, and the natural log of the probability the softmax of the logits at PMI's temperature
(shared.pmi.TEMPERATURE) gave the token chosen at each step (`logprob`, likelihood grounding's image
side); with `embed_text`, also its contrastive text embedding (a family with the contrastive extra):
greedy and sampled rows get it from their stepper, which keeps what it needs of a row when it leaves the
batch (`Stepper.retire`), beam captions from `Family.text_embeddings` of their final tokens. With
`attention`, also each generated step's attention over the image positions (the family's own
averaging), for word -> patch attributions (services.decoder.attribution): greedy and sampled rows
record it as they decode, beam search keeps it with each beam like the entropies. Without it the steps
compute exactly what they compute otherwise.
`score` gives teacher-forced log-probabilities of given captions (`Family.score`, batched).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from latent_verbalizer.services.decoder import beam
from latent_verbalizer.services.decoder.sampling import (
    block_end_token,
    choose,
    entropy_bits,
    repetition_penalty,
    tempered_logprob,
)
from latent_verbalizer.services.families.base import Family
from latent_verbalizer.shared.schemas import DecodeParams, LayerCaption


@dataclass
class Decoded:
    text: str
    tokens: list[int]
    entropy: list[float]
    logprob: list[float]  # ln p_T(token | prefix, image) at pmi.TEMPERATURE, indexed like entropy
    text_embedding: torch.Tensor | None = None  # [E] float32, not normalised (with `embed`)
    cross_attention: torch.Tensor | None = None  # [steps, N] float32, indexed like entropy (with `attention`)

    @property
    def mean_entropy(self) -> float:
        return sum(self.entropy) / len(self.entropy)


def decode(
    family: Family,
    latents: torch.Tensor,
    params: DecodeParams = DecodeParams(),
    row_keys: torch.Tensor | None = None,
    batch_rows: int = 256,
    embed_text: bool = False,
    attention: bool = False,
    masks: torch.Tensor | None = None,
) -> list[Decoded]:
    """latents [R, N, D] -> R captions. `row_keys` [R] (int64) identify rows for seeded sampling
    (default: the row index); give the same key to get the same sampled caption in any batch.
    `embed_text`: also each caption's contrastive text embedding; `attention`: each step's attention over
    the image positions; `masks` [R, N] bool: the image positions each row reads (None: all)."""
    if params.seq_len > family.max_seq_len:
        raise ValueError(f"seq_len {params.seq_len} exceeds the {family.max_seq_len} positions of"
                         f" {family.name}'s text side")
    if embed_text:
        family.require("contrastive")
    if params.min_seq_len is None:  # the model's own default
        params = params.model_copy(update={"min_seq_len": family.default_min_seq_len})
    R = latents.shape[0]
    if row_keys is None:
        row_keys = torch.arange(R)
    out: list[Decoded] = []
    for start in range(0, R, batch_rows):
        rows = latents[start : start + batch_rows].to(family.device, family.dtype)
        keys = row_keys[start : start + batch_rows].to(family.device)
        mask = None if masks is None else masks[start : start + batch_rows].to(family.device)
        if params.strategy == "beam":
            tokens, entropy, logprob, attended = beam.search(family, rows, mask, params, attention)
            embeddings = family.text_embeddings(tokens, params.seq_len) if embed_text else None
        else:
            tokens, entropy, logprob, embeddings, attended = _decode_batch(family, rows, mask, params, keys,
                                                                           embed_text, attention)
        out += [Decoded(family.decode_text(t), t, e, lp, None if embeddings is None else embeddings[i],
                        None if attended is None else attended[i])
                for i, (t, e, lp) in enumerate(zip(tokens, entropy, logprob))]
    return out


def score(family: Family, rows: torch.Tensor, mask: torch.Tensor | None, tokens: list[list[int]],
          temperature: float = 1.0, batch_rows: int = 256) -> list[torch.Tensor]:
    """Teacher-forced log-probabilities (`Family.score`, at `temperature`) of each caption's tokens, then of its
    end token, under rows [R, N, D] (caption r reads row r; mask [R, N] or None) or [1, N, D] (every caption
    reads that one row) -> per caption a float32 tensor (see `Family.score` for its length). Captions are
    scored `batch_rows` at a time, the shortest together."""
    out: list[torch.Tensor] = [torch.empty(0)] * len(tokens)
    order = sorted(range(len(tokens)), key=lambda i: len(tokens[i]))
    for start in range(0, len(order), batch_rows):
        batch = order[start : start + batch_rows]
        pick = torch.tensor(batch)
        image = rows if rows.shape[0] == 1 else rows[pick]
        scored = family.score(image, None if mask is None else mask[pick], [tokens[i] for i in batch], temperature)
        for i, logp in zip(batch, scored, strict=True):
            out[i] = logp.cpu()
    return out


def row_key(image_id: str, layer: int) -> int:
    """Stable per-caption key for seeded sampling (same in every process and batch)."""
    return zlib.crc32(f"{image_id}\0{layer}".encode())


def caption_layers(
    family: Family,
    latents: torch.Tensor,
    layers: list[int],
    image_ids: list[str],
    params: DecodeParams = DecodeParams(),
    batch_rows: int = 256,
) -> list[list[LayerCaption]]:
    """latents [L, n, N, D] from the encoder stage -> per image, its caption at every layer."""
    return layer_captions(decode_layers(family, latents, layers, image_ids, params, batch_rows), layers, len(image_ids))


def decode_layers(
    family: Family,
    latents: torch.Tensor,
    layers: list[int],
    image_ids: list[str],
    params: DecodeParams = DecodeParams(),
    batch_rows: int = 256,
    attention: bool = False,
    masks: torch.Tensor | None = None,
) -> list[Decoded]:
    """latents [L, n, N, D] -> n x L decoded rows, image-major (image i's layer j is row i*L + j), all
    decoded together; `attention`: with their attention over the image positions; masks [n, N]: the
    positions each image row reads, at every layer (`decode`)."""
    rows, ids = layer_rows(latents, image_ids, layers)
    return decode(family, rows, params, row_keys(ids), batch_rows, attention=attention,
                  masks=layer_masks(masks, len(layers)))


def layer_rows(latents: torch.Tensor, image_ids: list[str], layers: list[int]) -> tuple[torch.Tensor, list]:
    """latents [L, n, N, D] -> image-major rows [n*L, N, D] and each row's (image id, layer)."""
    L, n = latents.shape[:2]
    return latents.transpose(0, 1).reshape(n * L, *latents.shape[2:]), [(i, lay) for i in image_ids for lay in layers]


def layer_masks(masks: torch.Tensor | None, L: int) -> torch.Tensor | None:
    """Image rows' masks [n, N] -> the `layer_rows` masks [n*L, N] (None stays None)."""
    return None if masks is None else masks.repeat_interleave(L, dim=0)


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
    family: Family, image_tokens: torch.Tensor, mask: torch.Tensor | None, params: DecodeParams, keys: torch.Tensor,
    embed_text: bool = False, attention: bool = False,
) -> tuple[list[list[int]], list[list[float]], list[list[float]], torch.Tensor | None, list[torch.Tensor] | None]:
    B, S, device = image_tokens.shape[0], params.seq_len, image_tokens.device
    stepper = family.stepper(image_tokens, mask, S, attention, embed_text)
    stops = torch.tensor(family.stop_ids, device=device)
    seqs = torch.full((B, S), family.pad_id, dtype=torch.long, device=device)  # start slot + generated
    seqs[:, 0] = family.start_id
    entropy = torch.zeros(B, S - 1, device=device)
    logprob = torch.zeros(B, S - 1, device=device)
    attended = torch.zeros(B, S - 1, image_tokens.shape[1], device=device) if attention else None  # [B, S-1, N]
    step_attention = torch.zeros(B, image_tokens.shape[1], device=device) if attention else None  # [b, N]
    steps = torch.zeros(B, dtype=torch.long, device=device)  # generated tokens per row
    alive = torch.arange(B, device=device)  # batch rows still decoding -> their index in seqs
    token = seqs[:, 0]
    for pos in range(S - 1):
        cur_len = pos + 1  # tokens present, start slot included
        logits = stepper.step(token, pos, step_attention)  # [b, V]
        logp = torch.log_softmax(logits, dim=-1)
        entropy[alive, pos] = entropy_bits(logp)
        if attended is not None:
            attended[alive, pos] = step_attention
        if cur_len + 1 == S and family.force_end_at_limit:  # last slot: the end token is forced
            token = torch.full_like(token, family.end_id)
        else:
            scores = block_end_token(logits, cur_len, params.min_seq_len, family.end_ids)
            scores = repetition_penalty(scores, seqs[alive, :cur_len], params.repetition_penalty)
            token = choose(scores, params, keys[alive], pos)
        seqs[alive, cur_len] = token
        logprob[alive, pos] = tempered_logprob(logits, token)
        steps[alive] += 1
        done = torch.isin(token, stops)
        if done.any():
            which = done.nonzero()[:, 0]
            stepper.retire(which, alive[which])
        if done.all():
            break
        if done.any():  # drop finished rows from the batch and the stepper
            keep = (~done).nonzero()[:, 0]
            alive, token = alive[keep], token[keep]
            stepper.keep(keep)
            if step_attention is not None:
                step_attention = step_attention[: len(keep)]
    tokens, entropies, logprobs = _finish(seqs, steps, entropy, logprob, family.end_ids)
    embeddings = stepper.text_embeddings(seqs, steps) if embed_text else None
    attentions = None if attended is None else [a[:n] for a, n in zip(attended, steps.tolist())]  # [steps, N] each
    return tokens, entropies, logprobs, embeddings, attentions


def _finish(seqs: torch.Tensor, steps: torch.Tensor, entropy: torch.Tensor, logprob: torch.Tensor,
            end_ids: tuple[int, ...]):
    """Cut each row at its last generated token; drop the start slot and a final end token."""
    tokens, entropies, logprobs = [], [], []
    for seq, n, ent, lp in zip(seqs.tolist(), steps.tolist(), entropy.tolist(), logprob.tolist()):
        generated = seq[1 : n + 1]
        tokens.append(generated[:-1] if generated and generated[-1] in end_ids else generated)
        entropies.append(ent[:n])
        logprobs.append(lp[:n])
    return tokens, entropies, logprobs
