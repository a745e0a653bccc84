"""Trace generation: per generated token, the activations of the forward that produced it.

Inside ``model.hf.generate`` the first forward (prefill) runs over the whole prompt and every later one over a
single new token (KV cache). Generated token ``t`` is predicted at the LAST position of forward ``t``, so that
is where each hook is read: ``activations[hook][:, t]`` equals a fresh no-cache forward over
``prompt + generated[:t]`` at its last position. Hooks are removed when the call returns or raises.

>>> from haltrace.models import Model
>>> from haltrace.models.tiny import build_tiny, build_tiny_inputs
>>> model = Model.from_hf(*build_tiny("llava"))
>>> tr = trace_generation(model, build_tiny_inputs("llava", model.processor), ["resid_post.1"],
...                       max_new_tokens=3, attention_to_image=True)
>>> tr.activations["resid_post.1"].shape, tr.image_attention.shape   # [B, n_new, d], [B, n_new, L, H]
(torch.Size([2, 3, 32]), torch.Size([2, 3, 2, 4]))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from haltrace.conventions import GLOBAL_HOOKS
from haltrace.trace.attention import ImageAttentionRecorder, require_eager

if TYPE_CHECKING:
    from haltrace.models.base import Model


@dataclass
class GenerationTrace:
    """What :func:`trace_generation` recorded.

    ``sequences[B, T0 + n_new]``: prompt and generated ids; ``tokens[B, n_new]``: generated ids only;
    ``text``: decoded generated text per row (special tokens skipped); ``lengths[B]``: generated tokens up to
    and including the first EOS (later positions of a finished row are padding and their activations are
    meaningless); ``activations[hook]``: ``[B, n_new, ...]`` read at the predicting position;
    ``vision[hook]``: ``vision_out`` / ``projector_out`` from the prefill; ``image_attention``:
    ``[B, n_new, L, H]`` attention mass of each predicting position on image tokens (or ``None``).
    """

    sequences: torch.Tensor
    prompt_length: int
    tokens: torch.Tensor
    text: list[str]
    lengths: torch.Tensor
    activations: dict[str, torch.Tensor] = field(default_factory=dict)
    vision: dict[str, torch.Tensor] = field(default_factory=dict)
    image_attention: torch.Tensor | None = None
    attention_layers: list[int] | None = None

    @property
    def n_new(self) -> int:
        return int(self.tokens.shape[1])

    def token_strings(self, tokenizer: Any, row: int = 0) -> list[str]:
        """The generated tokens of one row as strings (up to ``lengths[row]``)."""
        return tokenizer.convert_ids_to_tokens(self.tokens[row, : int(self.lengths[row])].tolist())


def _eos_ids(model: Model, generate_kwargs: Mapping[str, Any]) -> set[int]:
    eos = generate_kwargs.get("eos_token_id")
    if eos is None:
        eos = getattr(getattr(model.hf, "generation_config", None), "eos_token_id", None)
    if eos is None and model.tokenizer is not None:
        eos = model.tokenizer.eos_token_id
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def trace_generation(
    model: Model,
    inputs: Mapping[str, Any],
    hooks: Sequence[str] = (),
    *,
    max_new_tokens: int = 32,
    attention_to_image: bool = False,
    attention_layers: Sequence[int] | None = None,
    **generate_kwargs: Any,
) -> GenerationTrace:
    """Run ``model.hf.generate`` (greedy unless ``generate_kwargs`` say otherwise) and record, per new token,
    the ``hooks`` at the predicting position and (``attention_to_image=True``, eager attention only) the
    attention-to-image ratio of every layer and head.

    ``attn_pattern`` hooks are refused (their key length grows each step); use ``attention_to_image``.

    >>> tr = trace_generation(model, model.prepare(["<image> caption :"], images=[img]),
    ...                       ["resid_post.1"], max_new_tokens=4, attention_to_image=True)
    >>> tr.activations["resid_post.1"].shape, tr.image_attention.shape
    (torch.Size([1, 4, 32]), torch.Size([1, 4, 2, 4]))
    """
    from haltrace.models.base import require_local_weights
    from haltrace.trace.capture import parse_hooks

    require_local_weights(model, "trace_generation (generate() runs here)")

    points = parse_hooks(model, list(hooks))
    if any(p.kind == "attn_pattern" for p in points):
        raise ValueError("attn_pattern cannot be stacked over generation steps (the key length grows); use "
                         "attention_to_image=True for the image-attention ratio, or capture() on a fixed prefix")
    ids = inputs.get("input_ids")
    if ids is None:
        raise ValueError("trace_generation needs input_ids")
    if attention_to_image:
        require_eager(model)
    prompt_length = int(ids.shape[1])
    gen_kwargs: dict[str, Any] = {"do_sample": False, "max_new_tokens": max_new_tokens}
    if model.tokenizer is not None and model.tokenizer.pad_token_id is not None:
        gen_kwargs["pad_token_id"] = model.tokenizer.pad_token_id
    gen_kwargs.update(generate_kwargs)
    for key in ("return_dict_in_generate", "output_attentions", "output_hidden_states"):
        gen_kwargs.pop(key, None)  # we read everything through hooks; HF's copies would only cost memory

    recorder = None
    with ExitStack() as stack, torch.no_grad():
        cap = stack.enter_context(model.hooks([p.name for p in points], accumulate=True)) if points else {}
        if attention_to_image:
            image_mask = model.image_token_mask(ids)
            if not bool(image_mask.any()):
                raise ValueError("attention_to_image=True but the prompt holds no image tokens")
            recorder = stack.enter_context(ImageAttentionRecorder(model, image_mask, attention_layers).attached())
        sequences = model.hf.generate(**inputs, **gen_kwargs)
    if not isinstance(sequences, torch.Tensor):  # a caller's return_dict-like override
        sequences = sequences.sequences

    tokens = sequences[:, prompt_length:]
    n_new = int(tokens.shape[1])
    activations: dict[str, torch.Tensor] = {}
    vision: dict[str, torch.Tensor] = {}
    for point in points:
        steps = cap[point.name]
        if point.kind in GLOBAL_HOOKS:
            vision[point.name] = steps[0]  # the image is encoded once, in the prefill
            continue
        if len(steps) < n_new:
            raise RuntimeError(f"{point.name} fired {len(steps)} times for {n_new} generated tokens")
        # the query that predicts token t is the last position of forward t
        activations[point.name] = torch.stack([x[:, -1] for x in steps[:n_new]], dim=1)
    image_attention = None
    if recorder is not None:
        image_attention = recorder.stacked()[:, :n_new]

    eos = _eos_ids(model, gen_kwargs)
    is_eos = torch.zeros_like(tokens, dtype=torch.bool)
    for e in eos:
        is_eos |= tokens == e
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, torch.full_like(tokens[:, 0], n_new))
    text = []
    if model.tokenizer is not None:
        text = [model.tokenizer.decode(tokens[b, : int(first[b])], skip_special_tokens=True)
                for b in range(tokens.shape[0])]
    return GenerationTrace(sequences=sequences, prompt_length=prompt_length, tokens=tokens, text=text,
                           lengths=first, activations=activations, vision=vision, image_attention=image_attention,
                           attention_layers=None if recorder is None else recorder.layers)

