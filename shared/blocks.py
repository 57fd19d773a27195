"""open_clip's transformer blocks as explicit tensor code, every weight product through `Linear`.

Both stages run open_clip's ResidualAttentionBlocks through these views, on the model's own weights:
the encoder over whole token sequences (`Block.__call__`), the decoder one position at a time with
caches (services/decoder/model.py). `cached(model, make)` keeps one view per model.

`Linear`: y = x @ W^T + b, with the weight reordered once for oneDNN on x86 CPUs. PyTorch's
ordinary CPU product (MKL sgemm) is poor at few rows: on a 2-core AMD EPYC (AVX-512) it streamed
coca_ViT-B-32's decoder weights at 7-8 GB/s for 8 rows, and MKL's own packed format no better
(7 GB/s; 12-13 GB/s on a Xeon, where MKL takes its best path). The same weights reordered into
oneDNN's blocked layout (`torch.ops.mkldnn`, the kernels torch.compile's CPU backend uses) stream at
24-30 GB/s there, against ~35 GB/s for a plain sum, and stay faster up to many rows (EPYC, 2 threads,
96 weights of B-32's decoder shapes: 8 rows 14 vs 31 ms, 64 rows 52 vs 80 ms, 512 rows 379 vs 470 ms;
B-32's vision blocks at 8 images, 400 rows: 0.35 vs 0.41 s). A row's result does not depend on how
many other rows are multiplied with it (checked bit for bit from 1 to 1000 rows), which keeps a
caption the same alone or in any batch. The price is a reordered copy of the weights in memory.
Reordering is used for fp32 models on x86 CPUs (where oneDNN has its JIT AVX2/AVX-512 kernels and
where it was measured) with a PyTorch built with oneDNN; elsewhere (GPU, bf16, fp16, ARM laptops,
whose BLAS is fast at few rows) every product is the ordinary `F.linear`. The two paths differ in the
last bits, as any two GEMM kernels do.

Shapes: B rows, S positions, D width, H heads, Dh = D / H.
"""

from __future__ import annotations

import platform
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

import torch
import torch.nn.functional as F
from open_clip.transformer import LayerNorm, LayerScale, ResidualAttentionBlock
from torch import nn

Fn = Callable[[torch.Tensor], torch.Tensor]

BATCH_HINT = 16  # rows oneDNN tunes the reordered layout for; fixed, so results are reproducible


def can_reorder(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and platform.machine().lower() in ("x86_64", "amd64")
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


class Linear:
    """x [..., K] -> [..., N] with weight [N, K] and optional bias [N]."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.weight, self.bias = weight, bias
        self.reordered = (torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), BATCH_HINT)
                          if can_reorder(weight) else None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.reordered is None:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.reordered, self.bias, "none", [], "")


def heads(x: torch.Tensor, n: int) -> torch.Tensor:
    """[B, S, D] -> [B, H, S, Dh]"""
    B, S, D = x.shape
    return x.view(B, S, n, D // n).transpose(1, 2)


def merge(x: torch.Tensor) -> torch.Tensor:
    """[B, H, S, Dh] -> [B, S, D]"""
    B, H, S, Dh = x.shape
    return x.transpose(1, 2).reshape(B, S, H * Dh)


def _direct(module: nn.Module) -> Fn:
    """A norm or activation as a direct functional call where it is a plain one: a decoding step makes
    ~1000 calls, and a Module call costs microseconds of Python (open_clip's LayerNorm also casts to
    the input's dtype, a no-op here, where inputs have the weights' dtype). Others stay modules."""
    if type(module) in (LayerNorm, nn.LayerNorm):
        return partial(F.layer_norm, normalized_shape=module.normalized_shape, weight=module.weight,
                       bias=module.bias, eps=module.eps)
    if type(module) is nn.GELU:
        return partial(F.gelu, approximate=module.approximate)
    return module


def _gamma(ls: nn.Module) -> torch.Tensor | None:
    """A layer scale as its factor (None for none)."""
    if isinstance(ls, nn.Identity):
        return None
    if isinstance(ls, LayerScale):
        return ls.gamma
    raise ValueError(f"unsupported layer scale {type(ls).__name__}")


@dataclass
class Block:
    """One of open_clip's ResidualAttentionBlocks: its norms, layer scales (None: none) and activation,
    and its products as `Linear`s. `attn_in` is the whole q/k/v projection [3D, D], or only its q
    part [D, D] for a cross-attention block whose keys/values the caller makes (`q_only`)."""

    heads: int
    ln_1: Fn
    ln_2: Fn
    ls_1: torch.Tensor | None
    ls_2: torch.Tensor | None
    act: Fn
    attn_in: Linear
    attn_out: Linear
    fc: Linear
    proj: Linear

    @classmethod
    def of(cls, block: nn.Module, q_only: bool = False) -> Block:
        if type(block) is not ResidualAttentionBlock:
            raise ValueError(f"only open_clip's default attention blocks are supported, not {type(block).__name__}")
        mha, mlp = block.attn, block.mlp
        w, b = mha.in_proj_weight, mha.in_proj_bias
        if q_only:
            w, b = w.chunk(3)[0], b.chunk(3)[0]
        return cls(mha.num_heads, _direct(block.ln_1), _direct(block.ln_2), _gamma(block.ls_1), _gamma(block.ls_2),
                   _direct(mlp.gelu), Linear(w, b), Linear(mha.out_proj.weight, mha.out_proj.bias),
                   Linear(mlp.c_fc.weight, mlp.c_fc.bias), Linear(mlp.c_proj.weight, mlp.c_proj.bias))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The whole block over x [B, S, D], every position attending to every position (no mask,
        as in a vision tower) -> [B, S, D]."""
        q, k, v = self.attn_in(self.ln_1(x)).chunk(3, dim=-1)
        attended = F.scaled_dot_product_attention(heads(q, self.heads), heads(k, self.heads), heads(v, self.heads))
        return self.attention_out(x, attended)

    def attention_out(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """Residual add of the attention output [B, H, S, Dh], then the MLP: -> x [B, S, D]."""
        x = _add_scaled(x, self.attn_out(merge(attended)), self.ls_1)
        return _add_scaled(x, self.proj(self.act(self.fc(self.ln_2(x)))), self.ls_2)


def _add_scaled(x: torch.Tensor, y: torch.Tensor, gamma: torch.Tensor | None) -> torch.Tensor:
    return x + y if gamma is None else x + y * gamma


T = TypeVar("T")
_made: weakref.WeakKeyDictionary[nn.Module, dict[Callable, tuple[tuple, object]]] = weakref.WeakKeyDictionary()


def cached(model: nn.Module, make: Callable[[nn.Module], T]) -> T:
    """make(model), kept while the model lives and made again if one of its weights changed since
    (in place, moved to another device or dtype, or replaced): views hold the model's weights and, on
    CPU, reordered copies of them, which must not go stale."""
    stamp = tuple((p.data_ptr(), p._version) for p in model.parameters())
    per_model = _made.setdefault(model, {})
    made = per_model.get(make)
    if made is None or made[0] != stamp:
        made = per_model[make] = (stamp, make(model))
    return made[1]  # type: ignore[return-value]
