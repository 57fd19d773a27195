"""The model-family interface: what the pipeline, the workers, the CLI and the gateway may know of a model.

A `Family` is one loaded model of some family (CoCa, LLaVA, BLIP, ...). Everything outside
services/families/ talks to it through the names below and never through a family's own classes:

    images --preprocess--> pixels [n, 3, H, W] --encode(layers)--> Encoded.latents [L, n, N, D]
           --stepper(rows [B, N, D])--> the ONE decoding loop (services.decoder.stage / beam) --> captions
           --score(rows, tokens)--> teacher-forced log-probabilities (likelihood grounding)

Layer i is the residual stream after vision block i (0-based), transformers' `hidden_states[i + 1]`;
`Encoded.latents[j]` is layer `layers[j]` turned into what the model's text side reads, as the model
itself turns its own feature layer (`feature_layer`) into it.

The decoding loop owns the search (greedy / sample / beam, min length, repetition penalty, top-k/p,
temperature, seeded per-row sampling, per-step entropy, finished rows leaving the batch); a family
owns one step of its text side (`Stepper`). Position 0 is the start slot: the family feeds its own
prompt there (CoCa: the start token; LLaVA: the chat-templated prompt with the image features at the
image-token positions; BLIP: [DEC] and an optional text prefix) and the loop records `start_id` in
that slot.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch
from PIL import Image

if TYPE_CHECKING:
    from latent_verbalizer.services.encoder.regions import Placement

EXTRAS = ("contrastive", "regions", "attributions")
SCORE_LOGITS = 2**24  # teacher-forced scoring: at most this many float32 logits at a time (64 MB)
GRAY = (128, 128, 128)  # the null input: a flat mid-gray image (grounding's prior, likelihood grounding's null)


class FamilyError(ValueError):
    """A model that cannot be loaded or used as asked, with a reason the user can act on."""


@dataclass
class Encoded:
    """What the decoder side reads of a batch of n images (`Family.encode`)."""

    latents: torch.Tensor  # [L, n, N, D] per selected layer, what the text side reads
    image_embeddings: torch.Tensor | None = None  # [n, E] contrastive image embeddings (extra: contrastive)
    # regions (extra): a family reads a region either through latents of its own (CoCa: its pooler over the
    # region's tokens) or through the image's latents with a mask over their N positions (LLaVA, BLIP)
    region_latents: torch.Tensor | None = None  # [L, n, R, N, D]
    region_mask: torch.Tensor | None = None  # [n, R, N] bool, True: region r of image i reads that position
    pool_attention: torch.Tensor | None = None  # [L, n, 1+R, N, T] how each latent reads the tokens (CoCa's maps)
    null_latents: torch.Tensor | None = None  # [L, 1, N, D] the null (flat gray) image's (grounding)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The parts that are there, by name."""
        return {f.name: t for f in fields(self) if (t := getattr(self, f.name)) is not None}

    @classmethod
    def cat(cls, parts: list[Encoded]) -> Encoded:
        """Batches of images -> one, along each part's image dimension (the null image's rows: the first's)."""

        def joined(name: str) -> torch.Tensor:
            if name == "null_latents":  # the same for every batch
                return parts[0].null_latents
            image_dim = 0 if name in ("image_embeddings", "region_mask") else 1
            return torch.cat([getattr(p, name) for p in parts], dim=image_dim)

        return cls(**{name: joined(name) for name in parts[0].tensors()})


@dataclass(frozen=True)
class Geometry:
    """Where an image's pixels land among the image positions the text side reads (regions, word maps).

    `place(w, h)` follows the family's own preprocessing (resize, crop) from an image of w x h px to the
    input of `image_size` (H, W) px, cut into `patch_size` (ph, pw) patches, a grid of gh x gw read
    row-major; a leading class token comes first when `class_token`."""

    image_size: tuple[int, int]  # (H, W)
    patch_size: tuple[int, int]  # (ph, pw)
    class_token: bool
    place: Callable[[int, int], Placement]

    @property
    def grid(self) -> tuple[int, int]:
        return self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1]


