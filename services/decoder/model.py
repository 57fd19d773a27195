"""CoCa's text side, one token at a time, with KV caches (explicit tensors, open_clip's weights).

CoCa captions with two stacks over the caption prefix:
    text tower  (unimodal, causal self-attention)            -> token states
    decoder     (causal self-attention + cross-attention to the image tokens, per layer)
    ln_final -> @ text_projection                            -> logits over the vocabulary
open_clip's `generate` reruns both stacks over the whole prefix at every step, projects every
position to the 49408-word vocabulary and re-projects the image tokens to cross-attention keys and
values in every layer. Here each step feeds ONE token per row:
  - self-attention keys/values of earlier positions come from a KVCache per layer;
  - cross-attention keys/values of the image tokens are computed once per batch (`cross_kv`);
  - only the new position is projected to the vocabulary.
The text tower's appended cls token (`embed_cls`) sits after the caption and, under the causal mask,
cannot change the caption positions, so it is left out. Padding masks are not needed either: a
row's prefix never holds the pad id 0, because a row that emits it is finished (as in open_clip).
Shapes: B rows, D width, H heads, Dh = D / H, S positions, N image tokens, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.coca_model import CoCa
from open_clip.transformer import ResidualAttentionBlock

from services.decoder.kv_cache import KVCache

CrossKV = list[tuple[torch.Tensor, torch.Tensor]]  # per decoder layer: k, v [B, H, N, Dh]


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, S, D] -> [B, H, S, Dh]"""
    B, S, D = x.shape
    return x.view(B, S, heads, D // heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """[B, H, S, Dh] -> [B, S, D]"""
    B, H, S, Dh = x.shape
    return x.transpose(1, 2).reshape(B, S, H * Dh)


def _mlp(block: ResidualAttentionBlock, x: torch.Tensor) -> torch.Tensor:
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _self_attention(block: ResidualAttentionBlock, x: torch.Tensor, cache: KVCache, pos: int) -> torch.Tensor:
    """x [B, 1, D] at position `pos` attends to positions 0..pos (causal by construction)."""
    mha = block.attn
    q, k, v = F.linear(block.ln_1(x), mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
    k_all, v_all = cache.update(pos, _heads(k, mha.num_heads), _heads(v, mha.num_heads))  # [B, H, pos+1, Dh]
    out = F.scaled_dot_product_attention(_heads(q, mha.num_heads), k_all, v_all)  # [B, H, 1, Dh]
    return _mlp(block, x + block.ls_1(mha.out_proj(_merge(out))))


def _cross_attention(block: ResidualAttentionBlock, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """x [B, 1, D] attends to the image tokens' precomputed k, v [B, H, N, Dh]."""
    mha = block.attn
    w_q, b_q = mha.in_proj_weight.chunk(3)[0], mha.in_proj_bias.chunk(3)[0]
    q = _heads(F.linear(block.ln_1(x), w_q, b_q), mha.num_heads)  # [B, H, 1, Dh]
    out = F.scaled_dot_product_attention(q, k, v)
    return _mlp(block, x + block.ls_1(mha.out_proj(_merge(out))))


class TextDecoder:
    """Incremental view of a CoCa model's text tower + multimodal decoder (weights shared, not copied)."""

    def __init__(self, coca: CoCa) -> None:
        self.text, self.decoder = coca.text, coca.text_decoder
        blocks = [*self.text.transformer.resblocks, *self.decoder.resblocks, *self.decoder.cross_attn]
        if not all(type(b) is ResidualAttentionBlock for b in blocks):
            raise ValueError("only open_clip's default attention blocks are supported by the cached decoder")
        self.max_len = self.text.context_length

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.text_projection.dtype

    def cross_kv(self, image_tokens: torch.Tensor) -> CrossKV:
        """image_tokens [B, N, D] -> per decoder layer the cross-attention k, v [B, H, N, Dh]."""
        out = []
        for block in self.decoder.cross_attn:
            mha = block.attn
            _, w_k, w_v = mha.in_proj_weight.chunk(3)
            _, b_k, b_v = mha.in_proj_bias.chunk(3)
            kv = block.ln_1_kv(image_tokens)
            out.append((_heads(F.linear(kv, w_k, b_k), mha.num_heads), _heads(F.linear(kv, w_v, b_v), mha.num_heads)))
        return out

    def new_caches(self, rows: int, max_len: int, device: torch.device) -> list[KVCache]:
        """One cache per self-attention layer: text tower layers, then decoder layers."""
        blocks = [*self.text.transformer.resblocks, *self.decoder.resblocks]
        return [
            KVCache(rows, b.attn.num_heads, max_len, b.attn.embed_dim // b.attn.num_heads, self.dtype, device)
            for b in blocks
        ]

    def step(self, tokens: torch.Tensor, pos: int, caches: list[KVCache], cross: CrossKV) -> torch.Tensor:
        """tokens [B] at position `pos` -> next-token logits [B, V] (float32)."""
        n_text = len(self.text.transformer.resblocks)
        x = self.text.token_embedding(tokens)[:, None].to(self.dtype)  # [B, 1, D]
        x = x + self.text.positional_embedding[pos].to(self.dtype)
        for block, cache in zip(self.text.transformer.resblocks, caches[:n_text]):
            x = _self_attention(block, x, cache, pos)
        # CoCa feeds the text tower's states to the decoder without ln_final.
        for block, xblock, cache, (k, v) in zip(self.decoder.resblocks, self.decoder.cross_attn,
                                                 caches[n_text:], cross):
            x = _cross_attention(xblock, _self_attention(block, x, cache, pos), k, v)
        x = self.decoder.ln_final(x[:, 0])  # [B, D]
        return (x @ self.decoder.text_projection).float()  # [B, V]
