"""The decoder's matrix products, y = x @ W^T + b, with weights prepacked for oneDNN on CPU.

A decoding step multiplies a handful of rows (the captions of a batch) by every weight matrix of the
text side: coca_ViT-B-32 reads ~0.45 GB of fp32 weights per step for little arithmetic, so a step is
as fast as the weights stream from memory. PyTorch's ordinary CPU product (MKL sgemm) is poor at so
few rows: on a 2-core AMD EPYC (AVX-512) it streamed B-32's decoder weights at 7-8 GB/s for 8 rows,
and MKL's own packed format no better (7 GB/s; 12-13 GB/s on a Xeon, where MKL takes its best path).
The same weights reordered once into oneDNN's blocked layout (`torch.ops.mkldnn`, the kernels
torch.compile's CPU backend uses) stream at 24-30 GB/s there, against ~35 GB/s for a plain sum, and
stay faster than sgemm up to 512 rows (EPYC, 2 threads, 96 weights of B-32's shapes: 8 rows 14 vs
31 ms, 64 rows 52 vs 80 ms, 512 rows 379 vs 470 ms). A row's result does not depend on how many other
rows are multiplied with it (checked bit for bit from 1 to 1000 rows), which keeps a caption the same
alone or in any batch. The price is a reordered copy of the text-side weights (~0.5 GB for
coca_ViT-B-32), made once per model by `TextDecoder.of`.

Reordering is used for fp32 models on x86 CPUs (where oneDNN has its JIT AVX2/AVX-512 kernels and
where it was measured) with a PyTorch built with oneDNN (mkldnn); elsewhere (GPU, bf16, fp16, ARM
laptops, whose BLAS is fast at few rows) every product is the ordinary `F.linear`. The two paths
differ in the last bits, as any two GEMM kernels do.
"""

from __future__ import annotations

import platform

import torch
import torch.nn.functional as F

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
