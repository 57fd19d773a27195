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


def blip_captioner(path: Path, vision_layers: int = 4, seed: int = 1) -> Path:
    """A BlipForConditionalGeneration (vision: `vision_layers` blocks of width 32 over a 3x3 patch grid of a 24-px
    input; text decoder: 2 layers of width 32) with a WordPiece tokenizer whose bos is [DEC], and its
    BlipProcessor, saved to `path`."""
    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *WORDS]
    words = path / "words.txt"
    words.write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(words), do_lower_case=True, bos_token="[DEC]")
    words.unlink()  # the tokenizer saves its own vocabulary below
    config = BlipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=vision_layers,
                           num_attention_heads=4, image_size=24, patch_size=8, initializer_range=0.4),
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64, initializer_range=0.4,
                         bos_token_id=vocab.index("[DEC]"), sep_token_id=vocab.index("[SEP]"),
                         eos_token_id=vocab.index("[SEP]"), pad_token_id=vocab.index("[PAD]")),
    )
    config.initializer_range = 0.4  # BlipConfig fixes it at 0.02 in __init__
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config).eval()
    _trained_like(model, seed + 1)
    model.save_pretrained(path)
    processor = BlipProcessor(BlipImageProcessor(size={"height": 24, "width": 24}), tokenizer)
    processor.save_pretrained(path)
    return path
