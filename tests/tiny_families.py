"""Tiny random transformers models of each family, built in code and written with save_pretrained, so tests and
benches load them through the real loading code with nothing downloaded. Weights are drawn from a fixed seed with
a large init (DESIGN.md: with ~0.02 every layer gives the same caption; 0.3-0.5 makes layers and images differ)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    AddedToken,
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
