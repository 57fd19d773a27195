"""What grounding adds to `verbalize`'s wall time (issue 14 budget: <= 0.15 for coca_ViT-B-32, random
weights, 8 images, every layer, 2 CPU threads).

Each repeat runs the in-process pipeline on the same images without and with grounding, back to back
(the order alternating), the gray image's captions forgotten before every grounded run so each one
pays for them as a fresh process does, and the ranks taken as the CLI does. Prints the median times
and overhead = median(with) / median(without) - 1. `measure()` is what bench/grounding_eval.py calls.

    python bench/grounding_overhead.py --model coca_ViT-B-32 --images 8 --threads 2 --json
"""

from __future__ import annotations

import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import base_parser, device_name, report  # noqa: E402
from services.decoder.grounding import RunEmbeddings, forget_null_captions  # noqa: E402
from services.pipeline import verbalize  # noqa: E402
from shared.images import ImageItem  # noqa: E402
from shared.models import LoadedModel, load_model  # noqa: E402


def random_items(n: int, seed: int = 0) -> list[ImageItem]:
    """n random-noise 256x256 PNGs (random weights see noise as well as photos)."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(buf, "PNG")
        items.append(ImageItem(id=f"img{i}", source=f"img{i}.png", data=buf.getvalue()))
    return items


def measure(lm: LoadedModel, items: list[ImageItem], repeats: int = 3, gallery: int = 1000) -> dict:
    """Median wall seconds of verbalize on `items` (every layer, default decoding) without and with
    grounding, and the overhead ratio."""

    def run(grounded: bool) -> float:
        embeddings = RunEmbeddings() if grounded else None
        if grounded:
            forget_null_captions(lm.model)
        t0 = time.perf_counter()
        results = list(verbalize(lm, items, batch_size=len(items), grounding=embeddings))
        if embeddings is not None:
            embeddings.ranks(gallery)
        assert all(r.layers for r in results)
        return time.perf_counter() - t0

    run(False), run(True)  # warm-up: weight views, allocator
    times: dict[bool, list[float]] = {False: [], True: []}
    for i in range(repeats):
        for grounded in ((False, True) if i % 2 == 0 else (True, False)):
            times[grounded].append(run(grounded))
    plain, grounded = statistics.median(times[False]), statistics.median(times[True])
    return {"plain_s": round(plain, 3), "grounded_s": round(grounded, 3), "overhead": round(grounded / plain - 1, 4),
            "plain_runs_s": [round(t, 3) for t in times[False]], "grounded_runs_s": [round(t, 3) for t in times[True]]}


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--model", default="coca_ViT-B-32")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(args.model, None, args.device)
    figures = {"model": args.model, "images": args.images, "layers": lm.num_layers, "device": device_name(lm.device),
               **measure(lm, random_items(args.images), args.repeats)}
    report(figures, args.json)


if __name__ == "__main__":
    main()
