"""`latent-verbalizer train-demo [--family coca|llava]`: train a demo model on synthetic scenes.

    coca  (default) the CoCa demo `coca_synth_demo` (services/demo/train.py)
    llava           the LLaVA demo `llava_synth_demo` (services/demo/train_llava.py)

Every setting is a flag whose default is the shipped run's (docs/demo_model.md); a flag that only the
other family has is refused, naming the family.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)

# The settings each family's command line exposes (fields of its config dataclass).
FLAGS = {
    "coca": ("seed", "steps", "batch_size", "lr", "vision_lr", "warmup", "caption_loss_weight", "clip_loss_weight",
             "group", "threads", "device", "workers", "eval_every"),
    "llava": ("seed", "scenes", "language_steps", "projector_steps", "finetune_steps", "batch_size", "language_lr",
              "projector_lr", "finetune_lr", "warmup", "threads", "eval_every"),
}
OUT = {"coca": Path("runs/train-demo"), "llava": Path("runs/train-demo-llava")}


def _configs() -> dict[str, object]:
    from latent_verbalizer.services.demo.train import TrainConfig
    from latent_verbalizer.services.demo.train_llava import LlavaTrainConfig

    return {"coca": TrainConfig(), "llava": LlavaTrainConfig()}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--family", choices=tuple(FLAGS), default="coca", help="which demo model to train (default coca)")
    p.add_argument("--out", type=Path, default=None,
                   help="output directory; default " + ", ".join(f"{d} ({f})" for f, d in OUT.items()))
    defaults = _configs()
    for name in dict.fromkeys(n for names in FLAGS.values() for n in names):
        per_family = {f: getattr(defaults[f], name) for f, names in FLAGS.items() if name in names}
        kind = type(next(iter(per_family.values())))
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None,
                       help="default " + ", ".join(f"{v} ({f})" for f, v in per_family.items()))


def run(args: argparse.Namespace) -> int:
    given = {n: getattr(args, n) for names in FLAGS.values() for n in names if getattr(args, n, None) is not None}
    foreign = [n for n in given if n not in FLAGS[args.family]]
    if foreign:
        flags = ", ".join(f"--{n.replace('_', '-')}" for n in foreign)
        print(f"error: {flags} do not apply to --family {args.family}", file=sys.stderr)
        return 2
    out = args.out or OUT[args.family]
    if args.family == "coca":
        from latent_verbalizer.services.demo import train as trainer
    else:
        from latent_verbalizer.services.demo import train_llava as trainer
    cfg = type(_configs()[args.family])(**given)
    if args.family == "coca":
        _warn_long_cpu_run(cfg)
    path = trainer.train(cfg, out)
    trainer.plot_losses(out / trainer.LOG, out / "loss.png")
    print(f"weights: {path}\nlog: {out / trainer.LOG}\nloss curve: {out / 'loss.png'}")
    return 0


def _warn_long_cpu_run(cfg) -> None:
    from latent_verbalizer.shared.models import resolve_device

    if resolve_device(cfg.device).type == "cpu" and cfg.steps * cfg.batch_size > 200_000:
        log.warning("training %d x %d images on the CPU takes many hours (~30 images/s on 2 cores); "
                    "docs/demo_model.md 'On a CPU' gives a 30-minute recipe (a weaker model)",
                    cfg.steps, cfg.batch_size)
