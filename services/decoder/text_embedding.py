"""A caption's contrastive text embedding, exactly `model.encode_text(ids, normalize=False)`, from the
text tower's KV caches that decoding already filled.

What open_clip computes for CoCa (TextTransformer.forward, embed_cls): the ids as its tokenizer lays
them out, [SOT, tokens..., end, 0, 0, ...] padded with the pad id 0 to the context length C, then the
cls embedding appended at position C; causal attention plus a key mask; the cls position's output
through ln_final and text_projection. The key mask of existing CoCa weights is the LEGACY layout
(`correct_cls_mask` False): the validity row is [cls, ids != 0], so key position j is seen iff j == 0
or ids[j-1] != 0 (shifted by one), and the cls position itself only when ids[C-1] != 0 (a caption
that fills the context). With `correct_cls_mask` key j is seen iff ids[j] != 0, and the cls always.
Here the end token is the one the caption ended with (the end token, or the pad id 0 that open_clip
also treats as an end; a caption cut at the length limit ended with the forced end token).

So, per row with its end at position e (ids[e]): positions 0..e-1 are in the caches when the row
finishes; `embed` feeds e and e+1 (the first pad: a seen key in the legacy layout when the end is
not 0), then the cls token at C with the mask above. Positions past e+1 hold pad ids, never seen
keys, so they are never computed.

Rows leave the decoding batch as they finish, so their text-tower states are copied aside
(`TextStates.keep`) and every row is finished in one batched call at the end. The alternative, each
group of rows finishing at one step embedded right then, was measured slower: coca_ViT-B-32, 96 rows
ending at 24 different steps, 1 CPU thread (a busy 2-core machine): copy 70 ms + batched 650 ms
against 3990 ms in groups (small groups stream the text tower's weights once per group and step).
Shapes: B rows, P = S+1 key slots (S = seq_len <= C), H heads,
Dh head dim, D width, E embedding dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from latent_verbalizer.services.decoder.model import TextDecoder


class TextStates:
    """The text tower's keys/values of a batch's rows, kept when rows leave the decoding batch:
    kv per text layer [B, 2, H, P, Dh] (P = S+1: room for the pad after an end at position S-1).
    Costs the text tower's share of the batch's KV cache once more (coca_ViT-B-32, S=30, fp32:
    1.5 MB per row)."""

    def __init__(self, decoder: TextDecoder, rows: int, seq_len: int, device: torch.device) -> None:
        self.kv = [c.kv for c in decoder.new_caches(rows, seq_len + 1, device)[: len(decoder.text_blocks)]]

    def keep(self, rows: torch.Tensor, caches: list, which: torch.Tensor) -> None:
        """Copy the text-tower caches' rows `which` (batch indices) to this store's `rows`."""
        for kv, cache in zip(self.kv, caches):
            kv[rows, :, :, : cache.kv.shape[3]] = cache.kv.index_select(0, which)


@torch.inference_mode()
def embed(decoder: TextDecoder, states: TextStates, ids: torch.Tensor, end: torch.Tensor,
          fed: torch.Tensor, pad_id: int) -> torch.Tensor:
    """ids [B, >= P-1] (start token, caption, end, pad ids after), end [B] the end's position e,
    fed [B] positions already in `states` (e when decoding; 0 to compute from scratch)
    -> text embeddings [B, E] float32, not normalised."""
    P = states.kv[0].shape[3]
    ids = F.pad(ids[:, :P], (0, P - min(ids.shape[1], P)), value=pad_id)  # [B, P]
    seen, cls_seen = _key_mask(decoder, ids, pad_id)  # [B, P], [B]
    pos = fed.clone()
    while bool((pos <= end + 1).any()):  # feed up to the first pad after the end
        pos_now = torch.minimum(pos, end + 1)  # rows already there re-feed the same position
        _feed(decoder, states, ids.gather(1, pos_now[:, None])[:, 0], pos_now, seen)
        pos += 1
    return _cls(decoder, states, seen, cls_seen)


def recompute(decoder: TextDecoder, ids: torch.Tensor, end: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Text embeddings of finished sequences without caches (beam search's captions):
    ids [B, S], end [B] -> [B, E], fed through the same cached steps from position 0."""
    states = TextStates(decoder, ids.shape[0], ids.shape[1], ids.device)
    return embed(decoder, states, ids, end, torch.zeros_like(end), pad_id)


