"""Word -> patch attributions recomputed through open_clip's own modules, with no code of this project:
the pooler's and each decoder layer's nn.MultiheadAttention asked for their head-averaged weights, the
caption teacher-forced. tests/test_attributions.py compares the product's maps with it;
bench/attribution_bench.py --layers-choice averages its decoder layers in other ways."""

from __future__ import annotations

import torch


@torch.no_grad()
def pooler_weights(visual, pixels: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """pixels [1, 3, H, W] -> vision block `layer`'s pooled tokens the decoder reads [1, Q-1, D] and the
    pooler's weights of those queries over the T tokens (class token first) [Q-1, T]."""
    x = visual._embeds(pixels)  # [1, T, C]
    for block in visual.transformer.resblocks[: layer + 1]:
        x = block(x)
    pool = visual.attn_pool
    keys = pool.ln_k(x)
    pooled, weights = pool.attn(pool.ln_q(pool.query)[None], keys, keys, need_weights=True,
                                average_attn_weights=True)  # [1, Q, D], [1, Q, T]
    _, tokens = visual._global_pool(visual.ln_post(pooled))
    return tokens, weights[0, 1:]


@torch.no_grad()
def cross_attention(model, image_tokens: torch.Tensor, tokens: list[int], sot: int) -> torch.Tensor:
    """Each decoder layer's cross-attention weights of the steps that generated `tokens` (row s: the step
    whose output is token s). image_tokens [1, Q-1, D] -> [decoder layers, S, Q-1]."""
    decoder = model.text_decoder
    ids = torch.tensor([[sot, *tokens]])
    _, text = model._encode_text(ids)  # [1, S+1, D]
    weights = []
    for block, cross in zip(decoder.resblocks, decoder.cross_attn):
        text = block(text, attn_mask=decoder.attn_mask[: ids.shape[1], : ids.shape[1]])
        kv = cross.ln_1_kv(image_tokens)
        weights.append(cross.attn(cross.ln_1(text), kv, kv, need_weights=True, average_attn_weights=True)[1][0])
        text = cross(text, k_x=image_tokens, v_x=image_tokens)
    return torch.stack(weights)[:, : len(tokens)]


def maps(pool_weights: torch.Tensor, cross: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """pool_weights [Q-1, T], cross [S, Q-1] (decoder layers averaged as wanted) -> [S, gh, gw]: the
    product over the pooled tokens, the class token's column dropped, each row renormalised."""
    heat = cross @ pool_weights[:, 1:]
    return (heat / heat.sum(-1, keepdim=True)).view(len(cross), *grid)
