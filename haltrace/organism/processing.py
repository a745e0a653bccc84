"""The organism's word-level tokenizer, image processor and processor, built from parameters, per architecture.

Two architectures (:data:`ARCHES`): ``llava`` (CLIP image processor + ``LlavaProcessor``, the shipped
``shapes-llava``) and ``qwen2_vl`` (Qwen2-VL's patch-flattening image processor, ``<|vision_start|>`` /
``<|vision_end|>`` around the image pads, M-RoPE). Everything saved is a stock transformers class, so a saved
organism loads with plain ``AutoProcessor`` (Qwen2-VL's processor also wants torchvision for its video half).

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
# Qwen2-VL's own special-token spellings; the image pad takes <image>'s place (id 4) in that vocabulary
QWEN_IMAGE, QWEN_VISION_START, QWEN_VISION_END, QWEN_VIDEO = (
    "<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>")
#: Qwen2-VL organism geometry: 4-pixel patches, 2x2 merge, so a 32-pixel image gives 8x8 patches and 16 image
#: tokens, as many as the LLaVA organism's 8-pixel patches
QWEN_PATCH_SIZE, QWEN_MERGE, QWEN_TEMPORAL = 4, 2, 2
ARCHES = ("llava", "qwen2_vl")
# CLIP-style normalisation; the training loop normalises identically (tested against the processor).
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)


def _check_arch(arch: str) -> str:
    if arch not in ARCHES:
        raise ValueError(f"unknown organism architecture {arch!r}; choose one of {ARCHES}")
    return arch


def organism_arch(config) -> str:
    """The organism architecture of an HF config (``llava`` or ``qwen2_vl``), with a clear error otherwise."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHES:
        raise ValueError(f"an organism is a {' or '.join(ARCHES)} model; this config is {model_type!r}")
    return model_type


def special_tokens(arch: str = "llava") -> tuple[str, ...]:
    """The special tokens of an architecture's vocabulary, in id order (``llava``: pad, bos, eos, unk, image)."""
    if _check_arch(arch) == "llava":
        return SPECIAL_TOKENS
    return (PAD, BOS, EOS, UNK, QWEN_IMAGE, QWEN_VISION_START, QWEN_VISION_END, QWEN_VIDEO)


def image_token(arch: str = "llava") -> str:
    return IMAGE if _check_arch(arch) == "llava" else QWEN_IMAGE


def build_vocab(world: ShapesWorld, arch: str = "llava") -> dict[str, int]:
    """Word -> id. Special tokens first, then template words, then entity names (sorted: deterministic)."""
    words = list(special_tokens(arch)) + sorted(world.reserved_words()) + sorted(world.name_tokens())
    if len(set(words)) != len(words):
        raise AssertionError("duplicate words in the organism vocabulary")
    return {w: i for i, w in enumerate(words)}


def build_tokenizer(world: ShapesWorld, arch: str = "llava") -> PreTrainedTokenizerFast:
    vocab = build_vocab(world, arch)
    core = Tokenizer(WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = WhitespaceSplit()
    core.post_processor = TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                             special_tokens=[(BOS, vocab[BOS])])
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        extra_special_tokens=({"image_token": IMAGE} if arch == "llava" else
                              {"image_token": QWEN_IMAGE, "vision_start_token": QWEN_VISION_START,
                               "vision_end_token": QWEN_VISION_END, "video_token": QWEN_VIDEO}),
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


def build_qwen_image_processor(image_size: int):
    """Qwen2-VL's image processor fixed at the organism's size (min = max pixels: no resizing) and geometry."""
    from transformers import Qwen2VLImageProcessorPil  # the Pillow backend: no torchvision here

    return Qwen2VLImageProcessorPil(
        min_pixels=image_size * image_size, max_pixels=image_size * image_size,
        patch_size=QWEN_PATCH_SIZE, merge_size=QWEN_MERGE, temporal_patch_size=QWEN_TEMPORAL,
        image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD), do_convert_rgb=True,
    )


def chat_template(arch: str = "llava") -> str:
    """:data:`CHAT_TEMPLATE` with the architecture's image placeholder."""
    if _check_arch(arch) == "llava":
        return CHAT_TEMPLATE
    return CHAT_TEMPLATE.replace("<image> ", f"{QWEN_VISION_START}{QWEN_IMAGE}{QWEN_VISION_END} ")


def build_processor(world: ShapesWorld, arch: str = "llava"):
    """The organism's processor: a ``LlavaProcessor``. For ``qwen2_vl`` use :func:`save_processor` (transformers
    cannot build a ``Qwen2VLProcessor`` without torchvision, which its video half needs)."""
    if _check_arch(arch) != "llava":
        raise ValueError("build_processor makes the LLaVA organism's processor; Qwen2-VL's is written by "
                         "save_processor (its class needs torchvision to be built in memory)")
    return LlavaProcessor(
        image_processor=build_image_processor(world.config.image_size),
        tokenizer=build_tokenizer(world),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token, dropped by the "default" strategy
        image_token=IMAGE,
        chat_template=CHAT_TEMPLATE,
    )


def save_processor(world: ShapesWorld, folder, arch: str = "llava") -> None:
    """Write the processor files of an organism folder, as ``save_pretrained`` of the stock class would.

    For ``qwen2_vl`` the parts are saved one by one (image processor, tokenizer, chat template) under a
    ``processor_config.json`` naming ``Qwen2VLProcessor``, so ``AutoProcessor`` builds the real class wherever
    torchvision is installed; :func:`haltrace.load` falls back to an images-only processor elsewhere.
    """
    import json
    from pathlib import Path

    if _check_arch(arch) == "llava":
        build_processor(world).save_pretrained(folder)
        return
    folder = Path(folder)
    build_qwen_image_processor(world.config.image_size).save_pretrained(folder)
    build_tokenizer(world, arch).save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(chat_template(arch))
    (folder / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen2VLProcessor"}, indent=2))


def n_image_tokens(world: ShapesWorld, arch: str = "llava") -> int:
    """Image tokens per image in the language model's sequence (16 for both architectures at 32 pixels)."""
    if _check_arch(arch) == "llava":
        return (world.config.image_size // PATCH_SIZE) ** 2
    return (world.config.image_size // (QWEN_PATCH_SIZE * QWEN_MERGE)) ** 2


def normalise_images(images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W], exactly as the CLIP image processor does."""
    x = images.astype(np.float32) * np.float32(1 / 255)
    x = (x - np.asarray(IMAGE_MEAN, np.float32)) / np.asarray(IMAGE_STD, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def qwen_patches(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [N, H, W, 3] -> (``pixel_values`` [N * gh * gw, 3 * 2 * p * p], ``image_grid_thw`` [N, 3]), exactly
    as Qwen2-VL's image processor lays them out (tested): each still image is repeated over the temporal patch,
    and the patches of every 2x2 merge window are consecutive."""
    x = normalise_images(images)  # [N, C, H, W]
    n, c, h, w = x.shape
    p, m, t = QWEN_PATCH_SIZE, QWEN_MERGE, QWEN_TEMPORAL
    gh, gw = h // p, w // p
    x = np.repeat(x[:, None], t, axis=1)  # [N, T, C, H, W]
    x = x.reshape(n, t, c, gh // m, m, p, gw // m, m, p)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # N, gh/m, gw/m, m, m, C, T, p, p
    flat = np.ascontiguousarray(x.reshape(n * gh * gw, c * t * p * p))
    grid = np.tile(np.array([[1, gh, gw]], dtype=np.int64), (n, 1))
    return flat, grid
