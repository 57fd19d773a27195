"""Likelihood grounding (issue 22): which tokens of a caption came from the image.

For a caption decoded from layer L of an image, each token's pointwise mutual information with the image:

    pmi(token) = ln p_T(token | prefix, layer-L latents of the image) - ln p_T(token | prefix, layer-L latents
                 of the gray null image)

both read from the softmax of the logits at shared.pmi.TEMPERATURE (why: there). The first term is what decoding
computed when it chose the token (`Decoded.logprob`); the second comes from scoring the caption's own tokens,
teacher-forced, under the null input's latents at the same layer (the flat gray image of the prior,
services.decoder.grounding), through the family's `score` (services.families.base; batched by
services.decoder.stage.score): one call per layer over the batch's captions at that layer, all reading that layer's
one null row ([1, N, D]: CoCa's decoder projects its keys and values once); a caption that repeats at a layer (early
layers' word salad often does) is scored once. The whole image's null row serves region captions too, as the prior's
caption does.

What the per-token values become (per caption `pmi`, `word_pmi`, `image_pmi`, `supported_share`; per
labelled phrase `pmi`, `supported`) is shared.pmi's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from latent_verbalizer.shared import pmi
from latent_verbalizer.shared.schemas import LayerCaption

# score(rows [R, N, D] or [1, N, D], mask | None, tokens per caption, temperature) -> per caption the
# log-probabilities of its tokens, then of its end token: a family's teacher-forced scoring (Family.score, stage.score)
Score = Callable[[torch.Tensor, torch.Tensor | None, list[list[int]], float], list[torch.Tensor]]


def null_logprobs(score: Score, null: torch.Tensor, layer_index: Sequence[int],
                  tokens: Sequence[list[int]]) -> list[list[float]]:
    """null [L, N, D]: the null input's rows, one per layer; caption r (its `tokens[r]`) was decoded at the
    layer of null row `layer_index[r]` -> per caption ln p_T(token | prefix, null row) for each of its tokens."""
    unique: dict[tuple[int, tuple[int, ...]], list[float]] = {(j, tuple(t)): [] for j, t in zip(layer_index, tokens)}
    for j in sorted({j for j, _ in unique}):
        captions = [list(t) for k, t in unique if k == j]
        for caption, logp in zip(captions, score(null[j : j + 1], None, captions, pmi.TEMPERATURE), strict=True):
            unique[(j, tuple(caption))] = logp[: len(caption)].tolist()
    return [unique[(j, tuple(t))] for j, t in zip(layer_index, tokens)]


def annotate(caption: LayerCaption, logprob: Sequence[float], null_logprob: Sequence[float],
             token_texts: Sequence[str]) -> None:
    """Set the caption's `pmi` (per token), `word_pmi` (per caption word; None when its tokens and words
    do not match up), `image_pmi` (the tokens' mean) and `supported_share` (of its content words).
    logprob: decoding's, indexed like its entropy (the end token's last, unused here)."""
    values = [a - b for a, b in zip(logprob[: len(caption.tokens)], null_logprob, strict=True)]
    caption.pmi = values
    caption.image_pmi = sum(values) / len(values) if values else None
    runs = pmi.word_runs(token_texts, caption.caption)
    caption.word_pmi = None if runs is None else pmi.word_pmi(values, runs)
    caption.supported_share = None if runs is None else pmi.supported_share(
        pmi.caption_words(caption.caption), caption.word_pmi)
