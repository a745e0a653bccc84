"""An images-only stand-in for ``Qwen2VLProcessor`` / ``Qwen2_5_VLProcessor``, for machines without torchvision.

Transformers builds Qwen-VL processors only with their video processor, which needs torchvision; without it
:func:`haltrace.load` used to fall back to the tokenizer, so a Qwen-VL model could not take images at all. This
class is what that fallback builds instead, from the checkpoint's own image processor, tokenizer and chat
template: each ``<|image_pad|>`` in a prompt is expanded to the number of merged patches of its image, exactly as
the real processor does, and ``mm_token_type_ids`` (which M-RoPE needs) is returned beside ``input_ids``.

>>> proc = QwenVLImagesProcessor(image_processor, tokenizer, chat_template)      # doctest: +SKIP
>>> proc(text=["<|vision_start|><|image_pad|><|vision_end|>caption :"], images=[img], return_tensors="pt")  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any


class QwenVLImagesProcessor:
    """``image_processor`` (a Qwen2-VL image processor), ``tokenizer`` and an optional ``chat_template``; call it
    like the real processor with ``text`` and ``images`` (no videos)."""

    image_token = "<|image_pad|>"

    def __init__(self, image_processor: Any, tokenizer: Any, chat_template: str | None = None):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)

    def __call__(self, text: str | list[str] | None = None, images: Any = None, **kw: Any) -> Any:
        from transformers import BatchFeature

        if text is None:
            raise ValueError("QwenVLImagesProcessor needs text holding one <|image_pad|> per image")
        text = [text] if isinstance(text, str) else list(text)
        data: dict[str, Any] = {}
        if images is not None:
            pix = self.image_processor(images, return_tensors="pt")
            data.update(pix)
            merge = self.image_processor.merge_size ** 2
            counts = [int(g.prod()) // merge for g in pix["image_grid_thw"]]
            if sum(t.count(self.image_token) for t in text) != len(counts):
                raise ValueError(f"got {len(counts)} images but {sum(t.count(self.image_token) for t in text)} "
                                 f"{self.image_token} placeholders in the prompts; put one in front of each image")
            it = iter(counts)
            text = [p.split(self.image_token)[0] + "".join(self.image_token * next(it) + part
                                                           for part in p.split(self.image_token)[1:])
                    for p in text]
        enc = self.tokenizer(text, **kw)
        data.update(enc)
        ids = enc["input_ids"]
        # M-RoPE needs to know which tokens are image tokens (image 1, video 2, text 0)
        data["mm_token_type_ids"] = ((ids == self.image_token_id).long() if hasattr(ids, "long") else
                                     [[int(t == self.image_token_id) for t in row] for row in ids])
        return BatchFeature(data=data)

    def apply_chat_template(self, conversation: list[dict[str, Any]], **kw: Any) -> Any:
        """The checkpoint's chat template, rendered by the tokenizer (content parts as the real processor gets)."""
        if not self.chat_template:
            raise ValueError("this checkpoint has no chat template; pass the prompt text yourself")
        return self.tokenizer.apply_chat_template(conversation, chat_template=self.chat_template, **kw)

    def batch_decode(self, *args: Any, **kw: Any) -> Any:
        return self.tokenizer.batch_decode(*args, **kw)

    def decode(self, *args: Any, **kw: Any) -> Any:
        return self.tokenizer.decode(*args, **kw)


def load_images_processor(path: Any, **kw: Any) -> QwenVLImagesProcessor:
    """The stand-in for the Qwen-VL checkpoint at ``path`` (image processor, tokenizer, ``chat_template.jinja``)."""
    from pathlib import Path

    from transformers import AutoImageProcessor, AutoTokenizer

    image_processor = AutoImageProcessor.from_pretrained(path, **kw)
    tokenizer = AutoTokenizer.from_pretrained(path, **kw)
    template_file = Path(path) / "chat_template.jinja"
    template = template_file.read_text() if template_file.is_file() else None
    return QwenVLImagesProcessor(image_processor, tokenizer, template)
