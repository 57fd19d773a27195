"""The LLaVA demo model `llava_synth_demo`, built from parts (docs/demo_model.md, "The LLaVA demo model").

    pixels [n, 3, 64, 64] -> CLIP vision tower (the CoCa demo's ViT, converted; frozen)
        -> hidden_states[vision_feature_layer] [n, 65, 128] -> drop CLS [n, 64, 128]
        -> multi_modal_projector (linear -> gelu -> linear) [n, 64, H]
        -> at the 64 <image> positions of the chat prompt -> Llama language model -> caption words

Everything is transformers' own classes (`LlavaForConditionalGeneration`, `CLIPVisionModel`,
`LlamaForCausalLM`, `LlavaProcessor` with a `CLIPImageProcessor` and a word-level
`PreTrainedTokenizerFast`), so the saved directory loads with `from_pretrained` and nothing of ours.

The vision tower is the shipped CoCa demo model's ViT (synth-v2) with its weights renamed, the same
computation block for block (open_clip -> transformers):

    conv1 (no bias)                      -> embeddings.patch_embedding
    class_embedding [C]                  -> embeddings.class_embedding
    positional_embedding [T, C]          -> embeddings.position_embedding.weight
    ln_pre                               -> pre_layrnorm (applied to the embeddings: hidden_states[0])
    resblocks[i].ln_1 / ln_2             -> encoder.layers[i].layer_norm1 / layer_norm2
    resblocks[i].attn.in_proj_* [3C, ..] -> self_attn.q_proj / k_proj / v_proj (split in thirds)
    resblocks[i].attn.out_proj           -> self_attn.out_proj
    resblocks[i].mlp.c_fc / c_proj       -> mlp.fc1 / fc2, activation exact GELU (the CoCa config has no
                                            quick_gelu: open_clip's nn.GELU; CLIP's "gelu")
    ln_post, attn_pool, proj             -> not used: CoCa's ln_post has the pooler's width (64), and
                                            LLaVA reads hidden states, never CLIP's post_layernorm (left at
                                            the identity: weight 1, bias 0)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from open_clip.transformer import VisionTransformer
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from latent_verbalizer.services.demo.synth import BACKGROUNDS, COLORS, IMAGE_SIZE, SHAPES, SIZES

# open_clip's OPENAI_DATASET_MEAN / STD: the CoCa demo's Normalize
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

PAD, UNK, BOS, EOS, IMAGE = "<pad>", "<unk>", "<s>", "</s>", "<image>"
USER, ASSISTANT = "USER:", "ASSISTANT:"
# Prompts the model is trained with (one drawn per training sample), so a short captioning request in
# these words works whatever its wording. The last has words the tokenizer does not know (<unk>), so a
# request in other words still gets a caption. The LLaVA family's default prompt is the first.
PROMPTS = (
    "Describe the image briefly.",
    "Describe the image.",
    "Describe this image.",
    "What is in the image?",
    "What is in this picture?",
    "Caption this image.",
    "Write a short caption for the image.",
    "A short image caption:",
    "What do you see?",
    "Tell me about the scene.",
)
# The scenes' words (services/demo/synth.py's grammar), then the prompts' words and punctuation.
SCENE_WORDS = ("a", *SIZES, *COLORS, *SHAPES, "left", "of", "on", *BACKGROUNDS, "background")
PROMPT_WORDS = ("describe", "the", "this", "image", "briefly", "picture", "photo", "what", "is", "in", "caption",
                "write", "short", "for", "do", "you", "see", ".", "?", ":", ",")

# LLaVA-1.5's conversation format, "USER: <image>\n{prompt} ASSISTANT:", for a word-level tokenizer.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }} {% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image> {% elif item['type'] == 'text' %}{{ item['text'] }} {% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] != 'user' %}</s> {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@dataclass(frozen=True)
class LanguageConfig:
    """The Llama-style language model and the projector's width."""

    hidden: int = 128
    layers: int = 3
    heads: int = 4
    intermediate: int = 256
    max_positions: int = 256
    vision_feature_layer: int = -2  # LLaVA-1.5's choice: the residual stream after the second-to-last block


