"""Encoder-stage cost: what capturing and pooling every layer adds to a plain image encoding.

    encode_image_images_per_s   plain `model.encode_image` (last layer, pooled, projected)
    capture_images_per_s        one forward keeping every block's residual stream (no pooling)
    capture_ratio               capture / encode_image throughput        (target >= 0.9)
    stage_images_per_s          the whole encoder stage: capture + pooler on every layer
    stage_flop_efficiency       (stage FLOP/s) / (encode_image FLOP/s)   (target >= 0.9)
FLOPs are counted with torch.utils.flop_counter on the same inputs.

    python bench/encode_bench.py --model coca_ViT-B-32 --batch 16 --json
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop_count

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import base_parser, device_name, report, timed  # noqa: E402
from latent_verbalizer.services.encoder.stage import capture_blocks, check_layers, encode  # noqa: E402
from latent_verbalizer.services.families import load_family  # noqa: E402


# torch's counter knows the CUDA attention kernels but not the CPU one that SDPA dispatches to.
@register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# Nor the oneDNN product the stage's blocks use on CPU (shared/blocks.py): x [..., K] @ W^T, W [N, K].
@register_flop_formula(torch.ops.mkldnn._linear_pointwise)
def _onednn_linear_flop(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * x_shape.numel() * w_shape[0]


# Nor nn.MultiheadAttention's inference fast path, which `encode_image` takes in open_clip's blocks:
# q/k/v projection, attention (scores and mix), output projection over x [B, S, E].
@register_flop_formula(torch.ops.aten._native_multi_head_attention)
def _native_mha_flop(q_shape, *args, out_shape=None, **kwargs) -> int:
    B, S, E = q_shape
    return 2 * B * S * E * 3 * E + 2 * 2 * B * S * S * E + 2 * B * S * E * E


def flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--model", default="coca_ViT-B-32")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    lm = load_family(args.model, None, args.device, args.dtype)
    visual = lm.model.visual
    layers = check_layers(visual, None)
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(args.batch, 3, *visual.image_size, generator=g).to(lm.device, lm.dtype)

    def encode_image():
        with torch.inference_mode():
            return lm.model.encode_image(pixels)

    runs = {
        "encode_image": encode_image,
        "capture": lambda: capture_blocks(visual, pixels, layers),
        "stage": lambda: encode(visual, pixels, layers),
    }
    seconds = {name: timed(fn, lm.device, repeats=args.repeats) for name, fn in runs.items()}
    work = {name: flops(fn) for name, fn in runs.items()}
    per_s = {name: args.batch / s for name, s in seconds.items()}
    report({
        "model": args.model, "batch": args.batch, "layers": len(layers), "dtype": args.dtype,
        "encode_image_images_per_s": round(per_s["encode_image"], 2),
        "capture_images_per_s": round(per_s["capture"], 2),
        "capture_ratio": round(per_s["capture"] / per_s["encode_image"], 3),
        "stage_images_per_s": round(per_s["stage"], 2),
        "stage_extra_flops": round(work["stage"] / work["encode_image"] - 1, 3),
        "stage_flop_efficiency": round((work["stage"] / seconds["stage"])
                                       / (work["encode_image"] / seconds["encode_image"]), 3),
        "device": device_name(lm.device),
    }, args.json)


if __name__ == "__main__":
    main()
