"""Encoder stage: images -> per-layer latent tokens for the text side, for every family
(`load_pixels`, `encode_batch`: the pipeline and the encoder worker run these), and CoCa's encoder
engine, which services.families.coca drives (everything below `encode_batch`).

    items -> load_pixels (the family's own preprocessing) -> pixels [n, 3, H, W]
          -> encode_batch -> Encoded (services.families.base): family.encode per vision forward, and with
             grounding the null (flat gray) image's latents, so the decoder side never encodes

For a CoCa ViT the decoder normally sees   attn_pool(x_L) -> ln_post -> drop token 0,
where x_L is the residual stream after the last block. Latent captioning applies the same path to
the residual stream x_i after EVERY block i. Shapes, for N images of T = 1 + grid**2 tokens:

    pixels [N, 3, H, W] -> blocks -> hidden [L, N, T, C]   (C = vision width, L = selected layers)
    hidden -> pool -> latents [L, N, Q-1, D]              (Q = pooler queries, D = embed dim)

Everything runs in ONE forward pass; the pooler runs as one batched call over layers x images.

A region (services.encoder.regions) restricts the pooler's keys to the patches inside it: the same
blocks' hidden states, pooled once more per region (`pool_regions`, a key mask [N, R, T]). Word ->
patch attributions (services.decoder.attribution) compose the decoder's cross-attention with the
pooler's attention weights, which `pool_regions(..., weights=True)` returns.

Grounding also wants the contrastive image embedding, exactly `model.encode_image` (unnormalised):
the pooled token 0 of the tower's LAST block, after ln_post, times visual.proj. `encode_grounded`
captures the whole tower for it (`with_last`) and takes it from the same pooler call:

    hidden [L', N, T, C] -> pool -> pooled [L', N, Q, D] -> latents [L, N, Q-1, D], embeddings [N, E]
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from PIL import Image

from latent_verbalizer.services.encoder.regions import with_whole_image
from latent_verbalizer.services.families.base import Encoded, Family
from latent_verbalizer.shared.blocks import Block, cached
from latent_verbalizer.shared.images import DEFAULT_MAX_PIXELS, ImageError, ImageItem, decode_image
from latent_verbalizer.shared.pretrained import DEMO_NOTE
from latent_verbalizer.shared.schemas import resolve_layers
from latent_verbalizer.shared.settings import DEMO_MODEL

log = logging.getLogger(__name__)

# Images larger than this (longest side, px) look like photos, not the demo model's 64-px scenes.
PHOTO_SIDE = 128


def load_pixels(
    family: Family, items: list[ImageItem], max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[torch.Tensor | None, list[ImageItem], dict[str, str]]:
    """Decode and preprocess (the model's own transform) every item that is a usable image.
    -> pixels [n, 3, H, W] on the model's device and dtype (None if n == 0), the n good items (each
    with its `size`), and {item id: reason} for the others."""
    good, tensors, errors = [], [], {}
    for item in items:
        try:
            if item.error:
                raise ImageError(item.error)
            image = decode_image(item.data, max_pixels)
            _note_photo_on_demo_model(family, item, image)
            tensors.append(family.preprocess(image))
            item.size = image.size
            good.append(item)
        except ImageError as e:
            errors[item.id] = str(e)
    if not tensors:
        return None, good, errors
    return torch.stack(tensors).to(family.device, family.dtype), good, errors


_noted_photo = False


def _note_photo_on_demo_model(family: Family, item: ImageItem, image: Image.Image) -> None:
    """Say once per process that the demo model is captioning what looks like a photo."""
    global _noted_photo
    if family.name == DEMO_MODEL and max(image.size) > PHOTO_SIDE and not _noted_photo:
        _noted_photo = True
        log.warning(f"{item.id} ({image.width}x{image.height}) is captioned by {DEMO_NOTE}")


@torch.inference_mode()
def encode_batch(
    family: Family, pixels: torch.Tensor, layers: list[int], *, grounding: bool = False,
    key_mask: torch.Tensor | None = None, attributions: bool = False, step: int | None = None,
) -> Encoded:
    """pixels [n, 3, H, W] -> Encoded, in vision forwards of at most `step` images (default: one). With
    grounding: the contrastive image embeddings where the family has them, and the null image's latents
    (encoded alone; the decoder side decides whether it needs to decode them). key_mask [n, R, T]: the
    regions' positions (services.encoder.regions); a family that reads regions through a mask over the
    image positions rather than latents of their own gets it back as `region_mask`."""
    step = step or len(pixels)
    contrastive = grounding and family.has("contrastive")
    parts = [family.encode(pixels[i : i + step], layers, contrastive=contrastive, attributions=attributions,
                           key_mask=None if key_mask is None else key_mask[i : i + step].to(pixels.device))
             for i in range(0, len(pixels), step)]
    encoded = parts[0] if len(parts) == 1 else Encoded.cat(parts)
    if key_mask is not None and encoded.region_latents is None:
        encoded.region_mask = key_mask.to(encoded.latents.device)
    if grounding:
        encoded.null_latents = family.encode(family.null_pixels(), layers).latents  # [L, 1, N, D]
    return encoded


def check_layers(visual: VisionTransformer, layers: list[int] | None) -> list[int]:
    """`resolve_layers` for this vision tower."""
    return resolve_layers(layers, len(visual.transformer.resblocks))


def vision_blocks(visual: VisionTransformer) -> list[Block]:
    """The tower's blocks as `shared.blocks.Block`s, kept per model: the same computation as
    open_clip's, with the products on weights reordered for oneDNN on CPU (B-32, 8 images: 0.35
    instead of 0.41 s). The first call makes them."""
    return cached(visual, _make_blocks)


def _make_blocks(visual: VisionTransformer) -> list[Block]:
    return [Block.of(b) for b in visual.transformer.resblocks]


@torch.inference_mode()
def capture_blocks(visual: VisionTransformer, pixels: torch.Tensor, layers: list[int]) -> torch.Tensor:
    """One forward pass through the blocks up to the last selected one, keeping the residual
    stream after each selected block. pixels [N, 3, H, W] -> hidden [L, N, T, C]."""
    x = visual._embeds(pixels)  # [N, T, C]: patchify + cls + pos-embed + ln_pre
    wanted = set(layers)
    kept: dict[int, torch.Tensor] = {}
    for i, block in enumerate(vision_blocks(visual)[: max(layers) + 1]):
        x = block(x)
        if i in wanted:
            kept[i] = x
    return torch.stack([kept[i] for i in layers])


@torch.inference_mode()
def pool_layers(visual: VisionTransformer, hidden: torch.Tensor) -> torch.Tensor:
    """The model's own attentional pooler + ln_post applied to every layer at once.
    hidden [L, N, T, C] -> latents [L, N, Q-1, D] (the first pooled token, the contrastive
    embedding, is dropped as in `CoCa._encode_image`)."""
    return _latents(visual, _pool(visual, hidden)[0][:, :, 0])


def _latents(visual: VisionTransformer, pooled: torch.Tensor) -> torch.Tensor:
    """pooled [L, N, Q, D] -> the tokens the decoder reads [L, N, Q-1, D] (open_clip's split)."""
    L, N, Q, D = pooled.shape
    _, tokens = visual._global_pool(pooled.reshape(L * N, Q, D))  # [L*N, Q-1, D]
    return tokens.reshape(L, N, tokens.shape[1], D)


def _pool(
    visual: VisionTransformer, hidden: torch.Tensor, key_mask: torch.Tensor | None = None, weights: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """hidden [L, N, T, C] -> every pooled token after ln_post [L, N, R, Q, D], and with `weights` the
    pooler's attention of each query over the T tokens, averaged over its heads [L, N, R, Q, T].

    key_mask [N, R, T] bool (True: the key is seen) pools each image R times, region r's queries
    seeing only its keys (services.encoder.regions); None: R = 1, every key seen. A region is just
    Q more queries, so the keys and values are projected once whatever R. `weights` computes the
    softmax explicitly (the fused kernel does not return it): the same values up to rounding."""
    pool = visual.attn_pool
    if pool is None or visual.attn_pool_contrastive is not None:
        raise ValueError("vision tower has no CoCa attentional pooler (attn_pool) to read layers through")
    L, N, T, C = hidden.shape
    R = 1 if key_mask is None else key_mask.shape[1]
    mha = pool.attn
    D, H = mha.embed_dim, mha.num_heads
    if mha._qkv_same_embed_dim:
        w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    else:
        w_q, w_k, w_v = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    b_q, b_k, b_v = mha.in_proj_bias.chunk(3)

    # Queries are learned constants: project them once.                 q [1, H, Q, D/H]
    q = F.linear(pool.ln_q(pool.query), w_q, b_q)
    Q = q.shape[0]
    q = q.view(1, Q, H, D // H).transpose(1, 2)
    # Keys/values per layer and image: one GEMM each over L*N*T rows.   k, v [L*N, H, T, D/H]
    x = pool.ln_k(hidden.reshape(L * N, T, C))
    k = F.linear(x, w_k, b_k).view(L * N, T, H, D // H).transpose(1, 2)
    v = F.linear(x, w_v, b_v).view(L * N, T, H, D // H).transpose(1, 2)
    attention = None
    if key_mask is None and not weights:
        out = F.scaled_dot_product_attention(q.expand(L * N, -1, -1, -1), k, v)  # [L*N, H, Q, D/H]
    else:
        # Region r's queries are rows r*Q .. r*Q+Q-1.                     q [1, 1, H, R*Q, D/H]
        q = q.repeat(1, 1, R, 1)[None]
        k, v = k.view(L, N, H, T, D // H), v.view(L, N, H, T, D // H)
        mask = None if key_mask is None else key_mask.repeat_interleave(Q, dim=1)[None, :, None]  # [1, N, 1, R*Q, T]
        if weights:
            scores = q @ k.transpose(-1, -2) * (D // H) ** -0.5  # [L, N, H, R*Q, T]
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            p = torch.softmax(scores.float(), dim=-1).to(v.dtype)
            out = p @ v  # [L, N, H, R*Q, D/H]
            attention = p.float().mean(2).view(L, N, R, Q, T)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [L, N, H, R*Q, D/H]
    out = mha.out_proj(out.transpose(-3, -2).reshape(L * N, R * Q, D))  # [L*N, R*Q, D]
    return visual.ln_post(out).reshape(L, N, R, Q, D), attention


@torch.inference_mode()
def pool_regions(
    visual: VisionTransformer, hidden: torch.Tensor, key_mask: torch.Tensor | None, weights: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """hidden [L, N, T, C], key_mask [N, R, T] (None: the whole image, R = 1) -> the decoder's tokens
    of every region [L, N, R, Q-1, D] and, with `weights`, the pooler's attention of those Q-1 queries
    over the T tokens, heads averaged [L, N, R, Q-1, T] (what word -> patch attributions compose with)."""
    pooled, attention = _pool(visual, hidden, key_mask, weights)
    L, N, R, Q, D = pooled.shape
    latents = _latents(visual, pooled.reshape(L, N * R, Q, D)).reshape(L, N, R, -1, D)
    return latents, None if attention is None else attention[:, :, :, Q - latents.shape[3] :]


@torch.inference_mode()
def encode(visual: VisionTransformer, pixels: torch.Tensor, layers: list[int]) -> torch.Tensor:
    """pixels [N, 3, H, W] -> latents [L, N, Q-1, D] for the selected layers."""
    return pool_layers(visual, capture_blocks(visual, pixels, layers))


def with_last(visual: VisionTransformer, layers: list[int]) -> list[int]:
    """The blocks to capture when the image embedding is wanted too: the selected ones, then the
    tower's last block unless it is selected (the embedding reads it, whatever the selection)."""
    last = len(visual.transformer.resblocks) - 1
    return layers if last in layers else [*layers, last]


@torch.inference_mode()
def pool_grounded(
    visual: VisionTransformer, hidden: torch.Tensor, layers: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [L', N, T, C] captured for `with_last(visual, layers)` -> (latents [L, N, Q-1, D] of the
    selected layers, contrastive image embeddings [N, E]: the last block's pooled token 0 @ visual.proj,
    what `model.encode_image(pixels, normalize=False)` gives)."""
    pooled = _pool(visual, hidden)[0][:, :, 0]  # [L', N, Q, D]
    last = with_last(visual, layers).index(len(visual.transformer.resblocks) - 1)
    embedding, _ = visual._global_pool(pooled[last])  # [N, D]
    return _latents(visual, pooled[: len(layers)]), embedding @ visual.proj  # [N, E]


@torch.inference_mode()
def encode_grounded(
    visual: VisionTransformer, pixels: torch.Tensor, layers: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """pixels [N, 3, H, W] -> (latents [L, N, Q-1, D], image embeddings [N, E]); see `pool_grounded`."""
    return pool_grounded(visual, capture_blocks(visual, pixels, with_last(visual, layers)), layers)


def captured_layers(visual: VisionTransformer, layers: list[int], grounding: bool) -> list[int]:
    """The blocks `pool_encoded` needs captured: with grounding, also the tower's last (`with_last`)."""
    return with_last(visual, layers) if grounding else layers


@torch.inference_mode()
def pool_encoded(
    visual: VisionTransformer, hidden: torch.Tensor, layers: list[int], grounding: bool = False,
    key_mask: torch.Tensor | None = None, attributions: bool = False,
) -> Encoded:
    """hidden [L', n, T, C] from `capture_blocks(visual, pixels, captured_layers(...))` -> everything the
    decoder stage reads: the latents, with grounding the image embeddings, with a key mask [n, R, T] the
    regions' latents, with attributions the pooler's weights over the whole image and each region."""
    L = len(layers)
    if grounding:
        encoded = Encoded(*pool_grounded(visual, hidden, layers))
    else:
        encoded = Encoded(pool_layers(visual, hidden))
    if key_mask is not None:
        key_mask = key_mask.to(hidden.device)
        encoded.region_latents = pool_regions(visual, hidden[:L], key_mask)[0]
    if attributions:
        keys = with_whole_image(key_mask, hidden.shape[1], hidden.shape[2], hidden.device)  # [n, 1+R, T]
        encoded.pool_attention = pool_regions(visual, hidden[:L], keys, weights=True)[1]
    return encoded
