"""What grounding adds to `verbalize`'s wall time (issue 14 budget: <= 0.15 for coca_ViT-B-32, random
weights, 8 images, every layer, 2 CPU threads).

Each repeat runs the in-process pipeline on the same images without grounding, with grounding "warm" and
with grounding "cold" (the order rotating), the ranks taken as the CLI does. Before every grounded run
the process forgets the gray image's captions and the weights fingerprint, as a fresh process starts;
the captions' disk cache (services.decoder.null_cache, in a temporary directory here) is
  warm  kept: the run reads them from disk, as every run after a model/layer set's first does
  cold  cleared: the run decodes the gray image's L rows with its first batch, as the very first does.
Prints the median times, overhead = median(warm) / median(without) - 1 (the budget's figure),
overhead_cold = median(cold) / median(without) - 1, every run's seconds and the weights fingerprint's.
`measure()` is what bench/grounding_eval.py calls.

    python bench/grounding_overhead.py --model coca_ViT-B-32 --images 8 --threads 2 --json
"""

from __future__ import annotations

import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import base_parser, device_name, report  # noqa: E402
from latent_verbalizer.services.decoder import null_cache  # noqa: E402
from latent_verbalizer.services.decoder.grounding import RunEmbeddings, forget_null_captions  # noqa: E402
from latent_verbalizer.services.families import Family, load_family  # noqa: E402
from latent_verbalizer.services.pipeline import verbalize  # noqa: E402
from latent_verbalizer.shared.images import ImageItem  # noqa: E402


def random_items(n: int, seed: int = 0) -> list[ImageItem]:
    """n random-noise 256x256 PNGs (random weights see noise as well as photos)."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(buf, "PNG")
        items.append(ImageItem(id=f"img{i}", source=f"img{i}.png", data=buf.getvalue()))
    return items


def measure(lm: Family, items: list[ImageItem], repeats: int = 3, gallery: int = 1000) -> dict:
    """Median wall seconds of verbalize on `items` (every layer, default decoding) without grounding and
    with it, warm and cold (module docstring), their overhead ratios and every run's seconds."""

    def run(kind: str) -> float:
        embeddings = None if kind == "plain" else RunEmbeddings()
        if embeddings is not None:
            forget_null_captions(lm.model)
        if kind == "cold":
            null_cache.clear()
        t0 = time.perf_counter()
        results = list(verbalize(lm, items, batch_size=len(items), grounding=embeddings))
        if embeddings is not None:
            embeddings.ranks(gallery)
        assert all(r.layers for r in results)
        return time.perf_counter() - t0

    kinds = ("plain", "warm", "cold")
    with tempfile.TemporaryDirectory(prefix="lv-gray-captions-") as tmp:
        kept_in = null_cache.use_directory(Path(tmp))
        try:
            for kind in ("plain", "cold", "warm"):  # warm-up: weight views, allocator, the disk entry
                run(kind)
            times: dict[str, list[float]] = {kind: [] for kind in kinds}
            for i in range(repeats):
                for kind in kinds[i % 3 :] + kinds[: i % 3]:
                    times[kind].append(run(kind))
            forget_null_captions(lm.model)
            t0 = time.perf_counter()
            null_cache.weights_fingerprint(lm.model)
            fingerprint = time.perf_counter() - t0
        finally:
            null_cache.use_directory(kept_in)
    median = {kind: statistics.median(t) for kind, t in times.items()}
    return {"plain_s": round(median["plain"], 3), "grounded_s": round(median["warm"], 3),
            "grounded_cold_s": round(median["cold"], 3), "overhead": round(median["warm"] / median["plain"] - 1, 4),
            "overhead_cold": round(median["cold"] / median["plain"] - 1, 4),
            **{f"{name}_runs_s": [round(t, 3) for t in times[kind]]
               for name, kind in (("plain", "plain"), ("grounded", "warm"), ("grounded_cold", "cold"))},
            "fingerprint_s": round(fingerprint, 4)}


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--model", default="coca_ViT-B-32")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_family(args.model, None, args.device)
    figures = {"model": args.model, "images": args.images, "layers": lm.num_layers, "device": device_name(lm.device),
               **measure(lm, random_items(args.images), args.repeats)}
    report(figures, args.json)


if __name__ == "__main__":
    main()