def _key_mask(decoder: TextDecoder, ids: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip's key mask for ids [B, P] padded to the context length C -> (key j seen [B, P],
    cls position seen [B])."""
    C, (B, P) = decoder.max_len, ids.shape
    real = ids != pad_id  # [B, P]
    if decoder.text.correct_cls_mask:
        seen, cls_seen = real.clone(), torch.ones(B, dtype=torch.bool, device=ids.device)
    else:
        seen = torch.cat([torch.ones_like(real[:, :1]), real[:, :-1]], 1)  # key j seen iff ids[j-1] is real
        cls_seen = real[:, C - 1] if P >= C else torch.zeros_like(real[:, 0])
    seen[:, C:] = False  # slot C (when S = C) is the cls position, not a pad: the cls key is its own
    return seen, cls_seen


def _feed(decoder: TextDecoder, states: TextStates, tokens: torch.Tensor, pos: torch.Tensor,
          seen: torch.Tensor) -> None:
    """tokens [B] at per-row positions pos [B] through the text tower, writing their keys/values."""
    B, rows = tokens.shape[0], torch.arange(tokens.shape[0], device=tokens.device)
    x = decoder.text.token_embedding(tokens)[:, None].to(decoder.dtype)  # [B, 1, D]
    x = x + decoder.text.positional_embedding[pos][:, None].to(decoder.dtype)
    K = int(pos.max()) + 1
    mask = (seen[:, :K] & (torch.arange(K, device=pos.device) <= pos[:, None]))[:, None, None]  # [B, 1, 1, K]
    for block, kv in zip(decoder.text_blocks, states.kv):
        qkv = block.attn_in(block.ln_1(x)).view(B, 3, block.heads, -1)  # [B, 3, H, Dh]
        kv[rows, :, :, pos] = qkv[:, 1:]
        q = qkv[:, :1].transpose(1, 2)  # [B, H, 1, Dh]
        x = block.attention_out(x, F.scaled_dot_product_attention(q, kv[:, 0, :, :K], kv[:, 1, :, :K], attn_mask=mask))


def _cls(decoder: TextDecoder, states: TextStates, seen: torch.Tensor, cls_seen: torch.Tensor) -> torch.Tensor:
    """The cls token at position C attends to the seen keys (and to itself when cls_seen) -> [B, E]."""
    text, B = decoder.text, seen.shape[0]
    x = (text.cls_emb + text.positional_embedding[decoder.max_len]).to(decoder.dtype).expand(B, 1, -1)  # [B, 1, D]
    mask = torch.cat([seen, cls_seen[:, None]], 1)[:, None, None]  # [B, 1, 1, P+1]
    for block, kv in zip(decoder.text_blocks, states.kv):
        qkv = block.attn_in(block.ln_1(x)).view(B, 3, block.heads, -1)  # [B, 3, H, Dh]
        keys = torch.cat([kv[:, 0], qkv[:, 1, :, None]], 2)  # [B, H, P+1, Dh]
        values = torch.cat([kv[:, 1], qkv[:, 2, :, None]], 2)
        q = qkv[:, :1].transpose(1, 2)  # [B, H, 1, Dh]
        x = block.attention_out(x, F.scaled_dot_product_attention(q, keys, values, attn_mask=mask))
    pooled = text.ln_final(x[:, 0])  # [B, D]
    proj = text.text_projection
    return (proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj).float()  # [B, E]
