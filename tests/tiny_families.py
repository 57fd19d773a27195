"""Tiny random models of the transformers families, built in code and written with `save_pretrained`, so tests
load them through the real loading code and nothing is downloaded. Weights are drawn from a fixed seed with a
large init (0.4) and random norm scales and biases, so that layers and images give different captions and a
mistake in how a bias or a norm is applied cannot hide behind zeros and ones."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import BertTokenizerFast, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

WORDS = ("a an the of on in with and is two cat cats dog dogs man woman red blue green small large sitting"
         " standing table grass street car bus tree sky photo picture ##s ##ing").split()


def _trained_like(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.copy_(1 + 0.3 * torch.randn(module.weight.shape, generator=g))
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def tiny_blip(path: Path, *, layers: int = 4, image_size: int = 24, patch: int = 8, text_layers: int = 2,
              width: int = 32, init: float = 0.4, seed: int = 1) -> Path:
    """A BlipForConditionalGeneration (vision: `layers` blocks over a grid of (image_size / patch)^2 patches; text
    decoder: `text_layers` layers; both `width` wide) with a WordPiece tokenizer whose bos is [DEC], and its
    BlipProcessor, saved to `path`."""
    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *WORDS]
    words = path / "words.txt"
    words.write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(words), do_lower_case=True, bos_token="[DEC]")
    words.unlink()  # the tokenizer saves its own vocabulary below
    heads = max(4, width // 32)
    config = BlipConfig(
        vision_config=dict(hidden_size=width, intermediate_size=width + 5, num_hidden_layers=layers,
                           num_attention_heads=heads, image_size=image_size, patch_size=patch, initializer_range=init),
        text_config=dict(vocab_size=len(vocab), hidden_size=width, intermediate_size=width + 5,
                         num_hidden_layers=text_layers, num_attention_heads=heads, max_position_embeddings=64,
                         initializer_range=init, bos_token_id=vocab.index("[DEC]"), sep_token_id=vocab.index("[SEP]"),
                         eos_token_id=vocab.index("[SEP]"), pad_token_id=vocab.index("[PAD]")),
    )
    config.initializer_range = init  # BlipConfig fixes it at 0.02 in __init__
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config).eval()
    _trained_like(model, seed + 1)
    model.save_pretrained(path)
    processor = BlipProcessor(BlipImageProcessor(size={"height": image_size, "width": image_size}), tokenizer)
    processor.save_pretrained(path)
    return path