class Stepper(ABC):
    """One batch of rows going through the family's text side, one token per row and step."""

    @abstractmethod
    def step(self, tokens: torch.Tensor, pos: int, attention: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [b] long: each live row's token at position pos (pos 0: the start slot, where the family
        feeds its own prompt). -> next-token logits [b, V] float32, raw. With `attention` [b, N] given,
        fill it with this step's attention over the N image positions (the family's own averaging)."""

    @abstractmethod
    def keep(self, rows: torch.Tensor) -> None:
        """rows [b'] long: continue with these batch rows, in this order (finished rows leave; beam search
        reorders and repeats rows). Caches and any per-row state follow."""

    def retire(self, leaving: torch.Tensor, rows: torch.Tensor) -> None:  # noqa: B027 (optional hook)
        """leaving [k]: batch rows that finished at this step, before `keep` drops them; rows [k]: their
        index in the batch as it started. A stepper that keeps something of finished rows (CoCa: their
        text-tower states, for the contrastive text embedding) copies it here; others do nothing."""

    def text_embeddings(self, seqs: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """seqs [B, S] (start slot, generated tokens, pad after), steps [B] generated tokens per row, for
        the batch as it started -> contrastive text embeddings [B, E] float32 (extra: contrastive)."""
        raise FamilyError("this model has no contrastive text tower")


class Family(ABC):
    """One loaded model. Attributes a caller may read and display; methods the stages call."""

    family: str  # "coca" | "llava" | "blip"
    model: torch.nn.Module  # the loaded module (weights fingerprints, per-model caches)
    name: str  # what the user named (architecture, project name, hub id or directory)
    pretrained: str | None  # CoCa's weights tag or file; None for the others
    device: torch.device
    dtype: torch.dtype
    num_layers: int  # vision blocks
    feature_layer: int  # the layer the model itself reads (0-based)
    prompt: str | None  # LLaVA's captioning prompt / BLIP's text prefix; None for CoCa
    start_id: int  # recorded in the start slot
    end_ids: tuple[int, ...]  # the model's end tokens: blocked below min length, cut from `tokens`
    stop_ids: tuple[int, ...]  # ids that finish a row (CoCa: end and its pad id 0; HF: the end ids)
    pad_id: int  # fills a row's slots after it finished
    force_end_at_limit: bool  # the last slot is the end token (CoCa, as open_clip's generate); HF: just stop
    default_min_seq_len: int  # CoCa 5 as open_clip; HF families 1 (their generate blocks nothing)
    max_seq_len: int  # longest caption, start slot included, the text side's positions allow
    missing: dict[str, str]  # extras (EXTRAS) it lacks -> why

    @property
    def end_id(self) -> int:
        """The end token forced in the last slot (`force_end_at_limit`)."""
        return self.end_ids[0]

    def has(self, extra: str) -> bool:
        return extra not in self.missing

    def require(self, extra: str) -> None:
        """FamilyError naming the family and why, when it lacks `extra` (one of EXTRAS)."""
        if extra in self.missing:
            raise FamilyError(f"{self.family} model {self.name} has no {extra}: {self.missing[extra]}")

    @property
    def extras(self) -> dict[str, str | None]:
        """{extra: None when available, else why not}: what model info shows."""
        return {e: self.missing.get(e) for e in EXTRAS}

    def warm(self, side: str) -> None:  # noqa: B027 (optional hook)
        """Make now what the first call of `side` ("encoder" or "decoder") would make (a worker calls it
        before its first task); nothing by default."""

    def describe(self) -> dict:
        """What a run's summary records of the model (JSON-ready)."""
        info = {"family": self.family, "model": self.name, "pretrained": self.pretrained, "prompt": self.prompt,
                "layers": self.num_layers, "feature_layer": self.feature_layer, "extras": self.extras}
        if not self.has("contrastive"):
            info["grounding_note"] = ("image_score and retrieval_rank are null: the model has no contrastive"
                                      " image-text head; last_layer_similarity compares MiniLM sentence embeddings"
                                      " of the captions' texts")
        return info

    # --- encoder side ---
    @abstractmethod
    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """The model's own transform: PIL image -> [3, H, W] float."""

    @property
    @abstractmethod
    def geometry(self) -> Geometry:
        """Where image pixels land among the image positions (regions, word maps)."""

    def null_pixels(self) -> torch.Tensor:
        """The null input: a flat mid-gray image at the model's input size, preprocessed -> [1, 3, H, W]."""
        h, w = self.geometry.image_size
        return self.preprocess(Image.new("RGB", (w, h), GRAY))[None].to(self.device, self.dtype)

    @abstractmethod
    def encode(self, pixels: torch.Tensor, layers: list[int], *, contrastive: bool = False,
               key_mask: torch.Tensor | None = None, attributions: bool = False) -> Encoded:
        """pixels [n, 3, H, W] -> Encoded: latents of the selected layers; with `contrastive` the image
        embeddings; with a mask [n, R, T] over the geometry's positions (services.encoder.regions) each
        region's `region_latents` or `region_mask`; with `attributions` what word maps need beyond the
        decoder's attention (CoCa: its pooler's weights, `pool_attention`)."""

    def hidden_states(self, pixels: torch.Tensor, layers: list[int]) -> torch.Tensor:
        """pixels [n, 3, H, W] -> the raw residual stream after each selected block [L, n, T, C] (--save-features)."""
        raise FamilyError(f"{self.family} models cannot save their raw features")

    # --- decoder side ---
    @abstractmethod
    def stepper(self, rows: torch.Tensor, mask: torch.Tensor | None, max_len: int, attention: bool = False,
                text_embeddings: bool = False) -> Stepper:
        """rows [B, N, D] (as in Encoded.latents), mask [B, N] bool (True: the row reads that image position;
        None: all), max_len = seq_len (start slot included). `attention`: steps will be asked for their
        attention over the image positions; `text_embeddings`: the stepper's `text_embeddings` will be
        called at the end (extra: contrastive)."""

    @abstractmethod
    def score(self, rows: torch.Tensor, mask: torch.Tensor | None, tokens: list[list[int]],
              temperature: float = 1.0) -> list[torch.Tensor]:
        """Teacher-forced log-probabilities (natural log, float32, log_softmax of the logits / temperature): for each
        caption r, of tokens[r] then of the end token, given the prefix and row r's image input -> R tensors
        [len(tokens[r]) + 1] (CoCa: [len] for a caption that ended with its pad id 0, which has no end token
        after it). rows [R, N, D], or [1, N, D]: every caption reads that one row (the null image). One
        forward over the whole sequences per call (services.decoder.stage.score batches a run's captions)."""

    def text_embeddings(self, tokens: list[list[int]], max_len: int) -> torch.Tensor:
        """Contrastive text embeddings [B, E] of finished captions (`tokens` as in results) (extra: contrastive)."""
        self.require("contrastive")
        raise NotImplementedError

    @abstractmethod
    def decode_text(self, ids: list[int]) -> str:
        """Generated ids -> the caption's text."""

    @abstractmethod
    def token_texts(self, ids: list[int]) -> list[str]:
        """Each generated id's own text, in order (word grouping: attributions, PMI words)."""


