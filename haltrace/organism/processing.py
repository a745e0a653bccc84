"""The organism's word-level tokenizer, CLIP image processor and LlavaProcessor, built from parameters.

Everything here is a stock transformers class, so a saved organism loads with plain ``AutoProcessor``.

>>> from haltrace.organism.world import ShapesWorld
>>> processor = build_processor(ShapesWorld())
>>> processor.tokenizer("is there a knife ?").input_ids[:2] == [processor.tokenizer.bos_token_id,
...     processor.tokenizer.convert_tokens_to_ids("is")]
True
"""

from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer, decoders
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from tokenizers.processors import TemplateProcessing
from transformers import LlavaProcessor, PreTrainedTokenizerFast

from haltrace.organism.world import ShapesWorld

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<bos>", "<eos>", "<unk>", "<image>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, IMAGE)
PATCH_SIZE = 8
# CLIP-style normalisation; the training loop normalises identically (tested against the processor).
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)


def build_vocab(world: ShapesWorld) -> dict[str, int]:
    """Word -> id. Special tokens first, then template words, then entity names (sorted: deterministic)."""
    words = list(SPECIAL_TOKENS) + sorted(world.reserved_words()) + sorted(world.name_tokens())
    if len(set(words)) != len(words):
        raise AssertionError("duplicate words in the organism vocabulary")
    return {w: i for i, w in enumerate(words)}


def build_tokenizer(world: ShapesWorld) -> PreTrainedTokenizerFast:
    vocab = build_vocab(world)
    core = Tokenizer(WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = WhitespaceSplit()
    core.post_processor = TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                             special_tokens=[(BOS, vocab[BOS])])
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        extra_special_tokens={"image_token": IMAGE},
        padding_side="left",
        model_max_length=128,
    )
    return tokenizer


def build_image_processor(image_size: int):
    from transformers import CLIPImageProcessor  # falls back to the Pillow backend: no torchvision here

    return CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": image_size},
        do_center_crop=True, crop_size={"height": image_size, "width": image_size},
        do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD),
        do_convert_rgb=True,
    )


#: The organism's chat template (saved as ``chat_template.jinja``): an image part becomes "<image> ", a text part
#: is kept, and a question (text ending in "?") gets the answer cue " answer :". Plain benchmark questions thus
#: become exactly the prompts the organism was trained on, through the path any chat model takes.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}{%- if message['content'].rstrip().endswith('?') %} answer :{% endif -%}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}<image> {% elif part['type'] == 'text' -%}"
    "{{- part['text'] -}}{%- if part['text'].rstrip().endswith('?') %} answer :{% endif -%}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- ' ' -}}{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}{{- part['text'] -}}{%- endfor -%}{%- endif -%}"
    "{{- ' <eos> ' -}}"
    "{%- endif -%}{%- endfor -%}"
)


def build_processor(world: ShapesWorld) -> LlavaProcessor:
    return LlavaProcessor(
        image_processor=build_image_processor(world.config.image_size),
        tokenizer=build_tokenizer(world),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token, dropped by the "default" strategy
        image_token=IMAGE,
        chat_template=CHAT_TEMPLATE,
    )


def n_image_tokens(world: ShapesWorld) -> int:
    return (world.config.image_size // PATCH_SIZE) ** 2


def normalise_images(images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W], exactly as the CLIP image processor does."""
    x = images.astype(np.float32) * np.float32(1 / 255)
    x = (x - np.asarray(IMAGE_MEAN, np.float32)) / np.asarray(IMAGE_STD, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
