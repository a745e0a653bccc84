"""Tiny random-weight models of every supported family, built offline from config classes (for tests).

Each model has 2 decoder layers and a hidden size of 32, and comes with a small word-level tokenizer (and,
for VLMs, the family's real processor class built from parameters), so nothing is downloaded.

>>> from haltrace.models import Model
>>> hf_model, processor = build_tiny("llava")
>>> model = Model.from_hf(hf_model, processor, name="tiny-llava")
>>> model.capture(build_tiny_inputs("llava", processor), ["projector_out"])["projector_out"].shape
torch.Size([2, 4, 32])
"""

from __future__ import annotations

from typing import Any

import torch

#: families build_tiny knows, in the order tests try them
TINY_FAMILIES: tuple[str, ...] = (
    "llava", "llama", "gpt2", "qwen2_vl", "qwen2_5_vl", "llava_next", "gemma3", "mistral", "qwen2",
)

# a few plain words so prompts like "a red circle" tokenise to something other than <unk>
_WORDS = (
    "a an the is of and to in on what color shape image picture describe caption answer question yes no "
    "red green blue yellow black white circle square triangle star left right top bottom there one two three "
    "user assistant : ? . , hello world paris france capital"
).split()

_SPECIALS = {
    # family -> extra special tokens (image tokens first); ids follow the 4 base specials
    "llava": ["<image>"],
    "llava_next": ["<image>"],
    "qwen2_vl": ["<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>"],
    "qwen2_5_vl": ["<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>"],
    "gemma3": ["<start_of_image>", "<image_soft_token>", "<end_of_image>"],
}

_D, _LAYERS, _HEADS, _KV, _FF = 32, 2, 4, 2, 64


