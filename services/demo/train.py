"""Train the demo CoCa on streamed synthetic scenes with open_clip's own CoCa loss.

Deterministic from the seed: the model is initialised under `torch.manual_seed(seed)`, batch k holds
training samples k*B .. k*B+B-1 of the synthetic seed `seed` (groups of `group` scenes sharing
background and colours: hard negatives for the contrastive term), rendered by loader workers or not,
and nothing else draws random numbers. On a CPU the weights are bitwise reproducible for a given
thread count and CPU type; on a GPU up to its atomic-add kernels (the embedding backward).
Held-out checks caption scenes of seed `seed + 1` greedily with open_clip's `generate`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import open_clip
import torch
from open_clip.coca_model import CoCa
from open_clip.loss import CoCaLoss
from PIL import Image
from torch import nn

from latent_verbalizer.services.demo.scoring import score
from latent_verbalizer.services.demo.synth import Scene, render, sample_scene, scenes, variant
from latent_verbalizer.shared.models import resolve_device, save_checkpoint
from latent_verbalizer.shared.settings import DEMO_MODEL

log = logging.getLogger(__name__)
CHECKPOINT = f"{DEMO_MODEL}.safetensors"
LOG = "train_log.jsonl"


def _default_workers() -> int:
    return max(0, min(14, (os.cpu_count() or 1) - 2))


@dataclass(frozen=True)
class TrainConfig:
    """Defaults: the recipe of the shipped synth-v2 weights (docs/demo_model.md), ~7 min on one GPU."""

    seed: int = 0
    steps: int = 9700
    batch_size: int = 256
    lr: float = 2e-3  # text tower and decoder: high, so the 49408-word vocabulary is tamed fast
    vision_lr: float = 5e-4  # vision tower and pooler: from scratch, a ViT learns shapes better at lower rates
    warmup: int = 300
    weight_decay: float = 0.05
    caption_loss_weight: float = 2.0
    clip_loss_weight: float = 1.0
    group: int = 4  # scenes per batch that share background and colours (see synth.variant)
    # CPU threads for the model. One: on a shared 2-core machine, two OpenMP threads that must meet at
    # every op's barrier ran 5-10x slower than one. CPU weights are reproducible per thread count and CPU.
    threads: int = 1
    device: str = "auto"  # cuda when there is one
    # Processes rendering scenes ahead of the model (0: render in the training loop). A GPU step takes
    # far less time than rendering its batch (~1.5 ms a scene), so use most CPU cores. Batches do not
    # depend on it.
    workers: int = field(default_factory=_default_workers)
    log_every: int = 25
    eval_every: int = 1000
    eval_n: int = 64


class _RowCrossEntropy(nn.CrossEntropyLoss):
    """CoCaLoss's caption term, computed on [tokens, vocab] rows. CoCaLoss hands its CrossEntropyLoss
    `logits.permute(0, 2, 1)`; on CPU, log-softmax over that strided vocabulary axis costs about twice
    as much as over contiguous rows. Same value (mean over non-pad tokens), same gradient."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return super().forward(input.transpose(1, 2).reshape(-1, input.shape[1]), target.reshape(-1))


def coca_loss(cfg: TrainConfig, pad_id: int) -> CoCaLoss:
    loss = CoCaLoss(caption_loss_weight=cfg.caption_loss_weight, clip_loss_weight=cfg.clip_loss_weight,
                    pad_id=pad_id)
    loss.caption_loss = _RowCrossEntropy(ignore_index=pad_id)
    return loss


def _optimizer(model: CoCa, cfg: TrainConfig, fused: bool) -> torch.optim.AdamW:
    # open_clip's rule: no weight decay on gains, biases and the logit scale
    def exclude(n: str, p: torch.nn.Parameter) -> bool:
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

    groups = []
    for visual, lr in ((True, cfg.vision_lr), (False, cfg.lr)):  # "lr" in the log is the first group's
        named = [(n, p) for n, p in model.named_parameters() if n.startswith("visual.") == visual]
        for decay in (True, False):
            groups.append({"params": [p for n, p in named if exclude(n, p) != decay], "lr": lr,
                           "weight_decay": cfg.weight_decay if decay else 0.0})
    return torch.optim.AdamW(groups, betas=(0.9, 0.98), eps=1e-6, fused=fused)


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    return 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)))


def training_scenes(seed: int, start: int, n: int, group: int) -> list[tuple[Scene, Image.Image]]:
    """Training samples start .. start+n-1: sample j is variant j % group of scene j // group (variant 0
    is the scene itself), drawn on that scene's background texture."""
    out = []
    for j in range(start, start + n):
        index, k = divmod(j, group)
        scene = sample_scene(seed, index)
        if k:
            scene = variant(scene, seed, index, k)
        out.append((scene, render(scene, seed, index)))
    return out


