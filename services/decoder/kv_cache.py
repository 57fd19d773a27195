"""Preallocated key/value caches for incremental decoding (the gpt-fast pattern).

One `KVCache` per self-attention layer holds keys and values of every position decoded so far, in
one tensor so that a step writes both with one copy straight from the q/k/v projection:
    kv [B, 2, H, S, Dh]    B rows, keys then values, H heads, S = max positions, Dh head dim.
Rows can be dropped when their captions finish (`keep`), so finished rows stop costing compute.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, rows: int, heads: int, max_len: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.kv = torch.zeros(rows, 2, heads, max_len, head_dim, dtype=dtype, device=device)

    def update(self, pos: int, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write kv [B, 2, H, Dh] (this position's keys and values) at position `pos`; return the keys
        and values of positions 0..pos, [B, H, pos+1, Dh] each."""
        self.kv[:, :, :, pos] = kv
        seen = self.kv[:, :, :, : pos + 1]
        return seen[:, 0], seen[:, 1]

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (indices into the current batch), in that order."""
        self.kv = self.kv.index_select(0, rows)
