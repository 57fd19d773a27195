"""The LLaVA family: every vision layer read through the model's own language model.

A model is transformers' `LlavaForConditionalGeneration` (llava-hf/llava-1.5-7b-hf, bakLlava, llava-interleave,
...) with its processor, loaded from a hub id or a local `save_pretrained` directory (`load`).

How layer i reaches the language model, exactly as the model feeds its own feature layer:

    pixels [n, 3, H, W] --vision tower, ONE forward, all hidden states--> hidden_states[i + 1]  [n, 1 + P, C]
      --select (config.vision_feature_select_strategy: "default" drops the CLS token, "full" keeps it)--> [n, N, C]
      --multi_modal_projector (linear, act, linear)--> latents[i]  [n, N, D]   (D = the language model's width)

and a row (one image at one layer) is the prompt's token embeddings with the row's N latents at the N image-token
positions. The prompt is the processor's chat template on one user message [image, text=prompt] with the
generation prompt added (a model without a template: "<image>\\n{prompt}"), tokenised by the processor, so a row
is `model.generate(**processor(images=..., text=...), vision_feature_layer=i + 1)`'s input, token for token.

A config whose `vision_feature_layer` is a list concatenates those layers' tokens before the projector. Layer i
then fills every slot of that concatenation with layer i's tokens, i.e. what `generate(..., vision_feature_layer=
[i + 1] * k)` reads; `feature_layer` is the deepest listed layer, and no single layer reproduces the model's own
mixed input.

`rescale_layers` (setting LV_RESCALE_LAYERS, off by default): the projector was trained on one layer and token
norms grow with depth, so an intermediate layer's tokens are off the projector's training distribution in scale.
With it on, each image's selected tokens of layer i are multiplied by mean_token_norm(feature layer) /
mean_token_norm(layer i) of that image before the projector; the feature layer itself is unchanged (factor 1).
Off by default from the measurement on llava_synth_demo (docs/demo_model.md): no gain below the feature layer.

Decoding goes through the project's one decoding loop with `LlavaStepper`: position 0 prefills the prompt for
all rows in one forward, every later step feeds one token per live row against a transformers `DynamicCache`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoConfig, AutoProcessor, DynamicCache, LlavaForConditionalGeneration

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
from latent_verbalizer.shared.settings import get_settings

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "Describe the image briefly."


class LlavaFamily(Family):
    """One loaded LLaVA model behind the family interface (services/families/base.py)."""

    family = "llava"

    def __init__(self, name: str, model: LlavaForConditionalGeneration, processor, device: torch.device,
                 prompt: str, rescale_layers: bool = False) -> None:
        config = model.config
        self.name, self.model, self.processor, self.tokenizer = name, model, processor, processor.tokenizer
        self.pretrained, self.device, self.dtype = None, device, model.dtype
        self.num_layers = config.vision_config.num_hidden_layers
        wanted = config.vision_feature_layer
        # the layers the model itself reads (several when its config lists several): every slot reads layer i
        self.feature_layers = [_block(v, self.num_layers) for v in (wanted if isinstance(wanted, list) else [wanted])]
        self.feature_layer = max(self.feature_layers)
        self.rescale_layers = rescale_layers
        self.prompt = prompt
        self.prompt_ids = _prompt_ids(processor, prompt, config.image_token_id)  # [P] long
        self.image_positions = (self.prompt_ids == config.image_token_id).nonzero()[:, 0]  # [N] long
        self.start_id = int(self.prompt_ids[-1])  # the start slot feeds the whole prompt; its last token stands for it
        self.end_ids = self.stop_ids = _end_ids(model, processor)
        pad = model.generation_config.pad_token_id
        self.pad_id = self.end_ids[0] if pad is None else pad
        self.force_end_at_limit = False  # generate just stops at max_new_tokens
        self.default_min_seq_len = _min_seq_len(model)
        self.max_seq_len = config.text_config.max_position_embeddings - len(self.prompt_ids) + 1
        self.missing = dict(MISSING["llava"])

    # --- encoder side ---
    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> [3, H, W] float32, by the model's own image processor."""
        return self.processor.image_processor(images=image, return_tensors="pt")["pixel_values"][0]

    @property
    def geometry(self) -> Geometry:
        """The image positions are the vision tower's patches row-major (after the CLS token with "full")."""
        vision = self.model.config.vision_config
        side, patch = vision.image_size, vision.patch_size
        cls = len(self.image_positions) == (side // patch) ** 2 + 1
        image_processor = self.processor.image_processor
        return Geometry((side, side), (patch, patch), cls, lambda w, h: _placement(image_processor, w, h))

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor, layers: list[int], *, contrastive: bool = False,
               key_mask: torch.Tensor | None = None, attributions: bool = False) -> Encoded:
        """pixels [n, 3, H, W] -> Encoded.latents [L, n, N, D]: layer i's selected tokens through the projector.
        A region reads the image's own latents through a mask over the N image positions: key_mask [n, R, T]
        (T = the geometry's positions, which are the N image positions) comes back as `region_mask`, for the
        stepper and score to hide the rest from the language model. Word maps need nothing from the encoder:
        the language model's attention over the image positions is the map (`LlavaStepper`)."""
        if contrastive:
            self.require("contrastive")
        N = len(self.image_positions)
        if key_mask is not None and key_mask.shape[-1] != N:
            raise ValueError(f"key_mask over {key_mask.shape[-1]} positions; the model reads {N} image positions")
        latents = torch.stack([self.model.multi_modal_projector(t) for t in self.vision_tokens(pixels, layers)])
        return Encoded(latents=latents, region_mask=None if key_mask is None else key_mask.bool())

    @torch.inference_mode()
    def hidden_states(self, pixels: torch.Tensor, layers: list[int]) -> torch.Tensor:
        """pixels [n, 3, H, W] -> the vision tower's residual stream after each selected block [L, n, T, C]
        (every token, CLS included; before selection, rescaling and the projector)."""
        states = self.model.vision_tower(pixels.to(self.device, self.dtype), output_hidden_states=True).hidden_states
        return torch.stack([states[i + 1] for i in self._checked(layers)])

    def describe(self) -> dict:
        return {**super().describe(), "rescale_layers": self.rescale_layers}

    @torch.inference_mode()
    def vision_tokens(self, pixels: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
        """pixels [n, 3, H, W] -> per layer, what the projector reads: [n, N, k*C] (k = listed feature layers),
        rescaled when `rescale_layers` is on. One vision-tower forward for all layers."""
        states = self.model.vision_tower(pixels.to(self.device, self.dtype), output_hidden_states=True).hidden_states
        drop = 1 if self.model.config.vision_feature_select_strategy == "default" else 0  # "default": no CLS

        def selected(i: int) -> torch.Tensor:  # [n, N, C]
            return states[i + 1][:, drop:]

        reference = selected(self.feature_layer)
        out = []
        for i in self._checked(layers):
            tokens = selected(i)
            if self.rescale_layers and i != self.feature_layer:
                scale = _mean_norm(reference) / _mean_norm(tokens)  # [n, 1, 1]
                tokens = tokens * scale
            out.append(torch.cat([tokens] * len(self.feature_layers), dim=-1))  # every listed slot reads layer i
        return out

    def _checked(self, layers: list[int]) -> list[int]:
        bad = [i for i in layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"layers {bad} out of range: the vision tower has {self.num_layers} blocks (0-based)")
        return layers

    # --- decoder side ---
    def stepper(self, rows: torch.Tensor, mask: torch.Tensor | None, max_len: int, attention: bool = False,
                text_embeddings: bool = False) -> LlavaStepper:
        if text_embeddings:
            self.require("contrastive")
        return LlavaStepper(self, rows, mask, max_len)

    @torch.inference_mode()
    def score(self, rows: torch.Tensor, mask: torch.Tensor | None, tokens: list[list[int]],
              temperature: float = 1.0) -> list[torch.Tensor]:
        """rows [R, N, D], tokens R lists -> per row the log-probabilities [len + 1] float32 (at `temperature`) of
        its tokens and then of the end token, teacher-forced: one forward over prompt + tokens for all R rows
        (right-padded; the causal mask keeps the padding out of every position that is read); the vocabulary
        projection a few rows at a time (base.target_log_probs)."""
        R, T = len(tokens), max(map(len, tokens), default=0)
        rows = rows.expand(R, -1, -1) if rows.shape[0] == 1 else rows  # [1, N, D]: every caption reads that row
        targets = torch.full((R, T + 1), self.end_id, dtype=torch.long)  # its tokens, then the end token
        for r, t in enumerate(tokens):
            targets[r, : len(t)] = torch.tensor(t, dtype=torch.long)
        targets = targets.to(self.device)
        embeds = torch.cat([self._prompt_embeddings(rows), self._embed(targets[:, :T])], dim=1)  # [R, P + T, D]
        hidden = self._language_model(embeds, self._attention_mask(mask, R, T), start=0)[0]
        P = len(self.prompt_ids)
        vocab = self.model.config.text_config.vocab_size
        # [R, T + 1]: position P-1+k predicts token k
        logp = target_log_probs(self.model.lm_head, hidden[:, P - 1 :], targets, vocab, temperature)
        return [logp[r, : len(t) + 1].cpu() for r, t in enumerate(tokens)]

    def decode_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def token_texts(self, ids: list[int]) -> list[str]:
        """Each token's text as it appears in the decoded caption (leading space kept), for word grouping."""
        return piece_texts(lambda prefix: self.tokenizer.decode(prefix, skip_special_tokens=True),
                           self.tokenizer.decode, ids)

    # --- shared by the stepper and score ---
    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids)

    def _prompt_embeddings(self, rows: torch.Tensor) -> torch.Tensor:
        """rows [B, N, D] -> the prompt's embeddings [B, P, D] with each row's image tokens at the image positions."""
        B, N = rows.shape[:2]
        if N != len(self.image_positions):
            raise ValueError(f"rows have {N} image tokens; the prompt has {len(self.image_positions)} image positions")
        embeds = self._embed(self.prompt_ids.to(self.device)).expand(B, -1, -1).clone()  # [B, P, D]
        embeds[:, self.image_positions.to(self.device)] = rows.to(self.device, embeds.dtype)
        return embeds

    def _attention_mask(self, mask: torch.Tensor | None, B: int, extra: int) -> torch.Tensor:
        """[B, P + extra] long: 1 everywhere except the image positions a row's mask [B, N] hides."""
        attend = torch.ones(B, len(self.prompt_ids) + extra, dtype=torch.long, device=self.device)
        if mask is not None:
            attend[:, self.image_positions.to(self.device)] = mask.to(self.device).long()
        return attend

    def _language_model(
        self, embeds: torch.Tensor, attend: torch.Tensor, start: int, cache: DynamicCache | None = None,
        attention: bool = False,
    ):
        """One forward of the language model over embeds [B, S, D] at positions start .. start + S - 1, with the
        2-D attention mask attend [B, start + S]. Returns (hidden [B, S, D], attentions per layer or None).

        Positions are the tokens' places in the prompt + caption whatever the mask hides: a hidden image position
        is a key no one reads, not a removed token, so every other token keeps its position (its RoPE angle), the
        region's patches their place in the raster, the prompt's text its distance to the answer."""
        S = embeds.shape[1]
        positions = torch.arange(start, start + S, device=self.device)
        with _eager_attention(self.model.language_model) if attention else contextlib.nullcontext():
            out = self.model.language_model(
                inputs_embeds=embeds, attention_mask=attend, position_ids=positions[None].expand(embeds.shape[0], -1),
                cache_position=positions, past_key_values=cache, use_cache=cache is not None,
                output_attentions=attention,
            )
        return out.last_hidden_state, (out.attentions if attention else None)


