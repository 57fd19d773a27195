"""BLIP (transformers `BlipForConditionalGeneration`): every vision layer read by the model's own text decoder.

BLIP captions an image with
    pixels -> vision_model: embeddings, blocks 0..L-1 -> post_layernorm -> image tokens [n, T, C]  (T = 1 + patches)
    [DEC] (+ the prompt's tokens) -> text_decoder: per layer causal self-attention, cross-attention over the
    image tokens, MLP; then the cls head -> next-token logits; a caption ends with [SEP].
Layer i here is the residual stream after block i (transformers' `hidden_states[i + 1]`), sent through the same
`post_layernorm` into the same cross-attention: for the last block that is exactly the model's own
`last_hidden_state`, so the last layer's caption is the model's own `generate`, token for token.

`--prompt` is BLIP's conditional text prefix, tokenized as the model's `generate` takes it from its processor:
`[CLS] prompt [SEP]`, the first id replaced by [DEC] (bos) and the last one (the tokenizer's [SEP]) dropped.
The prefix is fed at the start slot (pos 0); captions (`tokens`) are what follows it.

The text decoder is stepped here rather than through `text_decoder.forward`, for two reasons:
  - transformers 4.55.4's BLIP text attention drops `encoder_attention_mask` (`BlipTextAttention` does not pass
    it on to `BlipTextSelfAttention`, which then reads None), so a region's mask over the image tokens would
    be ignored; here it is applied;
  - a step returns its cross-attention weights without asking every layer for all of its attentions.
Each step calls the model's own modules (embeddings, every Linear, the output LayerNorms, the MLP, the cls
head) and does only the attention arithmetic itself, in transformers' order (q k^T / sqrt(Dh), softmax, @ v);
tests check the tokens against the model's `generate` at every layer.
A region is a row mask over the image tokens (class token first, then the patches row-major): the cross-attention
reads only its positions. A word map is the cross-attention of each generated step over the image tokens
(`BlipStepper`). BlipForConditionalGeneration has no contrastive head (BLIP's ITM/ITC heads are separate
BlipForImageTextRetrieval checkpoints, which this does not load): image_score and retrieval_rank are null.
Shapes: B rows, T image tokens, C vision width, D text width, H heads, Dh = D / H, S positions, V vocabulary.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from transformers import AutoProcessor, BlipForConditionalGeneration

from latent_verbalizer.services.encoder.regions import Placement
from latent_verbalizer.services.families.base import (
    Encoded,
    Family,
    FamilyError,
    Geometry,
    Stepper,
    piece_texts,
    target_log_probs,
)
from latent_verbalizer.services.families.naming import MISSING
from latent_verbalizer.shared.models import DTYPES, resolve_device

log = logging.getLogger(__name__)



def load(model: str | Path, device: str = "cpu", dtype: str = "fp32", prompt: str | None = None) -> BlipFamily:
    """A BLIP captioner from a hub id or a local `save_pretrained` directory (model and processor). fp32 by
    default; bf16 works on a GPU. `prompt`: BLIP's conditional text prefix (None: none, as the model's default)."""
    name = str(model)
    if dtype not in DTYPES:
        raise FamilyError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    try:
        blip = BlipForConditionalGeneration.from_pretrained(name, torch_dtype=DTYPES[dtype])
        processor = AutoProcessor.from_pretrained(name)
    except OSError as e:
        if not Path(name).is_dir():
            raise  # a hub id: load_family says what to copy where
        raise FamilyError(f"{name} is not a loadable BLIP directory (save_pretrained's config.json, weights,"
                          f" tokenizer and processor files): {e}") from e
    torch_device = resolve_device(device)
    blip.to(torch_device).eval().requires_grad_(False)
    family = BlipFamily(blip, processor, name, torch_device, DTYPES[dtype], prompt)
    log.info("model loaded", extra={"model": name, "family": "blip", "device": str(torch_device),
                                    "layers": family.num_layers, "prefix_tokens": len(family.prefix)})
    return family


class BlipFamily(Family):
    """One loaded BLIP captioner behind the family interface (services/families/base.py)."""

    family = "blip"
    pretrained = None
    force_end_at_limit = False  # as the model's generate: at the length limit a caption just stops
    missing = MISSING["blip"]  # extras it lacks -> why: no contrastive head, so image_score/retrieval_rank are null

    def __init__(self, model: BlipForConditionalGeneration, processor, name: str, device: torch.device,
                 dtype: torch.dtype, prompt: str | None = None) -> None:
        text = model.config.text_config
        if getattr(text, "position_embedding_type", "absolute") != "absolute":
            raise FamilyError(f"{name}: text position embeddings {text.position_embedding_type!r} are not supported"
                              " (BLIP captioners use 'absolute')")
        self.model, self.processor, self.tokenizer = model, processor, processor.tokenizer
        self.name, self.device, self.dtype, self.prompt = name, device, dtype, prompt
        self.num_layers = model.config.vision_config.num_hidden_layers
        self.feature_layer = self.num_layers - 1  # the model reads its last block
        self.start_id, self.pad_id = text.bos_token_id, text.pad_token_id
        self.end_ids = self.stop_ids = (text.sep_token_id,)  # BLIP's generate passes eos_token_id = sep_token_id
        self.prefix = self._prefix(prompt)  # [P] long: what the start slot feeds
        # HF's min_length counts the whole sequence, the prefix included; ours counts the start slot as one.
        min_length = model.text_decoder.generation_config.min_length or 0
        self.default_min_seq_len = max(1, min_length - (len(self.prefix) - 1))
        self.max_seq_len = text.max_position_embeddings - (len(self.prefix) - 1)  # the start slot holds the prefix

    def _prefix(self, prompt: str | None) -> torch.Tensor:
        """[DEC] and the prompt's tokens, built as `BlipForConditionalGeneration.generate` builds its input_ids:
        the processor's ids with the first replaced by bos and the last (the tokenizer's [SEP]) dropped."""
        if not prompt:
            return torch.tensor([self.start_id])
        ids = self.processor(text=prompt).input_ids
        return torch.tensor([self.start_id, *ids[1:-1]])

    # --- encoder side ---

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """The model's own image processor: PIL image -> [3, H, W] float32."""
        return self.processor.image_processor(images=image.convert("RGB"), return_tensors="pt").pixel_values[0]

    @property
    def geometry(self) -> Geometry:
        """The image tokens are the class token, then the patches row-major; the image processor resizes the
        whole image to the input size (no crop)."""
        vision = self.model.config.vision_config
        side, patch = vision.image_size, vision.patch_size
        size = dict(self.processor.image_processor.size)
        if not self.processor.image_processor.do_resize or (size.get("height"), size.get("width")) != (side, side):
            raise FamilyError(f"regions cannot be placed: the image processor gives {size}, the model reads {side}")
        return Geometry((side, side), (patch, patch), True,
                        lambda w, h: Placement((w, h), (side, side), (side / w, side / h), (0.0, 0.0)))

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor, layers: list[int], *, contrastive: bool = False,
               key_mask: torch.Tensor | None = None, attributions: bool = False) -> Encoded:
        """pixels [n, 3, H, W] -> latents [L, n, T, C]: ONE vision forward, each selected block's residual stream
        through post_layernorm (for the last block: exactly the model's last_hidden_state). Regions and word maps
        need nothing more from the encoder: a region is a row mask over the image tokens (`stepper`, `score`), a
        word map the decoder's cross-attention over them (`BlipStepper.step`). key_mask [n, R, T] (T = the
        geometry's positions: the class token, then the patches = the image tokens) comes back as `region_mask`."""
        if contrastive:
            self.require("contrastive")
        hidden = self.hidden_states(pixels, layers)  # [L, n, T, C]
        if key_mask is not None and key_mask.shape[-1] != hidden.shape[2]:
            raise ValueError(f"key_mask over {key_mask.shape[-1]} positions; the model reads {hidden.shape[2]}")
        return Encoded(latents=self.model.vision_model.post_layernorm(hidden),
                       region_mask=None if key_mask is None else key_mask.bool())

    @torch.inference_mode()
    def hidden_states(self, pixels: torch.Tensor, layers: list[int]) -> torch.Tensor:
        """pixels [n, 3, H, W] -> the residual stream after each selected block [L, n, T, C] (before post_layernorm):
        ONE vision forward."""
        bad = [i for i in layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"layers {bad} out of range: {self.name} has vision blocks 0..{self.num_layers - 1}")
        states = self.model.vision_model(pixel_values=pixels.to(self.device, self.dtype),
                                         output_hidden_states=True).hidden_states
        return torch.stack([states[i + 1] for i in layers])

    # --- decoder side ---

    def stepper(self, rows: torch.Tensor, mask: torch.Tensor | None, max_len: int, attention: bool = False,
                text_embeddings: bool = False) -> BlipStepper:
        """rows [B, T, C] image tokens, mask [B, T] bool (True = read; None = all), max_len = seq_len. The attention
        a step fills needs nothing prepared, so `attention` changes nothing here."""
        if text_embeddings:
            self.require("contrastive")
        if max_len > self.max_seq_len:
            raise ValueError(f"seq_len {max_len} with a {len(self.prefix)}-token prefix exceeds the text decoder's"
                             f" {self.model.config.text_config.max_position_embeddings} positions")
        return BlipStepper(self.model.text_decoder, rows.to(self.device, self.dtype), mask,
                           self.prefix.to(self.device), len(self.prefix) + max_len)

    @torch.inference_mode()
    def score(self, rows: torch.Tensor, mask: torch.Tensor | None, tokens: list[list[int]],
              temperature: float = 1.0) -> list[torch.Tensor]:
        """Teacher-forced log-probs (float32, natural log, at `temperature`) of each row's tokens, then of the end
        token: ONE decoder forward of [prefix, tokens] per batch, right-padded (causal: padding cannot reach earlier
        positions); the vocabulary projection then goes a few rows at a time (R x S x V floats can be GBs)."""
        R, P, longest = len(tokens), len(self.prefix), max(map(len, tokens), default=0)
        rows = rows.expand(R, -1, -1) if rows.shape[0] == 1 else rows  # [1, N, D]: every caption reads that row
        ids = torch.full((R, P + longest), self.pad_id, dtype=torch.long, device=self.device)
        targets = torch.full((R, longest + 1), self.pad_id, dtype=torch.long, device=self.device)
        ids[:, :P] = self.prefix.to(self.device)
        for r, t in enumerate(tokens):
            ids[r, P : P + len(t)] = targets[r, : len(t)] = torch.tensor(t, dtype=torch.long)
            targets[r, len(t)] = self.end_id
        stepper = self.stepper(rows, mask, longest + 1)
        states = stepper.states(ids, 0)[:, P - 1 :]  # [R, longest + 1, D]: position P-1+k predicts token k
        logp = target_log_probs(stepper.head, states, targets, self.model.config.text_config.vocab_size, temperature)
        return [logp[r, : len(t) + 1].cpu() for r, t in enumerate(tokens)]

    def decode_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def token_texts(self, ids: list[int]) -> list[str]:
        """Each token's text as it appears in the decoded caption (they join to `decode_text`): a word's first
        piece with the space before it, a WordPiece continuation ('##s') without."""
        return piece_texts(self.decode_text, self.tokenizer.decode, ids)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, S, D] -> [B, H, S, Dh]"""
    return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None):
    """q [B, H, S, Dh] over k, v [B, H, S', Dh] (bias broadcast to [B, H, S, S'], -inf = not read), as transformers'
    BLIP text attention computes it -> (context [B, S, D], weights [B, H, S, S'])."""
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores + bias
    p = scores.softmax(-1)
    context = torch.matmul(p, v).transpose(1, 2)  # [B, S, H, Dh]
    return context.reshape(*context.shape[:2], -1), p


class BlipStepper(Stepper):
    """BLIP's text decoder over B rows of image tokens, with caches:
        self-attention  keys/values [B, 2, H, S_max, Dh] per decoder layer, filled position by position;
        cross-attention keys/values [B, H, T, Dh] per decoder layer, projected once from the rows' image tokens,
                        with the rows' mask as an additive bias [B, 1, 1, T] (0 read, -inf not).
    A step's attention over the image tokens (word -> patch maps) is the cross-attention of its newest position,
    the plain mean over decoder layers and heads: every decoder layer reads the image tokens directly (its own
    keys and values of the same tokens, not the previous layer's output), and each layer's cross-attention adds
    to the residual stream, so the mean weighs them alike with no layer chosen by hand; for CoCa the same mean
    was measured against last-layers-only choices and pointed best (services.decoder.attribution). No trained
    BLIP weights are at hand offline, so there is no BLIP-specific measurement behind the choice."""

    def __init__(self, text_decoder: nn.Module, rows: torch.Tensor, mask: torch.Tensor | None,
                 prefix: torch.Tensor, max_positions: int) -> None:
        B, T, _ = rows.shape
        self.bert, self.head = text_decoder.bert, text_decoder.cls
        self.layers = list(self.bert.encoder.layer)
        self.heads = self.layers[0].attention.self.num_attention_heads
        self.prefix = prefix  # [P]
        D = self.bert.config.hidden_size
        with torch.inference_mode():
            self.cross = [(_heads(layer.crossattention.self.key(rows), self.heads),
                           _heads(layer.crossattention.self.value(rows), self.heads)) for layer in self.layers]
        self.cross_bias = None
        if mask is not None:
            if mask.shape != (B, T):
                raise ValueError(f"image token mask of shape {tuple(mask.shape)}, expected {(B, T)}")
            if not mask.any(-1).all():
                raise ValueError("an image token mask reads no image token")
            zero = torch.zeros((), dtype=rows.dtype, device=rows.device)
            self.cross_bias = torch.where(mask.to(rows.device), zero, -math.inf)[:, None, None, :]
        self.cache = [torch.zeros(B, 2, self.heads, max_positions, D // self.heads, dtype=rows.dtype,
                                  device=rows.device) for _ in self.layers]

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, pos: int, attention: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [b] at slot `pos` (pos 0: the start slot, which feeds the prefix [DEC] + prompt instead)
        -> next-token logits [b, V] float32. `attention` [b, T]: filled with this step's cross-attention over the
        image tokens, mean over decoder layers and heads."""
        if pos == 0:
            ids, first = self.prefix.expand(tokens.shape[0], -1), 0
        else:
            ids, first = tokens[:, None], len(self.prefix) - 1 + pos
        return self.head(self.states(ids, first, attention)[:, -1]).float()

    @torch.inference_mode()
    def states(self, ids: torch.Tensor, first: int, attention: torch.Tensor | None = None) -> torch.Tensor:
        """ids [b, S] at positions first..first+S-1 -> the decoder's last states [b, S, D], before the cls head (the
        caches take their keys and values). `attention` [b, T]: the last position's cross-attention, mean over
        layers and heads."""
        S, last = ids.shape[1], first + ids.shape[1]
        positions = torch.arange(first, last, device=ids.device)[None]
        x = self.bert.embeddings(input_ids=ids, position_ids=positions)  # [b, S, D]
        causal = None
        if S > 1:  # position s reads positions 0..first+s
            future = positions[0, :, None] < torch.arange(last, device=ids.device)
            causal = torch.zeros(future.shape, dtype=x.dtype, device=x.device).masked_fill(future, -math.inf)
        if attention is not None:
            attention.zero_()
        for layer, cache, (cross_k, cross_v) in zip(self.layers, self.cache, self.cross):
            own = layer.attention
            q = _heads(own.self.query(x), self.heads)
            cache[:, 0, :, first:last] = _heads(own.self.key(x), self.heads)
            cache[:, 1, :, first:last] = _heads(own.self.value(x), self.heads)
            context, _ = _attend(q, cache[:, 0, :, :last], cache[:, 1, :, :last], causal)
            x = own.output(context, x)  # dense, then LayerNorm(. + x)
            cross = layer.crossattention
            context, p = _attend(_heads(cross.self.query(x), self.heads), cross_k, cross_v, self.cross_bias)
            x = layer.feed_forward_chunk(cross.output(context, x))
            if attention is not None:
                attention += p[:, :, -1].float().mean(1) / len(self.layers)
        return x

    def keep(self, rows: torch.Tensor) -> None:
        """Continue with these batch rows [b'], in this order (finished rows leave; beams reorder and repeat)."""
        self.cache = [c.index_select(0, rows) for c in self.cache]
        self.cross = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in self.cross]
        if self.cross_bias is not None:
            self.cross_bias = self.cross_bias.index_select(0, rows)


@torch.inference_mode()
def reference_tokens(family: BlipFamily, image: Image.Image, layer: int, max_new: int) -> list[int]:
    """The model's own code path at `layer`, which the family's greedy captions equal token for token (tests,
    bench/family_bench.py): the vision model's hidden_states[layer + 1] through post_layernorm into
    `text_decoder.generate` with the input_ids, end and pad ids `BlipForConditionalGeneration.generate` gives it
    (at the last layer that IS the model's generate), max_new_tokens, greedy -> the ids after the prefix, the end
    token and what follows removed (as results.jsonl's `tokens`)."""
    model, text = family.model, family.model.config.text_config
    pixels = family.processor(images=image, return_tensors="pt").pixel_values.to(family.device, family.dtype)
    hidden = model.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[layer + 1]
    input_ids = family.processor(text=family.prompt, return_tensors="pt").input_ids if family.prompt else \
        torch.tensor([[text.bos_token_id, text.eos_token_id]])
    input_ids[:, 0] = text.bos_token_id
    out = model.text_decoder.generate(input_ids=input_ids[:, :-1].to(family.device), eos_token_id=text.sep_token_id,
                                      pad_token_id=text.pad_token_id, max_new_tokens=max_new, do_sample=False,
                                      encoder_hidden_states=model.vision_model.post_layernorm(hidden))
    generated = out[0, input_ids.shape[1] - 1 :].tolist()
    return generated[: generated.index(text.sep_token_id)] if text.sep_token_id in generated else generated
