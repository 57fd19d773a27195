"""Tiny random transformers models of each family, built in code and written with save_pretrained, so tests and
benches load them through the real loading code with nothing downloaded. Weights are drawn from a fixed seed with
a large init (DESIGN.md: with ~0.02 every layer gives the same caption; 0.3-0.5 makes layers and images differ);
BLIP's also get random norm scales and biases, so that a mistake in how one is applied cannot hide behind ones
and zeros."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from torch import nn
from transformers import (
    AddedToken,
    BertTokenizerFast,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessor,
    BlipProcessor,
    CLIPImageProcessor,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

# LLaVA: a word-level vocabulary, a chat template in the style of llava-1.5's ("USER: <image>\n... ASSISTANT:").
LLAVA_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
LLAVA_WORDS = ["USER:", "ASSISTANT:", "Describe", "the", "image", "briefly.", "What", "is", "this?"] + [
    "red", "green", "blue", "yellow", "black", "white", "small", "large", "round", "square", "a", "an", "of", "on",
    "in", "with", "and", "dog", "cat", "bird", "car", "tree", "house", "person", "sky", "road", "grass", "water",
    "table", "cup", "ball", "book", "flower", "boat", "chair", "window", "sitting", "standing", "near", "two",
]
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | upper }}: "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def llava_tokenizer(chat_template: str | None = LLAVA_CHAT_TEMPLATE):
    """A word-level PreTrainedTokenizerFast (whitespace-split words, <s> prepended as Llama does)."""
    vocab = {w: i for i, w in enumerate(LLAVA_SPECIALS + LLAVA_WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=[AddedToken("<image>", special=True, normalized=False)],
        chat_template=chat_template,
    )


def tiny_llava(
    path: Path, *, layers: int = 3, feature_layer: int | list[int] = -2, select: str = "default",
    image_size: int = 30, patch: int = 6, text_layers: int = 2, width: int = 32, init: float = 0.4, seed: int = 0,
    chat_template: str | None = LLAVA_CHAT_TEMPLATE,
) -> Path:
    """A LlavaForConditionalGeneration (CLIP vision: `layers` blocks; Llama: `text_layers` blocks with grouped-query
    attention; both `width` wide) with its CLIPImageProcessor and LlavaProcessor, saved to `path`."""
    tokenizer = llava_tokenizer(chat_template)
    ids = tokenizer.get_vocab()
    text = LlamaConfig(
        vocab_size=len(ids), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=text_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, initializer_range=init,
        bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"],
    )
    vision = CLIPVisionConfig(
        hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers, num_attention_heads=4,
        image_size=image_size, patch_size=patch, projection_dim=width,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=ids["<image>"], vision_feature_layer=feature_layer,
        vision_feature_select_strategy=select, image_seq_length=(image_size // patch) ** 2 + (select == "full"),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(bos_token_id=ids["<s>"], eos_token_id=ids["</s>"],
                                               pad_token_id=ids["<pad>"])
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
                               vision_feature_select_strategy=select, chat_template=chat_template,
                               num_additional_image_tokens=1)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


# BLIP: a WordPiece vocabulary (BERT style, [DEC] as bos, as BLIP's tokenizer has it).
BLIP_WORDS = ("a an the of on in with and is two cat cats dog dogs man woman red blue green small large sitting"
              " standing table grass street car bus tree sky photo picture ##s ##ing").split()


def _trained_like(model: nn.Module, seed: int) -> None:
    """Random LayerNorm scales around 1 and random biases, as trained weights have them."""
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
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *BLIP_WORDS]
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