class LlavaStepper(Stepper):
    """The decoding loop's view of B rows (services/families/base.py `Stepper`).

    pos 0: one prefill forward of the prompt for all rows (their image tokens at the image positions), which
    returns the first generated token's logits; the token passed at pos 0 is not read (the prompt is the start).
    pos t >= 1: the rows' token at position t goes in at sequence position P + t - 1 against the KV cache.

    Attention (when asked; eager attention for those forwards only, since SDPA returns no weights): the
    attention of the step's query position (the token just fed; at pos 0 the prompt's last token) over the N
    image positions, averaged over the language model's layers and heads: [b, N], each row summing to the share
    of attention the image receives (the rest goes to the prompt's text and the caption so far; the caller
    renormalises over patches). The plain mean because each layer's attention adds to the same residual stream
    and nothing trained on this model says which layers carry the grounding; it mirrors CoCa's mean of
    cross-attention over decoder layers and heads (services/decoder/attribution.py measures that choice)."""

    def __init__(self, family: LlavaFamily, rows: torch.Tensor, mask: torch.Tensor | None, max_len: int) -> None:
        if max_len > family.max_seq_len:
            raise ValueError(f"seq_len {max_len} exceeds the {family.max_seq_len} positions the language model has"
                             f" after the prompt's {len(family.prompt_ids)} tokens")
        if mask is not None and mask.shape != rows.shape[:2]:
            raise ValueError(f"mask {tuple(mask.shape)} does not match rows {tuple(rows.shape[:2])}")
        self.family, self.rows, self.mask = family, rows, mask
        self.cache = DynamicCache()
        self.attend: torch.Tensor | None = None  # [b, P + generated] long, built at pos 0

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, pos: int, attention: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [b] -> next-token logits [b, V] float32 (raw)."""
        fam, P = self.family, len(self.family.prompt_ids)
        if pos == 0:
            embeds = fam._prompt_embeddings(self.rows)  # [B, P, D]
            self.attend = fam._attention_mask(self.mask, embeds.shape[0], 0)
            self.rows = self.mask = None  # in the cache now
            start = 0
        else:
            embeds = fam._embed(tokens.to(fam.device)[:, None])  # [b, 1, D]
            self.attend = torch.cat([self.attend, self.attend.new_ones(len(tokens), 1)], dim=1)
            start = P + pos - 1
        hidden, attentions = fam._language_model(embeds, self.attend, start, self.cache, attention is not None)
        if attention is not None:
            image = fam.image_positions.to(fam.device)
            # per layer [b, heads, S, keys] -> the last query's weights on the image keys -> [b, N]
            attention.copy_(torch.stack([a[:, :, -1, image] for a in attentions]).float().mean(dim=(0, 2)))
        return fam.model.lm_head(hidden[:, -1]).float()

    def keep(self, rows: torch.Tensor) -> None:
        """Continue with these batch rows, in this order (repeats allowed: beam search, also before pos 0)."""
        rows = rows.to(self.family.device)
        if self.attend is None:  # not prefilled yet
            self.rows = self.rows[rows]
            self.mask = None if self.mask is None else self.mask[rows]
            return
        self.cache.batch_select_indices(rows)
        self.attend = self.attend[rows]


def load(model: str | Path, device: str = "cpu", dtype: str = "fp32", prompt: str | None = None,
         rescale_layers: bool | None = None) -> LlavaFamily:
    """A LLaVA model from a hub id (the transformers cache; downloaded where the network allows) or a local
    `save_pretrained` directory holding the model and its processor. fp32 by default; bf16 works on a GPU.
    `prompt`: the captioning request (DEFAULT_PROMPT); `rescale_layers` (see the module's docstring): None takes
    the setting LV_RESCALE_LAYERS (off by default)."""
    name = str(model)
    if rescale_layers is None:
        rescale_layers = get_settings().rescale_layers
    if dtype not in DTYPES:
        raise FamilyError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    try:
        config = AutoConfig.from_pretrained(name)
        if config.model_type != "llava":
            raise FamilyError(f"{name} is a {config.model_type!r} model, not LLaVA (config.json model_type 'llava')")
        processor = AutoProcessor.from_pretrained(name)
        llava = LlavaForConditionalGeneration.from_pretrained(name, torch_dtype=DTYPES[dtype])
    except OSError as e:  # a hub id's missing files: the caller (load_family) says what to copy where
        if Path(name).is_dir():
            raise FamilyError(f"{name} is not a complete save_pretrained LLaVA directory (model, tokenizer and"
                              f" processor files): {e}") from e
        raise
    device = resolve_device(device)
    llava.to(device).eval().requires_grad_(False)
    family = LlavaFamily(name, llava, processor, device, DEFAULT_PROMPT if prompt is None else prompt, rescale_layers)
    log.info("model loaded", extra={"model": name, "family": "llava", "device": str(device),
                                    "layers": family.num_layers, "feature_layer": family.feature_layer,
                                    "image_tokens": len(family.image_positions),
                                    "prompt_tokens": len(family.prompt_ids)})
    return family


def chat_prompt(processor, prompt: str) -> str:
    """The text the model's generate gets: the chat template on one user message [image, prompt] with the
    generation prompt added; a processor without a template: "<image>\\n{prompt}"."""
    if getattr(processor, "chat_template", None):
        message = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}
        return processor.apply_chat_template([message], add_generation_prompt=True)
    return f"{getattr(processor, 'image_token', '<image>')}\n{prompt}"


@torch.inference_mode()
def reference_tokens(family: LlavaFamily, image: Image.Image, layer: int, max_new: int) -> list[int]:
    """The model's own code path at `layer`, which the family's greedy captions equal token for token (tests,
    bench/family_bench.py): generate(**processor(image, chat prompt) without token_type_ids, vision_feature_layer=
    layer + 1 (in every slot of a listed config), max_new_tokens, greedy) -> the generated ids, the end token and
    what follows removed (as results.jsonl's `tokens`). Not the rescaled reading (`rescale_layers`)."""
    inputs = family.processor(images=image, text=chat_prompt(family.processor, family.prompt), return_tensors="pt")
    inputs.pop("token_type_ids", None)
    inputs = inputs.to(family.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(family.dtype)
    wanted = [layer + 1] * len(family.feature_layers) if len(family.feature_layers) > 1 else layer + 1
    out = family.model.generate(**inputs, vision_feature_layer=wanted, max_new_tokens=max_new, do_sample=False)
    generated = out[0, inputs["input_ids"].shape[1] :].tolist()
    ends = [k for k, t in enumerate(generated) if t in family.end_ids]
    return generated[: ends[0]] if ends else generated


def _prompt_ids(processor, prompt: str, image_token_id: int) -> torch.Tensor:
    """[P] long: the processor's own tokenisation of the chat prompt, its image token expanded to the number of
    image tokens (the processor knows it from the image size; a gray image of any size gives it)."""
    gray = Image.new("RGB", (64, 64), (128, 128, 128))
    ids = processor(images=gray, text=chat_prompt(processor, prompt), return_tensors="pt")["input_ids"][0]
    if not (ids == image_token_id).any():
        raise FamilyError(f"the processor's prompt has no image token (id {image_token_id})")
    return ids


def _end_ids(model: LlavaForConditionalGeneration, processor) -> tuple[int, ...]:
    """The ids generate stops on: the generation config's eos (an id or a list), else the tokenizer's eos."""
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = processor.tokenizer.eos_token_id
    if eos is None:
        raise FamilyError("the model names no end token (generation_config.eos_token_id, tokenizer eos_token)")
    return tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)


def _min_seq_len(model: LlavaForConditionalGeneration) -> int:
    """generate's own minimum: min_new_tokens new tokens is min_seq_len min_new_tokens + 1 (the start slot
    counts); none (1) unless its generation_config sets it."""
    return 1 + (model.generation_config.min_new_tokens or 0)


def _block(feature_layer: int, num_layers: int) -> int:
    """transformers' hidden_states index (negative from the end) -> our 0-based block number."""
    index = feature_layer if feature_layer >= 0 else num_layers + 1 + feature_layer
    if not 1 <= index <= num_layers:
        raise FamilyError(f"vision_feature_layer {feature_layer} is not the output of one of the {num_layers} blocks")
    return index - 1


def _placement(image_processor, width: int, height: int) -> Placement:
    """Follow an image of width x height through a CLIP-style image processor (optional pad to a square, resize
    of the shortest edge or to a fixed size, optional center crop) -> where its pixels land in the input."""
    w, h = width, height
    sx = sy = 1.0
    tx = ty = 0.0
    if getattr(image_processor, "do_pad", False):  # LlavaImageProcessor: pad to a square, image centred
        side = max(w, h)
        tx, ty, w, h = (side - w) // 2, (side - h) // 2, side, side
    if image_processor.do_resize:
        size = dict(image_processor.size)
        if "shortest_edge" in size:
            short, long = sorted((w, h))
            new_short, new_long = size["shortest_edge"], int(size["shortest_edge"] * long / short)
            nw, nh = (new_short, new_long) if w <= h else (new_long, new_short)
        elif "height" in size and "width" in size:
            nw, nh = size["width"], size["height"]
        else:
            raise ValueError(f"regions cannot be placed: the image processor resizes to {size}")
        sx, sy, tx, ty = nw / w, nh / h, tx * nw / w, ty * nh / h
        w, h = nw, nh
    if getattr(image_processor, "do_center_crop", False):
        crop = dict(image_processor.crop_size)
        top, left = (h - crop["height"]) // 2, (w - crop["width"]) // 2
        tx, ty, w, h = tx - left, ty - top, crop["width"], crop["height"]
    return Placement((width, height), (w, h), (sx, sy), (tx, ty))


def _mean_norm(tokens: torch.Tensor) -> torch.Tensor:
    """[n, N, C] -> [n, 1, 1]: each image's mean token L2 norm."""
    return tokens.float().norm(dim=-1).mean(dim=-1)[:, None, None].to(tokens.dtype)


@contextlib.contextmanager
def _eager_attention(language_model) -> Iterator[None]:
    """For the forwards inside: eager attention, which returns its weights (the model's own choice otherwise)."""
    config = language_model.config
    saved = config._attn_implementation
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        config._attn_implementation = saved