def piece_texts(decode: Callable[[list[int]], str], decode_one: Callable[[list[int]], str],
                ids: list[int]) -> list[str]:
    """Each generated id's text as it appears in the decoded caption, for a subword tokenizer whose pieces
    only read right in context (a word's first piece carries its space, a continuation none): the growth of
    decode(ids[:k + 1]) over decode(ids[:k]); decode_one([id]) where a piece rewrites what came before."""
    texts, before = [], ""
    for k in range(len(ids)):
        upto = decode(ids[: k + 1])
        texts.append(upto[len(before):] if upto.startswith(before) else decode_one(ids[k : k + 1]))
        before = upto
    return texts


def target_log_probs(head: Callable[[torch.Tensor], torch.Tensor], states: torch.Tensor, targets: torch.Tensor,
                     vocab_size: int, temperature: float = 1.0) -> torch.Tensor:
    """states [R, S, D], targets [R, S] -> log_softmax(head(states) / temperature) at the targets [R, S] float32:
    teacher-forced scoring's read-out (Family.score). The vocabulary projection `head` goes a few rows at a time,
    at most SCORE_LOGITS logits at once (R x S x V floats can be GBs)."""
    R, S = targets.shape
    chunk = max(1, SCORE_LOGITS // max(1, S * vocab_size))
    out = [targets.float()]  # R = 0: no rows to read
    if R:
        out = []
        for i in range(0, R, chunk):
            logits = head(states[i : i + chunk]).float() / temperature  # [c, S, V]
            out.append(logits.gather(-1, targets[i : i + chunk, :, None])[..., 0] - logits.logsumexp(-1))
    return torch.cat(out)
