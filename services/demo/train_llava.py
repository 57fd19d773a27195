"""Train the LLaVA demo model (`llava_synth_demo`) the LLaVA way, on streamed synthetic scenes.

The vision tower is the shipped CoCa demo model's ViT, converted (services.demo.llava_model) and frozen:
its feature layer's patch tokens are computed ONCE for every training scene, and the three stages read
them from memory, never running the tower again:

  1. language: the Llama language model alone learns the captions as plain text ("<s> caption </s>"),
     what a pretrained LLM brings to LLaVA (here its language is the scenes' grammar);
  2. projector: the projector alone learns to map the frozen tower's tokens into the frozen language
     model's input space (LLaVA's feature alignment);
  3. finetune: the projector and the whole language model together (LLaVA's visual instruction tuning),
     on the chat prompt "USER: <image> {prompt} ASSISTANT: {caption} </s>".

Stages 2 and 3 compute the loss on the answer only (caption and </s>), as LLaVA does. Deterministic from
the seed: the model is initialised under `torch.manual_seed(seed)`, the training scenes are scenes 0 ..
scenes-1 of the synthetic seed `seed`, and one generator seeded by `seed` draws each sample's prompt and
the batches. Held-out checks caption scenes of seed `seed + 1` with the model's own `generate`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from latent_verbalizer.services.demo.llava_model import (
    PROMPTS,
    LanguageConfig,
    build_model,
    build_processor,
    clip_vision_from_coca,
)
from latent_verbalizer.services.demo.scoring import score
from latent_verbalizer.services.demo.synth import Scene, scenes
from latent_verbalizer.services.demo.train import plot_training
from latent_verbalizer.services.families.llava import chat_prompt
from latent_verbalizer.shared.models import load_model
from latent_verbalizer.shared.settings import DEMO_MODEL, DEMO_PRETRAINED, LLAVA_DEMO_MODEL

log = logging.getLogger(__name__)
LOG = "train_log.jsonl"
STAGES = ("language", "projector", "finetune")


@dataclass(frozen=True)
class LlavaTrainConfig:
    """Defaults: the recipe of the shipped llava_synth_demo weights (docs/demo_model.md)."""

    seed: int = 10  # model init, training scenes (seed 10) and their order; checks on seed 11
    scenes: int = 16000  # distinct training scenes (their vision features are kept in memory, fp16)
    language_steps: int = 200
    projector_steps: int = 200
    finetune_steps: int = 1800
    batch_size: int = 32
    language_lr: float = 2e-3
    projector_lr: float = 2e-3
    finetune_lr: float = 1e-3
    warmup: int = 100  # steps of linear warm-up at the start of each stage, then cosine to zero
    weight_decay: float = 0.0
    threads: int = 1  # CPU threads (one: see docs/demo_model.md "One thread")
    log_every: int = 50
    eval_every: int = 250  # held-out checks every this many projector / finetune steps, and at their end
    eval_n: int = 64


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


@torch.inference_mode()
def pixel_values(processor: LlavaProcessor, images: list[Image.Image]) -> torch.Tensor:
    return processor.image_processor(images, return_tensors="pt")["pixel_values"]


@torch.inference_mode()
def vision_features(model: LlavaForConditionalGeneration, processor: LlavaProcessor, seed: int, n: int,
                    batch: int = 256) -> torch.Tensor:
    """The frozen tower's feature-layer patch tokens (CLS dropped, the config's "default" strategy) of
    scenes 0 .. n-1 of `seed`: [n, 64, C] fp16 (LLaVA's `get_image_features` before the projector)."""
    layer = model.config.vision_feature_layer
    out = []
    for start in range(0, n, batch):
        images = [img for _, _, img in scenes(seed, min(batch, n - start), start)]
        hidden = model.model.vision_tower(pixel_values(processor, images), output_hidden_states=True).hidden_states
        out.append(hidden[layer][:, 1:].half())
    return torch.cat(out)


def prompt_ids(processor: LlavaProcessor) -> list[list[int]]:
    """Each training prompt as the processor lays it out: the chat template, <image> expanded to one
    token per patch, <s> in front (what `processor(text=..., images=...)` gives at inference)."""
    blank = Image.new("RGB", (64, 64))
    out = []
    for prompt in PROMPTS:
        text = chat_prompt(processor, prompt)
        out.append(processor(text=text, images=blank)["input_ids"][0])
    return out


def caption_ids(processor: LlavaProcessor, captions: list[str]) -> list[list[int]]:
    """Each caption's word ids then </s>."""
    tok = processor.tokenizer
    return [ids + [tok.eos_token_id] for ids in tok(captions, add_special_tokens=False)["input_ids"]]


def pad_batch(rows: list[list[int]], answer_from: list[int], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Right-padded ids [B, T], attention mask [B, T] and labels [B, T] (-100 before each row's answer
    and on padding)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, (row, start) in enumerate(zip(rows, answer_from)):
        ids[b, : len(row)] = torch.tensor(row)
        labels[b, start: len(row)] = ids[b, start: len(row)]
        mask[b, : len(row)] = 1
    return ids, mask, labels


def answer_loss(model: LlavaForConditionalGeneration, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                features: torch.Tensor | None) -> torch.Tensor:
    """Mean cross-entropy of the labelled tokens. ids/mask/labels [B, T]; features [B, 64, C] (the tower's
    feature-layer tokens) go through the projector into the <image> positions, as LLaVA's forward does."""
    embeds = model.get_input_embeddings()(ids)  # [B, T, H]
    if features is not None:
        image = model.model.multi_modal_projector(features.float())  # [B, 64, H]
        where = (ids == model.config.image_token_index)[..., None].expand_as(embeds)
        embeds = embeds.masked_scatter(where, image)
    hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    # position t predicts token t + 1
    target = labels[:, 1:]
    keep = target != -100
    logits = model.lm_head(hidden[:, :-1][keep])  # [K, V]
    return F.cross_entropy(logits.float(), target[keep])


@torch.inference_mode()
def greedy_captions(model: LlavaForConditionalGeneration, processor: LlavaProcessor, images: list[Image.Image],
                    prompt: str = PROMPTS[0], vision_feature_layer: int | None = None,
                    max_new_tokens: int = 29) -> list[str]:
    """The model's own `generate` (greedy) on the chat prompt, at its feature layer or another."""
    inputs = processor(text=[chat_prompt(processor, prompt)] * len(images), images=images, return_tensors="pt",
                       padding=True)
    inputs.pop("token_type_ids", None)
    extra = {} if vision_feature_layer is None else {"vision_feature_layer": vision_feature_layer}
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, **extra)
    return processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def evaluate(model: LlavaForConditionalGeneration, processor: LlavaProcessor, seed: int, n: int) -> dict:
    """Feature-layer captions of n held-out scenes, scored against their truth."""
    held_out = list(scenes(seed, n))
    truth: list[Scene] = [s for _, s, _ in held_out]
    captions = greedy_captions(model, processor, [img for _, _, img in held_out])
    scores = [score(c, s) for c, s in zip(captions, truth)]
    return {
        "eval_exact": sum(c == s.caption for c, s in zip(captions, truth)) / n,
        **{f"eval_{k}": sum(s[k] for s in scores) / n for k in ("color", "shape", "color_shape")},
        "eval_example": captions[0],
    }


def _stage_parameters(model: LlavaForConditionalGeneration, stage: str) -> list[torch.nn.Parameter]:
    projector = list(model.model.multi_modal_projector.parameters())
    language = list(model.model.language_model.parameters()) + list(model.lm_head.parameters())
    return {"language": language, "projector": projector, "finetune": projector + language}[stage]


def train(cfg: LlavaTrainConfig, out: Path) -> Path:
    """Train, writing out/train_log.jsonl as it goes and out/llava_synth_demo/ (save_pretrained, fp16) at
    the end; returns that directory."""
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    vision = clip_vision_from_coca(load_model(DEMO_MODEL, DEMO_PRETRAINED).model.visual)
    processor = build_processor()
    torch.manual_seed(cfg.seed)
    model = build_model(vision, processor.tokenizer, LanguageConfig())
    model.model.vision_tower.requires_grad_(False)

    features = vision_features(model, processor, cfg.seed, cfg.scenes)  # [S, 64, C]
    truth = [s for _, s, _ in scenes(cfg.seed, cfg.scenes)]
    answers = caption_ids(processor, [s.caption for s in truth])
    prompts = prompt_ids(processor)
    gen = torch.Generator().manual_seed(cfg.seed)
    prompt_of = torch.randint(len(prompts), (cfg.scenes,), generator=gen).tolist()
    log.info("%d training scenes' features in %.0f s", cfg.scenes, time.perf_counter() - t0)
    pad_id = processor.tokenizer.pad_token_id
    bos = processor.tokenizer.bos_token_id

    with (out / LOG).open("w") as logf:
        logf.write(json.dumps({"config": asdict(cfg), "features_s": round(time.perf_counter() - t0, 1)}) + "\n")
        step_total = 0
        for stage in STAGES:
            steps, lr = getattr(cfg, f"{stage}_steps"), getattr(cfg, f"{stage}_lr")
            params = _stage_parameters(model, stage)
            model.requires_grad_(False)
            for p in params:
                p.requires_grad_(True)
            opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=cfg.weight_decay)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s, n=steps: _lr_factor(s, n, cfg.warmup))
            model.train()
            order = torch.empty(0, dtype=torch.long)
            for step in range(steps):
                if len(order) < cfg.batch_size:  # a fresh permutation of the scenes when one runs out
                    order = torch.cat([order, torch.randperm(cfg.scenes, generator=gen)])
                batch, order = order[: cfg.batch_size].tolist(), order[cfg.batch_size:]
                if stage == "language":  # plain text: <s> caption </s>
                    rows = [[bos] + answers[j] for j in batch]
                    ids, mask, labels = pad_batch(rows, [1] * len(rows), pad_id)
                    loss = answer_loss(model, ids, mask, labels, None)
                else:
                    rows = [prompts[prompt_of[j]] + answers[j] for j in batch]
                    ids, mask, labels = pad_batch(rows, [len(prompts[prompt_of[j]]) for j in batch], pad_id)
                    loss = answer_loss(model, ids, mask, labels, features[batch])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                step_total += 1
                row: dict = {}
                if (step + 1) % cfg.log_every == 0 or step == 0:
                    row = {"loss": loss.item(), "lr": sched.get_last_lr()[0]}
                if stage != "language" and ((step + 1) % cfg.eval_every == 0 or step + 1 == steps):
                    model.eval()
                    row.update(evaluate(model, processor, cfg.seed + 1, cfg.eval_n))
                    model.train()
                if row:
                    row = {"step": step_total, "stage": stage, **row, "elapsed_s": round(time.perf_counter() - t0, 1)}
                    logf.write(json.dumps(row) + "\n")
                    logf.flush()
                    log.info("%s step %d: %s", stage, step + 1, {k: v for k, v in row.items() if k != "step"})
    model.eval()
    target = out / LLAVA_DEMO_MODEL
    save(model, processor, target)
    return target


def save(model: LlavaForConditionalGeneration, processor: LlavaProcessor, target: Path) -> None:
    """save_pretrained the model in fp16 (the vision tower's weights were fp16 already: lossless) with its
    processor (tokenizer, image processor, chat template)."""
    model.to(torch.float16).save_pretrained(target)
    model.to(torch.float32)
    processor.save_pretrained(target)


def plot_losses(log_path: Path, png: Path) -> None:
    """The answer loss of each stage and the held-out colour+shape accuracy from a training log."""
    rows = [json.loads(line) for line in log_path.read_text().splitlines()]
    curves = {}
    for stage in STAGES:
        losses = [r for r in rows[1:] if r.get("stage") == stage and "loss" in r]
        curves[f"{stage} loss"] = ([r["step"] for r in losses], [r["loss"] for r in losses])
    plot_training(rows, curves, "cross-entropy of the answer (nats/token)",
                  f"{LLAVA_DEMO_MODEL}: language, projector, finetune; seed {rows[0]['config']['seed']}", png)