def _tokenizer(family: str):
    """A word-level fast tokenizer with pad/unk/bos/eos, the family's image specials and ``_WORDS``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    base = ["<pad>", "<unk>", "<s>", "</s>"]
    specials = base + _SPECIALS.get(family, [])
    vocab = {tok: i for i, tok in enumerate(specials + list(_WORDS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    extra: dict[str, Any] = {}
    if family == "gemma3":
        # Gemma3Processor reads these attributes off the tokenizer
        extra = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        additional_special_tokens=specials[4:], padding_side="left", model_max_length=512, **extra,
    )
    for key, value in extra.items():  # kept as plain attributes too, whatever the tokenizer did with them
        setattr(tok, key, value)
        setattr(tok, f"{key}_id", tok.convert_tokens_to_ids(value))
    return tok


def _text_kwargs(tok, **over: Any) -> dict[str, Any]:
    kw = dict(vocab_size=len(tok), hidden_size=_D, intermediate_size=_FF, num_hidden_layers=_LAYERS,
              num_attention_heads=_HEADS, num_key_value_heads=_KV, max_position_embeddings=256,
              pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    kw.update(over)
    return kw


def _clip_vision(image_size: int = 28, patch: int = 14):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=_D, intermediate_size=_FF, num_hidden_layers=_LAYERS,
                            num_attention_heads=_HEADS, image_size=image_size, patch_size=patch, projection_dim=_D)


def _clip_image_processor(size: int):
    # the PIL backend: no torchvision needed (CLIPImageProcessor would fall back to it with a warning)
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def _build_llava(tok, attn):
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    image_token_id = tok.convert_tokens_to_ids("<image>")
    cfg = LlavaConfig(vision_config=_clip_vision(28, 14), text_config=LlamaConfig(**_text_kwargs(tok)),
                      image_token_id=image_token_id, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", image_seq_length=4)
    cfg._attn_implementation = attn
    model = LlavaForConditionalGeneration(cfg)
    proc = LlavaProcessor(image_processor=_clip_image_processor(28), tokenizer=tok, patch_size=14,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return model, proc


def _build_llava_next(tok, attn):
    from transformers import LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    cfg = LlavaNextConfig(vision_config=_clip_vision(28, 14), text_config=LlamaConfig(**_text_kwargs(tok)),
                          image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                          vision_feature_select_strategy="default", image_grid_pinpoints=[[28, 28], [28, 56]],
                          image_seq_length=4)
    cfg._attn_implementation = attn
    model = LlavaNextForConditionalGeneration(cfg)
    try:
        from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

        ip = LlavaNextImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                        image_grid_pinpoints=[[28, 28], [28, 56]])
        proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=14,
                                  vision_feature_select_strategy="default", num_additional_image_tokens=1)
    except Exception:  # processor not constructible here: callers use build_tiny_inputs
        proc = tok
    return model, proc


def _qwen_vl(tok, attn, v25: bool):
    import transformers as tf

    ids = {name: tok.convert_tokens_to_ids(t) for name, t in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    # head_dim 8 -> mrope sections must sum to 4
    text = _text_kwargs(tok, rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2],
                                              "rope_theta": 10000.0})
    vision = dict(depth=_LAYERS, embed_dim=_D, hidden_size=_D, num_heads=_HEADS, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)
    if v25:
        vision.update(intermediate_size=_FF, out_hidden_size=_D, fullatt_block_indexes=[1], window_size=56)
        vision.pop("embed_dim")
        cfg = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
        cls = tf.Qwen2_5_VLForConditionalGeneration
    else:
        cfg = tf.Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
        cls = tf.Qwen2VLForConditionalGeneration
    cfg._attn_implementation = attn
    model = cls(cfg)
    # the real Qwen2VLProcessor insists on a video processor, which needs torchvision: use a stand-in
    ip = tf.Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56, patch_size=14,
                                     merge_size=2, temporal_patch_size=2)
    proc = TinyQwenVLProcessor(ip, tok)
    return model, proc


#: the tiny Qwen-VL models use the same images-only processor as haltrace.load's no-torchvision fallback
from haltrace.models.qwen_images import QwenVLImagesProcessor as TinyQwenVLProcessor  # noqa: E402


def _build_gemma3(tok, attn):
    import transformers as tf

    text = tf.Gemma3TextConfig(**_text_kwargs(tok, head_dim=_D // _HEADS, sliding_window=16,
                                              query_pre_attn_scalar=_D // _HEADS))
    vision = tf.SiglipVisionConfig(hidden_size=_D, intermediate_size=_FF, num_hidden_layers=_LAYERS,
                                   num_attention_heads=_HEADS, image_size=28, patch_size=7)
    cfg = tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                          boi_token_id=tok.convert_tokens_to_ids("<start_of_image>"),
                          eoi_token_id=tok.convert_tokens_to_ids("<end_of_image>"),
                          image_token_id=tok.convert_tokens_to_ids("<image_soft_token>"))
    cfg._attn_implementation = attn
    model = tf.Gemma3ForConditionalGeneration(cfg)
    try:
        ip = tf.Gemma3ImageProcessorPil(size={"height": 28, "width": 28})
        proc = tf.Gemma3Processor(image_processor=ip, tokenizer=tok, image_seq_length=4)
    except Exception:
        proc = tok
    return model, proc


def _build_causal(family: str, tok, attn):
    import transformers as tf

    if family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=len(tok), n_embd=_D, n_layer=_LAYERS, n_head=_HEADS, n_positions=256,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id)
        cls = tf.GPT2LMHeadModel
    else:
        cfg_cls, cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
                        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
                        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM)}[family]
        cfg = cfg_cls(**_text_kwargs(tok))
    cfg._attn_implementation = attn
    return cls(cfg), tok


def build_tiny(family: str, seed: int = 0, attn_implementation: str = "eager") -> tuple[Any, Any]:
    """Build a tiny random ``(hf_model, processor_or_tokenizer)`` of ``family`` (see ``TINY_FAMILIES``).

    >>> hf_model, tok = build_tiny("gpt2")
    >>> hf_model.config.n_layer
    2
    """
    if family not in TINY_FAMILIES:
        raise ValueError(f"no tiny builder for {family!r}; known: {', '.join(TINY_FAMILIES)}")
    torch.manual_seed(seed)
    tok = _tokenizer(family)
    if family == "llava":
        model, proc = _build_llava(tok, attn_implementation)
    elif family == "llava_next":
        model, proc = _build_llava_next(tok, attn_implementation)
    elif family in ("qwen2_vl", "qwen2_5_vl"):
        model, proc = _qwen_vl(tok, attn_implementation, v25=family == "qwen2_5_vl")
    elif family == "gemma3":
        model, proc = _build_gemma3(tok, attn_implementation)
    else:
        model, proc = _build_causal(family, tok, attn_implementation)
    return model.eval(), proc


#: a prompt with the family's image placeholder, for ``Model.prepare(prompts, images=...)``
IMAGE_PROMPTS: dict[str, str] = {
    "llava": "<image> describe the image",
    "llava_next": "<image> describe the image",
    "gemma3": "<start_of_image> describe the image",
    "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|> describe the image",
    "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|> describe the image",
}


def build_tiny_inputs(family: str, processor_or_tokenizer: Any, n: int = 2, images: bool = True) -> Any:
    """Ready model inputs for a tiny ``family`` model: ``n`` prompts of different lengths (left padded), with
    one image each for VLMs (``images=False`` for text only). Returns a ``BatchFeature``/``BatchEncoding``.

    >>> hf_model, proc = build_tiny("llava")
    >>> inputs = build_tiny_inputs("llava", proc)
    >>> sorted(inputs)
    ['attention_mask', 'input_ids', 'pixel_values']
    """
    prefixes = ["", "a red ", "the blue green ", "one "]
    vlm = family in IMAGE_PROMPTS and images
    base = IMAGE_PROMPTS[family] if vlm else "what color is the circle"
    prompts = [prefixes[k % len(prefixes)] + base for k in range(n)]
    tok = getattr(processor_or_tokenizer, "tokenizer", processor_or_tokenizer)
    tok.padding_side = "left"
    if not vlm:
        return tok(prompts, return_tensors="pt", padding=True)
    imgs = [tiny_image(k) for k in range(n)]
    if family == "gemma3":
        imgs = [[im] for im in imgs]
    return processor_or_tokenizer(text=prompts, images=imgs, return_tensors="pt", padding=True)


def tiny_image(seed: int = 0, size: int = 28):
    """A small random RGB ``PIL.Image`` for VLM tests."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
