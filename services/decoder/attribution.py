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

A family whose text side attends over the image positions themselves (LLaVA: the language model's
attention over the image-token positions; BLIP: its text decoder's cross-attention over the vision
tokens) gives a [S, N] directly; its map is that attention over the patches (a leading class token's
column dropped), renormalised the same way (`compose` with no pooler weights; the family's module says
how it averages).

S is the caption's generated tokens in the order of `LayerCaption.tokens` (the end token's step, the
last of `Decoded.cross_attention`, is left out; a caption that ended with the pad id keeps it, as its
tokens do).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from latent_verbalizer.shared.attributions import Attributions, map_key
from latent_verbalizer.shared.schemas import LayerCaption

METHOD = ("decoder cross-attention (mean over decoder layers and heads) x pooler attention (mean over heads) "
          "over the patches; class token dropped; each token's map sums to 1 over the grid")
DIRECT_METHOD = ("the text side's attention from each generated token over the image positions ({family}: its"
                 " own average over layers and heads); class token dropped; each token's map sums to 1 over the grid")


def compose(attention: torch.Tensor, pool_attention: torch.Tensor | None, grid: tuple[int, int]) -> torch.Tensor:
    """attention [S, N] (a generated step's attention over the N image positions the text side reads),
    pool_attention [N, T] (CoCa: each pooled token's attention over the class token and the gh x gw patches;
    None: the N positions are the patches themselves, a leading class token first when N = 1 + gh*gw)
    -> heat [S, gh, gw] float32, non-negative, each token's map summing to 1."""
    gh, gw = grid
    if pool_attention is None:
        if attention.shape[1] not in (gh * gw, 1 + gh * gw):
            raise ValueError(f"attention over {attention.shape[1]} positions, not a {gh}x{gw} grid (+ class token)")
        heat = attention[:, -gh * gw :].float()  # [S, gh*gw]
    else:
        if pool_attention.shape[1] != 1 + gh * gw:
            raise ValueError(f"pooler attention over {pool_attention.shape[1]} tokens, not 1 + {gh}x{gw}")
        heat = attention.float() @ pool_attention[:, 1:].to(attention.device, torch.float32)  # [S, gh*gw]
    heat = heat / heat.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return heat.view(-1, gh, gw)


@dataclass
class Captioned:
    """One image's (or one of its regions') captions at L layers with what their maps are made of."""

    captions: list[LayerCaption]  # L captions
    cross_attention: list[torch.Tensor]  # L x [steps, N]: Decoded.cross_attention
    pool_attention: torch.Tensor | None  # [L, N, T]: CoCa's pooler attention at those layers (see `compose`)
    region: int | None = None  # the region's index; None: the whole image


def per_image(
    captions: list[list[LayerCaption]], decoded_attention: list[torch.Tensor], pool_attention: torch.Tensor | None,
    region: int | None = None,
) -> list[Captioned]:
    """n images' captions (per image, L layers), their decoded rows' attention (image-major, n*L) and
    CoCa's pooler attention [L, n, N, T] (or None) -> one Captioned per image."""
    L = len(captions[0]) if captions else 0
    return [Captioned(caps, decoded_attention[i * L : (i + 1) * L],
                      None if pool_attention is None else pool_attention[:, i], region)
            for i, caps in enumerate(captions)]


def attributions(
    token_texts: Callable[[list[int]], list[str]], grid: tuple[int, int], input_box: tuple[float, float, float, float],
    parts: list[Captioned], method: str = METHOD,
) -> Attributions:
    """One image's file contents: every caption's maps [S, gh, gw] (S = len(caption.tokens)) under
    `map_key(layer, region)`, with its tokens' texts (each token decoded alone, `Family.token_texts`)."""
    maps, tokens = {}, {}
    for part in parts:
        pools = [None] * len(part.captions) if part.pool_attention is None else part.pool_attention
        for c, a, p in zip(part.captions, part.cross_attention, pools):
            key = map_key(c.layer, part.region)
            maps[key] = compose(a[: len(c.tokens)], p, grid).half().cpu().numpy()
            tokens[key] = token_texts(c.tokens)
    return Attributions(grid, input_box, method, maps, tokens)
