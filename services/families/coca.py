"""CoCa (open_clip) behind the family interface: an adapter over the project's fast CoCa engine.

    load        shared.models.load_model (open_clip architecture, pretrained tag / project tag / file)
    encode      services.encoder.stage: the blocks' residual streams through the attentional pooler and
                ln_post, every selected layer in one batched call; regions and word maps through the
                pooler's keys (services.encoder.regions)
    step        services.decoder.model.TextDecoder: text tower + multimodal decoder, KV-cached
    score       TextDecoder.score: one full-sequence forward
Extras: all three (contrastive image/text embeddings, regions, word -> patch attributions).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image

from latent_verbalizer.services.decoder.kv_cache import KVCache
from latent_verbalizer.services.decoder.model import TextDecoder
from latent_verbalizer.services.decoder.text_embedding import TextStates, embed, recompute
from latent_verbalizer.services.encoder import stage as engine
from latent_verbalizer.services.encoder.regions import transform_geometry
from latent_verbalizer.services.families.base import Encoded, Family, Geometry, Stepper
from latent_verbalizer.shared.models import LoadedModel


class CocaStepper(Stepper):
    """B rows' pooled image tokens through TextDecoder.step, with its KV caches and normalised image keys."""

    def __init__(self, decoder: TextDecoder, rows: torch.Tensor, max_len: int, pad_id: int,
                 text_embeddings: bool) -> None:
        B, device = rows.shape[0], rows.device
        self.decoder, self.pad_id = decoder, pad_id
        self.image_keys = decoder.image_keys(rows)  # [B, N, D], read by every decoder layer
        self.caches: list[KVCache] = decoder.new_caches(B, max_len, device)
        # text-tower states of finished rows, for their contrastive text embedding
        self.finished = TextStates(decoder, B, max_len, device) if text_embeddings else None

    def step(self, tokens: torch.Tensor, pos: int, attention: torch.Tensor | None = None) -> torch.Tensor:
        return self.decoder.step(tokens, pos, self.caches, self.image_keys, attention)

    def keep(self, rows: torch.Tensor) -> None:
        for cache in self.caches:
            cache.keep(rows)
        self.image_keys = self.image_keys.index_select(0, rows)

    def retire(self, leaving: torch.Tensor, rows: torch.Tensor) -> None:
        if self.finished is not None:
            self.finished.keep(rows, self.caches[: len(self.decoder.text_blocks)], leaving)

    def text_embeddings(self, seqs: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        # Each row's end token sits at position `steps` (start token at 0): not yet fed to the text tower.
        return embed(self.decoder, self.finished, seqs, steps, steps.clone(), self.pad_id)


class CocaFamily(Family):
    family = "coca"

    def __init__(self, lm: LoadedModel) -> None:
        self.lm, self.model, self.tokenizer = lm, lm.model, lm.tokenizer
        self.name, self.pretrained, self.device, self.dtype = lm.name, lm.pretrained, lm.device, lm.dtype
        self.num_layers = lm.num_layers
        self.feature_layer = lm.num_layers - 1
        self.prompt = None
        self.start_id, self.end_ids, self.pad_id = lm.sot_id, (lm.eot_id,), lm.pad_id
        self.stop_ids = (lm.eot_id, lm.pad_id)  # open_clip's generate also ends a row on the pad id 0
        self.force_end_at_limit, self.default_min_seq_len = True, 5
        self.max_seq_len = lm.max_seq_len
        self.missing = {}

    @property
    def visual(self):
        return self.model.visual

    def warm(self, side: str) -> None:
        """The engine's view of the weights (on CPU: reordered copies, ~1 s for coca_ViT-B-32)."""
        if side == "encoder":
            engine.vision_blocks(self.visual)
        else:
            TextDecoder.of(self.model)

    # --- encoder side ---
    @property
    def preprocess(self) -> Callable[[Image.Image], torch.Tensor]:
        """open_clip's transform itself (a callable, as the interface's method): `geometry` follows its steps."""
        return self.lm.preprocess

    @property
    def geometry(self) -> Geometry:
        return transform_geometry(self.lm.preprocess, self.visual.image_size, self.visual.patch_size)

    def encode(self, pixels: torch.Tensor, layers: list[int], *, contrastive: bool = False,
               key_mask: torch.Tensor | None = None, attributions: bool = False) -> Encoded:
        hidden = engine.capture_blocks(self.visual, pixels, engine.captured_layers(self.visual, layers, contrastive))
        return engine.pool_encoded(self.visual, hidden, layers, contrastive, key_mask, attributions)

    def hidden_states(self, pixels: torch.Tensor, layers: list[int]) -> torch.Tensor:
        return engine.capture_blocks(self.visual, pixels, layers)

    # --- decoder side ---
    def stepper(self, rows: torch.Tensor, mask: torch.Tensor | None, max_len: int, attention: bool = False,
                text_embeddings: bool = False) -> CocaStepper:
        if mask is not None:
            raise ValueError("CoCa reads a region through its pooler's keys (encode's key_mask), not a row mask")
        return CocaStepper(TextDecoder.of(self.model), rows, max_len, self.pad_id, text_embeddings)

    def score(self, rows: torch.Tensor, mask: torch.Tensor | None, tokens: list[list[int]],
              temperature: float = 1.0) -> list[torch.Tensor]:
        """TextDecoder.score over [start, tokens..., end] per caption, padded with the pad id; rows [1, N, D]: one
        image for every caption, its cross-attention keys projected once. A caption that ended with the pad
        id 0 (open_clip's other end) has no end token after it: [len(tokens)]."""
        if mask is not None:
            raise ValueError("CoCa reads a region through its pooler's keys (encode's key_mask), not a row mask")
        seqs = [[self.start_id, *t] + ([] if t and t[-1] == self.pad_id else [self.end_id]) for t in tokens]
        ids = torch.full((len(seqs), max(map(len, seqs), default=1)), self.pad_id, dtype=torch.long)
        for r, seq in enumerate(seqs):
            ids[r, : len(seq)] = torch.tensor(seq)
        lengths = torch.tensor([len(seq) - 1 for seq in seqs])
        logp = TextDecoder.of(self.model).score(rows.to(self.device, self.dtype), ids.to(self.device), lengths,
                                                temperature=temperature)
        return [logp[r, :n] for r, n in enumerate(lengths.tolist())]  # [R, S-1] -> per caption [len (+ 1)]

    def text_embeddings(self, tokens: list[list[int]], max_len: int) -> torch.Tensor:
        """Through the same cached text-tower steps as decoding's (beam search's captions)."""
        ids = torch.full((len(tokens), max_len), self.pad_id, dtype=torch.long)
        end = torch.zeros(len(tokens), dtype=torch.long)  # position of each caption's end token
        for i, t in enumerate(tokens):
            ended = bool(t) and t[-1] == self.pad_id  # a 0-ended caption keeps its 0 as its end
            seq = [self.start_id, *t] + ([] if ended else [self.end_id])
            ids[i, : len(seq)], end[i] = torch.tensor(seq), len(seq) - 1
        return recompute(TextDecoder.of(self.model), ids.to(self.device), end.to(self.device), self.pad_id)

    def decode_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids).strip()

    def token_texts(self, ids: list[int]) -> list[str]:
        return [self.tokenizer.decode([t]) for t in ids]