def words() -> list[str]:
    """The tokenizer's vocabulary in id order: specials, chat markers, scene words, prompt words."""
    vocab = [PAD, UNK, BOS, EOS, IMAGE, USER, ASSISTANT]
    for w in (*SCENE_WORDS, *PROMPT_WORDS):
        if w not in vocab:
            vocab.append(w)
    return vocab


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `words()`: lower-cased, split on whitespace and punctuation, <s> in
    front; decoding joins words with spaces."""
    vocab = {w: i for i, w in enumerate(words())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                                       special_tokens=[(BOS, vocab[BOS])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK,
                                   pad_token=PAD, additional_special_tokens=[IMAGE, USER, ASSISTANT],
                                   padding_side="left")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_image_processor() -> CLIPImageProcessor:
    """The CoCa demo's preprocessing (open_clip's transform for a 64-px model): bicubic resize of the
    shorter side to 64, centre crop 64, scale to [0, 1], normalise with OpenAI's CLIP mean and std."""
    return CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": IMAGE_SIZE}, resample=3,  # PIL bicubic
        do_center_crop=True, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD), do_convert_rgb=True,
    )


def build_processor() -> LlavaProcessor:
    tokenizer = build_tokenizer()
    return LlavaProcessor(image_processor=build_image_processor(), tokenizer=tokenizer,
                          chat_template=CHAT_TEMPLATE, patch_size=8, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, image_token=IMAGE)


def clip_vision_config(visual: VisionTransformer) -> CLIPVisionConfig:
    """The CLIP vision config with the open_clip tower's shape."""
    blocks = visual.transformer.resblocks
    width = visual.class_embedding.shape[0]
    return CLIPVisionConfig(
        hidden_size=width, intermediate_size=blocks[0].mlp.c_fc.out_features,
        num_hidden_layers=len(blocks), num_attention_heads=blocks[0].attn.num_heads,
        image_size=visual.image_size[0], patch_size=visual.patch_size[0], num_channels=3,
        hidden_act="gelu", layer_norm_eps=visual.ln_pre.eps,
    )


@torch.no_grad()
def clip_vision_from_coca(visual: VisionTransformer) -> CLIPVisionModel:
    """The CoCa ViT's weights in a transformers CLIPVisionModel (the table in the module docstring);
    `hidden_states[i + 1]` is then the residual stream after CoCa block i."""
    if not isinstance(visual.ln_pre, torch.nn.LayerNorm) or any(
        not isinstance(b.ls_1, torch.nn.Identity) or not isinstance(b.mlp.gelu, torch.nn.GELU)
        or b.mlp.gelu.approximate != "none" for b in visual.transformer.resblocks
    ):
        raise ValueError("only a ViT with ln_pre, no layer scale and exact GELU converts to CLIP's blocks")
    model = CLIPVisionModel(clip_vision_config(visual)).eval()
    vm = model.vision_model
    emb = vm.embeddings
    emb.patch_embedding.weight.copy_(visual.conv1.weight)
    emb.class_embedding.copy_(visual.class_embedding)
    emb.position_embedding.weight.copy_(visual.positional_embedding)
    vm.pre_layrnorm.load_state_dict(visual.ln_pre.state_dict())
    for block, layer in zip(visual.transformer.resblocks, vm.encoder.layers, strict=True):
        layer.layer_norm1.load_state_dict(block.ln_1.state_dict())
        layer.layer_norm2.load_state_dict(block.ln_2.state_dict())
        attn = layer.self_attn
        for proj, w, b in zip((attn.q_proj, attn.k_proj, attn.v_proj), block.attn.in_proj_weight.chunk(3),
                              block.attn.in_proj_bias.chunk(3)):
            proj.weight.copy_(w)
            proj.bias.copy_(b)
        attn.out_proj.load_state_dict(block.attn.out_proj.state_dict())
        layer.mlp.fc1.load_state_dict(block.mlp.c_fc.state_dict())
        layer.mlp.fc2.load_state_dict(block.mlp.c_proj.state_dict())
    torch.nn.init.ones_(vm.post_layernorm.weight)
    torch.nn.init.zeros_(vm.post_layernorm.bias)
    return model


def build_model(vision: CLIPVisionModel, tokenizer: PreTrainedTokenizerFast,
                cfg: LanguageConfig = LanguageConfig()) -> LlavaForConditionalGeneration:
    """A LLaVA model around `vision` (its weights kept) with a fresh projector and language model,
    initialised from torch's current random state."""
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
        max_position_embeddings=cfg.max_positions, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision.config, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
        projector_hidden_act="gelu", vision_feature_select_strategy="default",
        vision_feature_layer=cfg.vision_feature_layer, image_seq_length=(IMAGE_SIZE // vision.config.patch_size) ** 2,
    )
    config.pad_token_id = tokenizer.pad_token_id
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(vision.state_dict())
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval()
