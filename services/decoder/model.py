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
  - only the new position is projected to the vocabulary;
  - every product with a weight goes through `linear.Linear` (on CPU, weights packed for few rows).
The text tower's appended cls token (`embed_cls`) sits after the caption and, under the causal mask,
cannot change the caption positions, so it is left out. Padding masks are not needed either: a
row's prefix never holds the pad id 0, because a row that emits it is finished (as in open_clip).
Shapes: B rows, D width, H heads, Dh = D / H, S positions, N image tokens, V vocabulary.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.coca_model import CoCa
from open_clip.transformer import ResidualAttentionBlock
from torch import nn

from services.decoder.kv_cache import KVCache
from services.decoder.linear import Linear

CrossKV = list[tuple[torch.Tensor, torch.Tensor]]  # per decoder layer: k, v [B, H, N, Dh]


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, S, D] -> [B, H, S, Dh]"""
    B, S, D = x.shape
    return x.view(B, S, heads, D // heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """[B, H, S, Dh] -> [B, S, D]"""
    B, H, S, Dh = x.shape
    return x.transpose(1, 2).reshape(B, S, H * Dh)


@dataclass
class _Block:
    """One of open_clip's ResidualAttentionBlocks as a step uses it: its norms and layer scales, and its
    products as `Linear`s. `attn_in` is the whole q/k/v projection [3D, D] for self-attention and only
    the q part [D, D] for cross-attention (the image keys/values are projected once, in `cross_kv`)."""

    heads: int
    ln_1: nn.Module
    ln_2: nn.Module
    ls_1: nn.Module
    ls_2: nn.Module
    act: nn.Module
    attn_in: Linear
    attn_out: Linear
    fc: Linear
    proj: Linear

    @classmethod
    def of(cls, block: ResidualAttentionBlock, q_only: bool = False) -> _Block:
        mha, mlp = block.attn, block.mlp
        w, b = mha.in_proj_weight, mha.in_proj_bias
        if q_only:
            w, b = w.chunk(3)[0], b.chunk(3)[0]
        return cls(mha.num_heads, block.ln_1, block.ln_2, block.ls_1, block.ls_2, mlp.gelu, Linear(w, b),
                   Linear(mha.out_proj.weight, mha.out_proj.bias), Linear(mlp.c_fc.weight, mlp.c_fc.bias),
                   Linear(mlp.c_proj.weight, mlp.c_proj.bias))

    def attention_out(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """Residual add of the attention output [B, H, 1, Dh], then the MLP: -> x [B, 1, D]."""
        x = x + self.ls_1(self.attn_out(_merge(attended)))
        return x + self.ls_2(self.proj(self.act(self.fc(self.ln_2(x)))))


def _self_attention(block: _Block, x: torch.Tensor, cache: KVCache, pos: int) -> torch.Tensor:
    """x [B, 1, D] at position `pos` attends to positions 0..pos (causal by construction)."""
    q, k, v = block.attn_in(block.ln_1(x)).chunk(3, dim=-1)
    k_all, v_all = cache.update(pos, _heads(k, block.heads), _heads(v, block.heads))  # [B, H, pos+1, Dh]
    return block.attention_out(x, F.scaled_dot_product_attention(_heads(q, block.heads), k_all, v_all))


def _cross_attention(block: _Block, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """x [B, 1, D] attends to the image tokens' precomputed k, v [B, H, N, Dh]."""
    q = _heads(block.attn_in(block.ln_1(x)), block.heads)  # [B, H, 1, Dh]
    return block.attention_out(x, F.scaled_dot_product_attention(q, k, v))


class TextDecoder:
    """Incremental view of a CoCa model's text tower + multimodal decoder. It uses the model's weights
    (on CPU also packed copies of them, see `linear`); `TextDecoder.of(model)` keeps one per model."""

    _made: weakref.WeakKeyDictionary[CoCa, tuple[tuple, TextDecoder]] = weakref.WeakKeyDictionary()

    @classmethod
    def of(cls, coca: CoCa) -> TextDecoder:
        """The model's decoder, made again if a text-side weight changed since (in place, moved to
        another device or dtype, or replaced)."""
        stamp = tuple((p.data_ptr(), p._version) for p in (*coca.text.parameters(), *coca.text_decoder.parameters()))
        made = cls._made.get(coca)
        if made is None or made[0] != stamp:
            made = cls._made[coca] = (stamp, cls(coca))
        return made[1]

    def __init__(self, coca: CoCa) -> None:
        self.text, self.decoder = coca.text, coca.text_decoder
        blocks = [*self.text.transformer.resblocks, *self.decoder.resblocks, *self.decoder.cross_attn]
        if not all(type(b) is ResidualAttentionBlock for b in blocks):
            raise ValueError("only open_clip's default attention blocks are supported by the cached decoder")
        self.max_len = self.text.context_length
        self.text_blocks = [_Block.of(b) for b in self.text.transformer.resblocks]
        self.self_blocks = [_Block.of(b) for b in self.decoder.resblocks]
        self.cross_blocks = [_Block.of(b, q_only=True) for b in self.decoder.cross_attn]
        self.vocab = Linear(self.decoder.text_projection.t())  # [V, D]

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
        n_text = len(self.text_blocks)
        x = self.text.token_embedding(tokens)[:, None].to(self.dtype)  # [B, 1, D]
        x = x + self.text.positional_embedding[pos].to(self.dtype)
        for block, cache in zip(self.text_blocks, caches[:n_text]):
            x = _self_attention(block, x, cache, pos)
        # CoCa feeds the text tower's states to the decoder without ln_final.
        for block, xblock, cache, (k, v) in zip(self.self_blocks, self.cross_blocks, caches[n_text:], cross):
            x = _cross_attention(xblock, _self_attention(block, x, cache, pos), k, v)
        return self.vocab(self.decoder.ln_final(x[:, 0])).float()  # [B, V]
