"""Word -> patch attributions: which patches of a layer each generated token was read from.

A caption at vision layer i is decoded from the pooler's Q-1 tokens of that layer. Two attentions
lead from a generated token back to the patches, and the map composes them:

    a [S, Q-1]   the decoder's cross-attention of each generated step over the pooled tokens,
                 averaged over its heads and decoder layers (`TextDecoder.step`)
    P [Q-1, T]   the pooler's attention of those queries over the layer's T tokens, averaged over its
                 heads (`services.encoder.stage.pool_regions(..., weights=True)`); token 0 is the
                 class token, then the gh x gw patches row-major

    heat[s, patch] = sum_q a[s, q] P[q, patch],  the class-token column dropped, then renormalised to
                     sum 1 over the grid                                            -> [S, gh, gw]

So heat[s] is a distribution over the patches: the share of step s's attention that reaches each
patch through the pooled tokens (what reaches the class token, which sees the whole image, is left out).

Why the plain mean over every decoder layer and head. Attention rollout's baseline is the mean over
heads; a product through the decoder's layers (rollout proper) does not apply, since every decoder
layer reads the same pooled tokens directly rather than the previous layer's output. Each layer's
cross-attention contributes to the step's state additively (residual stream), so their mean weighs
them alike, with no layer chosen by hand. Last layers only, as attention maps of captioners often take
them, were measured and are no better: on the demo model (3 decoder layers; `python
bench/attribution_bench.py --layers-choice --n 60`: 60 synthetic scenes, the pointing game of the last
vision layer's 200 colour and shape words) the mean over all layers points right for 100% of the words,
the last layer alone 95%, the last two 99.5%, the first alone 98%.

S is the caption's generated tokens in the order of `LayerCaption.tokens` (the end token's step, the
last of `Decoded.cross_attention`, is left out; a caption that ended with the pad id keeps it, as its
tokens do).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from open_clip.tokenizer import SimpleTokenizer

from latent_verbalizer.shared.attributions import Attributions, map_key
from latent_verbalizer.shared.schemas import LayerCaption

METHOD = ("decoder cross-attention (mean over decoder layers and heads) x pooler attention (mean over heads) "
          "over the patches; class token dropped; each token's map sums to 1 over the grid")


def compose(cross_attention: torch.Tensor, pool_attention: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """cross_attention [S, Q-1] (a generated step's attention over the pooled tokens), pool_attention
    [Q-1, T] (each pooled token's attention over the class token and the gh x gw patches)
    -> heat [S, gh, gw] float32, non-negative, each token's map summing to 1."""
    gh, gw = grid
    if pool_attention.shape[1] != 1 + gh * gw:
        raise ValueError(f"pooler attention over {pool_attention.shape[1]} tokens, not 1 + {gh}x{gw}")
    heat = cross_attention.float() @ pool_attention[:, 1:].to(cross_attention.device, torch.float32)  # [S, gh*gw]
    heat = heat / heat.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return heat.view(-1, gh, gw)


@dataclass
class Captioned:
    """One image's (or one of its regions') captions at L layers with what their maps are made of."""

    captions: list[LayerCaption]  # L captions
    cross_attention: list[torch.Tensor]  # L x [steps, Q-1]: Decoded.cross_attention
    pool_attention: torch.Tensor  # [L, Q-1, T]: the pooler's attention at those layers
    region: int | None = None  # the region's index; None: the whole image


def per_image(
    captions: list[list[LayerCaption]], decoded_attention: list[torch.Tensor], pool_attention: torch.Tensor,
    region: int | None = None,
) -> list[Captioned]:
    """n images' captions (per image, L layers), their decoded rows' cross-attention (image-major, n*L) and
    the pooler's attention [L, n, Q-1, T] -> one Captioned per image."""
    L = pool_attention.shape[0]
    return [Captioned(caps, decoded_attention[i * L : (i + 1) * L], pool_attention[:, i], region)
            for i, caps in enumerate(captions)]


def attributions(
    tokenizer: SimpleTokenizer, grid: tuple[int, int], input_box: tuple[float, float, float, float],
    parts: list[Captioned],
) -> Attributions:
    """One image's file contents: every caption's maps [S, gh, gw] (S = len(caption.tokens)) under
    `map_key(layer, region)`, with its tokens' texts (each token decoded alone)."""
    maps, tokens = {}, {}
    for part in parts:
        for c, a, p in zip(part.captions, part.cross_attention, part.pool_attention):
            key = map_key(c.layer, part.region)
            maps[key] = compose(a[: len(c.tokens)], p, grid).half().cpu().numpy()
            tokens[key] = [tokenizer.decode([t]) for t in c.tokens]
    return Attributions(grid, input_box, METHOD, maps, tokens)
