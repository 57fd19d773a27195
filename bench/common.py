"""Shared bench helpers: argument conventions, timing with device sync, and the --json line."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return p


# The demo models' training scenes and their held-out checks: coca_synth_demo 0 and 1, llava_synth_demo 10 and 11.
TRAINING_SEEDS = (0, 1, 10, 11)


def scene_parser(description: str, seed: int) -> argparse.ArgumentParser:
    """base_parser plus the synthetic-scene benches' options: --n, --seed (refused if a training seed), and
    the model (default: the shipped CoCa demo model; llava_synth_demo is the LLaVA one). Parse with
    `parse_scene_args`."""
    from latent_verbalizer.shared.settings import DEMO_MODEL

    p = base_parser(description)
    p.add_argument("--n", type=int, default=200, help="number of scenes")
    p.add_argument("--seed", type=int, default=seed, help=f"scene seed, not one of {TRAINING_SEEDS}")
    p.add_argument("--model", default=DEMO_MODEL)
    p.add_argument("--pretrained", default=None, help="CoCa weights (default: the model's own, shared.pretrained)")
    p.add_argument("--device", default="cpu")
    return p


def parse_scene_args(p: argparse.ArgumentParser) -> argparse.Namespace:
    """The parsed options; a CoCa model's --pretrained resolved to its default weights when not given."""
    from latent_verbalizer.services.families import resolve
    from latent_verbalizer.shared.pretrained import resolve_pretrained

    args = p.parse_args()
    if args.seed in TRAINING_SEEDS:
        p.error(f"seed {args.seed} was used in training; pick another")
    if resolve(args.model).family == "coca":
        args.pretrained = resolve_pretrained(args.model, args.pretrained)
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of fn() in seconds (after warm-up calls)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def targets_met(figures: dict, at_least: dict[str, float], overhead_at_most: float = 0.15) -> dict[str, bool]:
    """Per target, whether the figure reaches it: each `at_least` figure (None: not met), and `overhead` when
    the figures have one."""
    met = {k: figures[k] is not None and figures[k] >= t for k, t in at_least.items()}
    if "overhead" in figures:
        met["overhead"] = figures["overhead"] <= overhead_at_most
    return met


def report(figures: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(figures))
    else:
        for k, v in figures.items():
            print(f"{k:32s} {v}")
