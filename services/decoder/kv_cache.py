"""Preallocated key/value caches for incremental decoding (the gpt-fast pattern).

One `KVCache` per self-attention layer holds keys/values of every position decoded so far:
    k, v [B, H, S, Dh]    B rows, H heads, S = max positions, Dh head dim.
Rows can be dropped when their captions finish (`keep`), so finished rows stop costing compute.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, rows: int, heads: int, max_len: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.k = torch.zeros(rows, heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def update(self, pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, H, 1, Dh] at position `pos`; return the keys/values of positions 0..pos."""
        self.k[:, :, pos] = k[:, :, 0]
        self.v[:, :, pos] = v[:, :, 0]
        return self.k[:, :, : pos + 1], self.v[:, :, : pos + 1]

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (indices into the current batch), in that order."""
        self.k = self.k.index_select(0, rows)
        self.v = self.v.index_select(0, rows)
