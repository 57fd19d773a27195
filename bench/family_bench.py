"""A model family's speed and equivalence: every image at every vision layer captioned in our one KV-cached batch
(rows = images x layers, finished rows leave) vs a loop of the model's own generate per image and layer.

Both sides get the same model (--model: a local save_pretrained directory or a hub id; default: a small random
model of --family built here, LLaVA unless --family blip), the same images (--images DIR, else seeded random
pictures), greedy decoding with at most --seq-len - 1 new tokens, and both include the image encoding. Ours goes
through the family interface only (load_family, encode, the decoding loop); the reference is the family's own
generate path (REFERENCE).
Ours is timed (median of --repeats after a warm-up), the generate loop once after a warm-up call.
Prints ours_captions_per_s, generate_captions_per_s, speedup, tokens_identical (every row's tokens equal its
reference's, end token and what follows removed), rows, peak_rss_mb (the process, both sides), device.

    python bench/family_bench.py --json
    python bench/family_bench.py --family blip --json
    python bench/family_bench.py --model DIR --images DIR --seq-len 9 --json
"""

from __future__ import annotations

import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import base_parser, device_name, report, timed  # noqa: E402
from latent_verbalizer.services.decoder.stage import decode_layers  # noqa: E402
from latent_verbalizer.services.families import blip, llava, load_family  # noqa: E402
from latent_verbalizer.shared.schemas import DecodeParams  # noqa: E402

# family -> its model's own generate path: (family, image, layer, max_new_tokens) -> token ids without the end
REFERENCE = {"llava": llava.reference_tokens, "blip": blip.reference_tokens}


def small_llava(path: Path) -> str:
    """The default model: a small random LLaVA (CLIP vision 6 x 128 wide, 8 x 8 patches; Llama 4 x 128)."""
    from tests.tiny_families import tiny_llava

    return str(tiny_llava(path, layers=6, width=128, image_size=64, patch=8, text_layers=4))


def small_blip(path: Path) -> str:
    """--family blip's default: a small random BLIP (vision 6 x 128 wide, 8 x 8 patches; text decoder 4 x 128)."""
    from tests.tiny_families import tiny_blip

    return str(tiny_blip(path, layers=6, width=128, image_size=64, patch=8, text_layers=4))


SMALL = {"llava": small_llava, "blip": small_blip}


def pictures(folder: str | None, n: int) -> list[Image.Image]:
    if folder:
        files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})[:n]
        return [Image.open(p).convert("RGB") for p in files]
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (48 + 8 * i, 64, 3), dtype=np.uint8)) for i in range(n)]


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--model", default=None, help="save_pretrained dir or hub id (default: a small --family model)")
    p.add_argument("--family", default=None, help="force the family (default: from the model's config)")
    p.add_argument("--prompt", default=None, help="the family's prompt / text prefix (default: its own)")
    p.add_argument("--images", default=None, help="a folder of images (default: seeded random pictures)")
    p.add_argument("--n", type=int, default=8, help="images")
    p.add_argument("--seq-len", type=int, default=9, help="at most seq_len - 1 generated tokens")
    p.add_argument("--batch-rows", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--repeats", type=int, default=3, help="timed runs of ours (the generate loop runs once)")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or SMALL[args.family or "llava"](Path(tmp) / "small")
        family = load_family(model, device=args.device, dtype=args.dtype, family=args.family, prompt=args.prompt)
        images = pictures(args.images, args.n)
        pixels = torch.stack([family.preprocess(im) for im in images])
        layers = list(range(family.num_layers))
        ids = [str(i) for i in range(len(images))]
        params = DecodeParams(seq_len=args.seq_len, min_seq_len=family.default_min_seq_len)
        reference = REFERENCE[family.family]

        def ours():
            latents = family.encode(pixels.to(family.device, family.dtype), layers).latents
            return decode_layers(family, latents, layers, ids, params, args.batch_rows)

        def theirs():
            return [reference(family, im, layer, args.seq_len - 1) for im in images for layer in layers]

        t_ours = timed(ours, family.device, repeats=args.repeats)
        ours_tokens = [d.tokens for d in ours()]
        reference(family, images[0], layers[0], args.seq_len - 1)  # warm-up
        t0 = time.perf_counter()
        their_tokens = theirs()
        t_theirs = time.perf_counter() - t0

    rows = len(ours_tokens)
    same = sum(a == b for a, b in zip(ours_tokens, their_tokens))
    report({
        "family": family.family,
        "model": args.model or f"small random {family.family} (bench/family_bench.py)",
        "images": len(images),
        "layers": len(layers),
        "rows": rows,
        "seq_len": args.seq_len,
        "ours_captions_per_s": round(rows / t_ours, 2),
        "generate_captions_per_s": round(rows / t_theirs, 2),
        "speedup": round(t_theirs / t_ours, 2),
        "tokens_identical": same == rows,
        "rows_identical": same,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "device": device_name(family.device),
        "dtype": args.dtype,
        "torch_threads": torch.get_num_threads(),
    }, args.json)


if __name__ == "__main__":
    main()
