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
the model's raw logits at every generated step (end token included), and their mean.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from services.decoder import beam
from services.decoder.model import TextDecoder
from services.decoder.sampling import block_end_token, choose, entropy_bits, repetition_penalty
from shared.models import LoadedModel
from shared.schemas import DecodeParams, LayerCaption


@dataclass
class Decoded:
    text: str
    tokens: list[int]
    entropy: list[float]

    @property
    def mean_entropy(self) -> float:
        return sum(self.entropy) / len(self.entropy)


def decode(
    lm: LoadedModel,
    latents: torch.Tensor,
    params: DecodeParams = DecodeParams(),
    row_keys: torch.Tensor | None = None,
    batch_rows: int = 256,
) -> list[Decoded]:
    """latents [R, N, D] -> R captions. `row_keys` [R] (int64) identify rows for seeded sampling
    (default: the row index); give the same key to get the same sampled caption in any batch."""
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
            tokens, entropy = beam.search(decoder, lm, rows, params)
        else:
            tokens, entropy = _decode_batch(decoder, lm, rows, params, keys)
        out += [Decoded(lm.tokenizer.decode(t).strip(), t, e) for t, e in zip(tokens, entropy)]
    return out


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
    """latents [L, n, N, D] from the encoder stage -> per image, its caption at every layer.
    All n x L rows are decoded together (image-major)."""
    L, n = latents.shape[:2]
    rows = latents.transpose(0, 1).reshape(n * L, *latents.shape[2:])  # [n*L, N, D]
    keys = torch.tensor([row_key(i, layer) for i in image_ids for layer in layers], dtype=torch.long)
    decoded = decode(lm, rows, params, keys, batch_rows)
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
    decoder: TextDecoder, lm: LoadedModel, image_tokens: torch.Tensor, params: DecodeParams, keys: torch.Tensor
) -> tuple[list[list[int]], list[list[float]]]:
    B, S, device = image_tokens.shape[0], params.seq_len, image_tokens.device
    image_keys = decoder.image_keys(image_tokens)  # [B, N, D], read by every decoder layer
    caches = decoder.new_caches(B, S, device)
    seqs = torch.full((B, S), lm.pad_id, dtype=torch.long, device=device)  # start + generated
    seqs[:, 0] = lm.sot_id
    entropy = torch.zeros(B, S - 1, device=device)
    steps = torch.zeros(B, dtype=torch.long, device=device)  # generated tokens per row
    alive = torch.arange(B, device=device)  # batch rows still decoding -> their index in seqs
    token = seqs[:, 0]
    for pos in range(S - 1):
        cur_len = pos + 1  # tokens present, start token included
        logits = decoder.step(token, pos, caches, image_keys)  # [b, V]
        entropy[alive, pos] = entropy_bits(logits)
        if cur_len + 1 == S:  # last slot: the end token is forced
            token = torch.full_like(token, lm.eot_id)
        else:
            scores = block_end_token(logits, cur_len, params.min_seq_len, lm.eot_id)
            scores = repetition_penalty(scores, seqs[alive, :cur_len], params.repetition_penalty)
            token = choose(scores, params, keys[alive], pos)
        seqs[alive, cur_len] = token
        steps[alive] += 1
        done = (token == lm.eot_id) | (token == lm.pad_id)
        if done.all():
            break
        if done.any():  # drop finished rows from the batch, the caches and the image keys
            keep = (~done).nonzero()[:, 0]
            alive, token = alive[keep], token[keep]
            for cache in caches:
                cache.keep(keep)
            image_keys = image_keys.index_select(0, keep)
    return _finish(seqs, steps, entropy, lm.eot_id)


def _finish(seqs: torch.Tensor, steps: torch.Tensor, entropy: torch.Tensor, eot_id: int):
    """Cut each row at its last generated token; drop the start token and a final end token."""
    tokens, entropies = [], []
    for seq, n, ent in zip(seqs.tolist(), steps.tolist(), entropy.tolist()):
        generated = seq[1 : n + 1]
        tokens.append(generated[:-1] if generated and generated[-1] == eot_id else generated)
        entropies.append(ent[:n])
    return tokens, entropies
