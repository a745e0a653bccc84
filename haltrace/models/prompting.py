"""Turn a plain question into the prompt a model expects: its chat template, or a user's ``{question}`` template.

Public benchmark files hold plain questions ("Is there a dog in the image?"); how they are wrapped is a
property of the model, not of the file. With a chat template (LLaVA-1.5-hf: ``USER: <image>\\n... ASSISTANT:``;
Qwen2-VL: ``<|im_start|>user<|vision_start|><|image_pad|>...``) the question goes in one user turn, image part
first, with the generation prompt added. ``template`` overrides it: ``"{question}"`` is replaced, and for a
VLM the image placeholder is put in front unless the template already holds ``{image}`` (replaced by the
placeholder) or the placeholder itself.

>>> from haltrace.models.tiny import build_tiny
>>> from haltrace.models import Model
>>> model = Model.from_hf(*build_tiny("gpt2"), name="tiny-gpt2")
>>> build_prompt(model, "is the sky blue ?", template="Q: {question} A:")
'Q: is the sky blue ? A:'
"""

from __future__ import annotations

from typing import Any


def image_placeholder(model: Any) -> str | None:
    """The text a VLM's processor expands into image tokens (``<image>``, Gemma 3's ``<start_of_image>``, ...)."""
    proc = getattr(model, "processor", None)
    tok = getattr(model, "tokenizer", None)
    candidates = [getattr(proc, "boi_token", None), getattr(proc, "image_token", None),
                  getattr(tok, "image_token", None)]
    token = next((t for t in candidates if isinstance(t, str) and t), None)
    if token is None:
        return None
    before, after = getattr(model.adapter, "image_placeholder_wrap", ("", ""))
    return f"{before}{token}{after}"


def _chat_template_owner(model: Any) -> Any:
    for owner in (getattr(model, "processor", None), getattr(model, "tokenizer", None)):
        if owner is not None and getattr(owner, "chat_template", None):
            return owner
    return None


def prompt_style(model: Any, template: str | None = None) -> str:
    """Which rule :func:`build_prompt` uses: ``"template"``, ``"chat_template"`` or ``"plain"`` (recorded
    with every answer file)."""
    if template is not None:
        return "template"
    return "chat_template" if _chat_template_owner(model) is not None else "plain"


def build_prompt(model: Any, question: str, *, image: bool = False, template: str | None = None) -> str:
    """The prompt for ``question`` (with one image when ``image``), as text for ``model.prepare``."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"empty question {question!r}: every item needs a non-empty question")
    placeholder = image_placeholder(model) if image else None
    if image and model.is_vlm and placeholder is None:
        raise ValueError(f"{model.name_or_path}: cannot tell this processor's image placeholder; pass a "
                         "--prompt-template holding the placeholder (e.g. '<image>\\n{question}')")
    if template is not None:
        if "{question}" not in template:
            raise ValueError(f"--prompt-template {template!r} has no {{question}} field")
        text = template.replace("{question}", question)
        if placeholder is not None:
            if "{image}" in text:
                text = text.replace("{image}", placeholder)
            elif placeholder not in text:
                text = f"{placeholder}\n{text}"
        return text
    owner = _chat_template_owner(model)
    if owner is None:  # a base model without a chat template: the question as it is
        return f"{placeholder} {question}" if placeholder is not None else question
    content: list[dict[str, str]] = ([{"type": "image"}] if image else []) + [{"type": "text", "text": question}]
    if owner is getattr(model, "processor", None):
        return owner.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
    # a tokenizer's template takes plain string content; the placeholder goes in front
    text = f"{placeholder}\n{question}" if placeholder is not None else question
    return owner.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                     tokenize=False)