def make_batch(preprocess, tokenizer, batch: list[tuple[Scene, Image.Image]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Image tensors and tokenised captions, the text cut to its longest row."""
    images = torch.stack([preprocess(img) for _, img in batch])
    text = tokenizer([s.caption for s, _ in batch])
    return images, text[:, : int((text != 0).sum(1).max())]


class TrainingBatches(torch.utils.data.Dataset):
    """Item k is training batch k (images [B, 3, 64, 64], tokens [B, T]): the same whichever process
    renders it, so the run is the same with or without loader workers."""

    def __init__(self, cfg: TrainConfig, preprocess, tokenizer):
        self.cfg, self.preprocess, self.tokenizer = cfg, preprocess, tokenizer

    def __len__(self) -> int:
        return self.cfg.steps

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.cfg.batch_size
        return make_batch(self.preprocess, self.tokenizer, training_scenes(self.cfg.seed, k * b, b, self.cfg.group))


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)  # a loader worker renders; its torch ops are tiny


def training_batches(cfg: TrainConfig, preprocess, tokenizer, pin: bool) -> torch.utils.data.DataLoader:
    extra = {"prefetch_factor": 4, "persistent_workers": True} if cfg.workers else {}
    return torch.utils.data.DataLoader(TrainingBatches(cfg, preprocess, tokenizer), batch_size=None,
                                       num_workers=cfg.workers, pin_memory=pin, worker_init_fn=_one_thread,
                                       **extra)


def greedy_captions(model: CoCa, images: torch.Tensor) -> list[str]:
    """Last-layer captions with open_clip's own generate: greedy, 30 tokens, at least 5."""
    with torch.no_grad():
        tokens = model.generate(images, generation_type="top_k", top_k=1, seq_len=30, min_seq_len=5)
    texts = (open_clip.decode(t) for t in tokens)
    return [t.split("<end_of_text>")[0].replace("<start_of_text>", "").strip() for t in texts]


def evaluate(model: CoCa, preprocess, tokenizer, seed: int, n: int) -> dict[str, float]:
    batch = [(s, img) for _, s, img in scenes(seed, n)]
    images, _ = make_batch(preprocess, tokenizer, batch)
    truth = [s for s, _ in batch]
    captions = greedy_captions(model, images.to(model.logit_scale.device))
    model.train()
    scores = [score(c, s) for c, s in zip(captions, truth)]
    return {
        "eval_exact": sum(c == s.caption for c, s in zip(captions, truth)) / n,
        **{f"eval_{k}": sum(s[k] for s in scores) / n for k in ("color", "shape", "color_shape")},
        "eval_example": captions[0],
    }


def train(cfg: TrainConfig, out: Path) -> Path:
    """Train, writing out/train_log.jsonl as it goes and the fp16 checkpoint at the end; returns it."""
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model, _, preprocess = open_clip.create_model_and_transforms(DEMO_MODEL)
    # open_clip 3.3.0 never initialises the decoder's vocabulary projection (torch.empty, and
    # MultimodalTransformer.init_parameters is not called): start it at zero, i.e. uniform predictions.
    nn.init.zeros_(model.text_decoder.text_projection)
    device = resolve_device(cfg.device)
    model.to(device)
    tokenizer = open_clip.get_tokenizer(DEMO_MODEL)
    loss_fn = coca_loss(cfg, model.pad_id)
    opt = _optimizer(model, cfg, fused=device.type == "cuda")
    batches = training_batches(cfg, preprocess, tokenizer, pin=device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))
    model.train()
    t0 = time.perf_counter()
    with (out / LOG).open("w") as logf:
        logf.write(json.dumps({"config": asdict(cfg)}) + "\n")
        for step, (images, text) in enumerate(batches):
            o = model(images.to(device, non_blocking=True), text.to(device, non_blocking=True))
            clip_loss, caption_loss = loss_fn(o["image_features"], o["text_features"], o["logits"],
                                              o["labels"], o["logit_scale"])
            loss = clip_loss + caption_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            with torch.no_grad():  # open_clip's clamp: logit scale at most 100
                model.logit_scale.clamp_(0, math.log(100))
            row: dict = {}
            if (step + 1) % cfg.log_every == 0 or step == 0:
                row = {"step": step + 1, "loss": loss.item(), "caption_loss": caption_loss.item(),
                       "contrastive_loss": clip_loss.item(), "lr": sched.get_last_lr()[0]}
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                row = {"step": step + 1, **row, **evaluate(model, preprocess, tokenizer, cfg.seed + 1, cfg.eval_n)}
                save_checkpoint(model, out / CHECKPOINT, dtype=torch.float16)  # latest, for inspection
            if row:
                row["elapsed_s"] = round(time.perf_counter() - t0, 1)
                logf.write(json.dumps(row) + "\n")
                logf.flush()
                log.info("step %d: %s", step + 1, {k: v for k, v in row.items() if k != "step"})
    return out / CHECKPOINT


def plot_losses(log_path: Path, png: Path) -> None:
    """Loss curves (total, caption, contrastive) and held-out caption accuracy from a training log."""
    rows = [json.loads(line) for line in log_path.read_text().splitlines()]
    losses = [r for r in rows[1:] if "loss" in r]
    curves = {key: ([r["step"] for r in losses], [r[key] for r in losses])
              for key in ("loss", "caption_loss", "contrastive_loss")}
    cfg = rows[0]["config"]
    plot_training(rows, curves, "weighted loss", f"{DEMO_MODEL}: open_clip CoCaLoss, seed {cfg['seed']}", png)


def plot_training(rows: list[dict], curves: dict[str, tuple[list, list]], ylabel: str, title: str, png: Path) -> None:
    """A training log's loss curves (label -> (steps, values), log scale) with the held-out colour+shape
    accuracy (its rows with `eval_color_shape`) on a second axis; `rows[0]["config"]` names the batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [r for r in rows[1:] if "eval_color_shape" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, (steps, values) in curves.items():
        ax.plot(steps, values, label=label)
    ax.set_yscale("log")
    ax.set_xlabel(f"step (batch {rows[0]['config']['batch_size']})")
    ax.set_ylabel(ylabel)
    acc = ax.twinx()
    acc.plot([r["step"] for r in evals], [r["eval_color_shape"] for r in evals], "k.--",
             label="held-out colour+shape accuracy")
    acc.set_ylim(0, 1)
    acc.set_ylabel("accuracy")
    handles = ax.get_legend_handles_labels()[0] + acc.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="center right", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
