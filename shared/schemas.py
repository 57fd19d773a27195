"""Data that crosses a boundary (CLI output files, HTTP, queue messages), as pydantic models."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from latent_verbalizer.shared.regions import Region

Strategy = Literal["greedy", "sample", "beam"]


class DecodeParams(BaseModel):
    """How captions are decoded. Lengths mean what they mean in open_clip's `CoCa.generate`:
    `seq_len` and `min_seq_len` count the start token, so seq_len=30 gives at most 28 words + EOT."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    strategy: Strategy = "greedy"
    seq_len: int = Field(30, ge=2, le=77, description="max tokens per caption, start and end token included")
    min_seq_len: int | None = Field(None, ge=1, description="the end token is blocked while fewer tokens are present;"
                                    " unset: the model's own default (5 for CoCa, as open_clip's generate; none for"
                                    " LLaVA and BLIP, as transformers' generate)")
    temperature: float = Field(1.0, gt=0, description="sample: softmax temperature (after top-k/top-p)")
    top_k: int | None = Field(None, ge=1, description="sample: keep the k most likely tokens")
    top_p: float | None = Field(None, gt=0, le=1, description="sample: keep the smallest set reaching p")
    repetition_penalty: float = Field(1.0, gt=0, description="CTRL-style penalty on tokens already present")
    num_beams: int = Field(4, ge=1, le=32, description="beam: beams per caption")
    length_penalty: float = Field(1.0, description="beam: score / length**length_penalty")
    seed: int = Field(0, ge=0, description="sample: same seed + same image + layer = same caption")

    @model_validator(mode="after")
    def _lengths(self) -> DecodeParams:
        if self.min_seq_len is not None and self.min_seq_len >= self.seq_len:
            raise ValueError(f"min_seq_len ({self.min_seq_len}) must be smaller than seq_len ({self.seq_len})")
        return self


class LayerCaption(BaseModel):
    layer: int
    caption: str
    tokens: list[int] = Field(description="generated token ids, start/end token excluded")
    entropy: list[float] = Field(description="bits, full softmax at each generated step (end token included)")
    mean_entropy: float
    # Grounding (services/decoder/grounding.py; absent when it is off). Cosines of the model's own
    # contrastive embeddings (encode_image / encode_text), in [-1, 1].
    image_score: float | None = Field(
        None, description="cosine of the caption's text embedding and the image's (a region's caption: the WHOLE"
                          " image's embedding, the only one the model has)"
    )
    retrieval_rank: int | None = Field(
        None, description="rank of the own image among the gallery by image_score (1 = best); null: one image,"
                          " and always for a region's captions"
    )
    gallery_size: int | None = Field(None, description="images the rank was taken among (own image included)")
    prior: bool | None = Field(
        None, description="caption equals this layer's caption for a flat gray image (its whole image, for regions too)"
    )
    prior_overlap: float | None = Field(None, description="token F1 (BPE ids) with the gray image's caption")
    last_layer_similarity: float | None = Field(
        None, description="cosine of the text embeddings of this caption and the deepest selected layer's (a"
                          " region's caption: the same region's at that layer)"
    )
    # Likelihood grounding (services/decoder/pmi.py, shared/pmi.py; absent when grounding is off). Natural
    # logs: ln p_T(token | prefix, this image) - ln p_T(token | prefix, gray null image), both at this layer,
    # p_T the decoder's softmax at temperature shared.pmi.TEMPERATURE.
    pmi: list[float] | None = Field(None, description="per token of `tokens`: how much more likely the image made"
                                                      " it than the null input (nats, at softmax temperature 4;"
                                                      " > tau: supported)")
    word_pmi: list[float] | None = Field(
        None, description="per whitespace-separated word of `caption`: the mean of its tokens' pmi (null when"
                          " tokens and words do not match up)"
    )
    image_pmi: float | None = Field(None, description="mean pmi over the tokens")
    supported_share: float | None = Field(
        None, description="share of the caption's content words (not function words) whose pmi exceeds tau"
                          " (shared/pmi.py); null: no content words"
    )


class RegionResult(BaseModel):
    """A region's captions (services.encoder.regions): at every layer the pooler read only the region's
    patches (and the class token with include_cls), then the decoder captioned as for the whole image."""

    region: Region = Field(description="the region as asked, labelled")
    box: list[float] = Field(min_length=4, max_length=4, description="x0, y0, x1, y1 in the image's pixels,"
                                                                     " clipped to the image")
    patches: int = Field(description="patches of the model's input the region's pooler queries read")
    layers: list[LayerCaption] = Field(description="its captions per layer; empty when it failed on this image")
    error: str | None = Field(None, description="why the region has no captions on this image (it covers no"
                                                " patch of the model's input); the image's own captions stand")


class ImageResult(BaseModel):
    """One line of results.jsonl: an image's caption per layer, or the reason it failed."""

    id: str
    source: str
    meta: dict | None = Field(None, description="key.json / key.txt carried through from a shard")
    layers: list[LayerCaption] | None = None
    size: list[int] | None = Field(None, min_length=2, max_length=2, description="the image's width, height (px)")
    input_box: list[float] | None = Field(
        None, min_length=4, max_length=4, description="x0, y0, x1, y1 in the image's pixels: the part the model's"
        " input shows after its preprocessing (resize + center crop); its patch grid tiles this box"
    )
    regions: list[RegionResult] | None = Field(None, description="each region's captions, in the order asked")
    error: str | None = None


def resolve_layers(layers: list[int] | None, n: int) -> list[int]:
    """Block indices of an n-block vision tower (negative ones count from the end); None means every
    block. Raises ValueError for a block that does not exist or a repeated one."""
    if layers is None:
        return list(range(n))
    out = []
    for i in layers:
        if not -n <= i < n:
            raise ValueError(f"layer {i} does not exist: the vision tower has blocks 0..{n - 1}")
        out.append(i % n)
    if len(set(out)) != len(out):
        raise ValueError(f"layers repeat: {layers}")
    return out
