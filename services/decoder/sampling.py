"""Turning next-token logits into tokens, in the order open_clip's `generate` applies them:
min-length (blocks the end token), repetition penalty, top-k / top-p, then temperature.

Sampling is seeded per caption, not per batch: the uniform number for row r at step t is a
counter-based hash of (seed, row key, t), so a caption is the same whatever batch it is decoded in.
The token is drawn by inverting the CDF of the filtered softmax with that number (one number per
row and step, so sampling costs a cumulative sum, not a random draw per vocabulary entry)."""

from __future__ import annotations

import math

import torch

from latent_verbalizer.shared import pmi
from latent_verbalizer.shared.schemas import DecodeParams

_MASK32 = 0xFFFFFFFF


def entropy_bits(logp: torch.Tensor) -> torch.Tensor:
    """Entropy (bits) of a distribution per row, given as logp [B, V] = log_softmax(raw logits) float32 -> [B]."""
    return -(logp.exp() * logp).sum(-1) / math.log(2)


def tempered_logprob(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """logits [B, V] (raw), tokens [B] -> ln p_T(token) [B] under the softmax of logits / pmi.TEMPERATURE:
    likelihood grounding's image side, as `Family.score(..., temperature=pmi.TEMPERATURE)` scores it."""
    scaled = logits.float() / pmi.TEMPERATURE
    return scaled.gather(1, tokens[:, None])[:, 0] - scaled.logsumexp(-1)


def block_end_token(scores: torch.Tensor, cur_len: int, min_seq_len: int, end_ids: tuple[int, ...]) -> torch.Tensor:
    """Like transformers' MinLengthLogitsProcessor: no end token while fewer than min_seq_len
    tokens (start slot included) are present."""
    if cur_len < min_seq_len:
        scores[:, list(end_ids)] = -math.inf
    return scores


def repetition_penalty(scores: torch.Tensor, prefix: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL penalty on every token already in the prefix [B, S] (start token included)."""
    if penalty == 1.0:
        return scores
    seen = scores.gather(1, prefix)
    return scores.scatter(1, prefix, torch.where(seen < 0, seen * penalty, seen / penalty))


def top_k_top_p(scores: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Keep the k best tokens (ties at the k-th kept), then the smallest set whose probability
    reaches top_p (at least one token)."""
    if top_k is not None and top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if top_p is not None and top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        probs = sorted_scores.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # mass before this token already reached top_p
        drop[:, 0] = False
        scores = scores.masked_fill(drop.scatter(1, order, drop), -math.inf)
    return scores


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer on int64 tensors holding values < 2**32 (no overflow: the
    multipliers are < 2**31)."""
    for mult in (0x7FEB352D, 0x5BD1E995):
        x = (x ^ (x >> 16)) * mult & _MASK32
    return x ^ (x >> 16)


def uniforms(seed: int, row_keys: torch.Tensor, step: int) -> torch.Tensor:
    """One number in (0, 1) per row [B] (float64), a pure function of (seed, row key, step)."""
    bits = _hash32(_hash32(_hash32(row_keys & _MASK32) ^ (seed & _MASK32)) ^ step)
    return (bits.double() + 0.5) / 2**32


def choose(scores: torch.Tensor, params: DecodeParams, row_keys: torch.Tensor, step: int) -> torch.Tensor:
    """Pick the next token per row from processed scores [B, V] -> [B]."""
    if params.strategy == "greedy":
        return scores.argmax(-1)
    scores = top_k_top_p(scores, params.top_k, params.top_p) / params.temperature
    cdf = torch.softmax(scores.double(), dim=-1).cumsum(-1)  # [B, V]
    u = uniforms(params.seed, row_keys, step).to(cdf.device)[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, u).clamp_max(scores.shape[-1] - 1)[:, 0]
