"""Where each forward sits in its sequence: the engine's bookkeeping, shared by every installed intervention.

Positions are *absolute* token indices of the running sequence. A pre-hook on the top-level model works out, for
every forward, which absolute positions the current tokens occupy (``attention_mask`` length minus the number of
new tokens, i.e. the KV-cache offset), so the same rule means the same tokens in a plain forward, in
``generate()``'s prefill and in each decoding step. The first forward whose offset is 0 defines the prompt (its
length, its last real token per row, its image tokens); later forwards with an offset belong to the generation
phase.

The context also carries what context-aware interventions use: ``reads`` (hook outputs recorded during the
current forward), ``prompt_inputs()`` (the new prompt's model inputs, for an intervention's own extra forward
in :meth:`~haltrace.steering.interventions.Intervention.prepare`), ``history`` (every token id fed so far, per
row: a repetition penalty's memory), ``vision_kwargs`` (the vision tower's call arguments, e.g. Qwen2-VL's
``grid_thw``) and ``busy`` (True while an intervention runs its own forward: every hook then passes through).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from haltrace.models.adapters.base import forward_offset, last_real_token

#: forward kwargs that are NOT part of the prompt and its image: the KV cache, and the flags ``generate`` sets
#: for its own step (an extra forward is a plain no-cache forward that returns everything). Every other kwarg
#: is carried: the mask, position ids (Qwen2-VL's M-RoPE ``[4, B, L]``), ``pixel_values`` with whatever the
#: family needs beside it (``image_grid_thw``, ``mm_token_type_ids``, ``token_type_ids``, ``image_sizes``, ...)
#: or, from transformers 5 ``generate``, the precomputed ``mm_encoder_outputs``.
NOT_FORWARDED_KEYS = frozenset({
    "input_ids", "inputs_embeds", "cache", "past_key_values", "use_cache", "cache_position", "logits_to_keep",
    "num_logits_to_keep", "return_dict", "output_attentions", "output_hidden_states", "labels",
})


def image_forward_inputs(ids: torch.Tensor, kwargs: dict) -> dict:
    """Inputs for an extra no-cache forward over the same prompt (and image) as the intercepted call: ``ids``
    plus every model input of ``kwargs`` except the cache and generation flags (:data:`NOT_FORWARDED_KEYS`)."""
    inputs = {"input_ids": ids}
    inputs.update({k: v for k, v in kwargs.items() if k not in NOT_FORWARDED_KEYS and v is not None})
    return inputs


class ForwardContext:
    """Which absolute positions the current forward covers, and the prompt's facts (set on its prefill)."""

    def __init__(self, model: Any, preparers: list[Any] | None = None, *, track_history: bool = False):
        self.model = model
        self.preparers = list(preparers or [])
        # the token history grows by one concat per decoding step: kept only when an edit reads it
        self.track_history = track_history
        self.offset = 0
        self.length = 0
        self.batch = 1
        self.prompt_length: int | None = None
        self.last_prompt: torch.Tensor | None = None  # [B] absolute index of each row's last real prompt token
        self.image: torch.Tensor | None = None  # [B, prompt_length] bool
        self.ids: torch.Tensor | None = None  # the current forward's input ids
        self.kwargs: dict[str, Any] = {}
        self.history: torch.Tensor | None = None  # [B, tokens fed so far]
        self.history_mask: torch.Tensor | None = None  # [B, tokens fed so far] bool: False on padding
        self.reads: dict[str, torch.Tensor] = {}
        self.vision_kwargs: dict[str, Any] = {}
        self.serial = 0  # counts prompts: an intervention caches per-prompt work under it
        self.scratch: dict[Any, Any] = {}  # per-prompt work shared by interventions (see memo), cleared per prompt
        self.busy = False
        self._masks: dict[tuple, torch.Tensor | None | bool] = {}

    # ------------------------------------------------------------------------------------------ hooks
    def on_forward(self, _module: Any, args: tuple, kwargs: dict) -> None:
        if self.busy:  # an intervention's own forward: leave the running prompt's facts alone
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        current = ids if ids is not None else embeds
        if current is None:
            raise RuntimeError("steering needs input_ids or inputs_embeds in the forward call")
        self.batch, self.length = int(current.shape[0]), int(current.shape[1])
        self.offset = forward_offset(kwargs, self.length)
        self.ids, self.kwargs = ids, kwargs
        self.reads.clear()
        self._masks.clear()
        mask = kwargs.get("attention_mask")
        if self.offset == 0:  # a new prompt (plain forward, or generate's prefill)
            self.serial += 1
            self.prompt_length = self.length
            if mask is not None and mask.dim() == 2:
                self.last_prompt = last_real_token(mask)
            else:
                self.last_prompt = torch.full((self.batch,), self.length - 1, dtype=torch.long)
            self.image = self.model.image_token_mask(ids) if (ids is not None and self.model.is_vlm) else None
            if self.track_history and ids is not None:
                self.history = ids
                self.history_mask = (mask.bool() if mask is not None and mask.shape == ids.shape
                                     else torch.ones_like(ids, dtype=torch.bool))
            self.scratch.clear()
            for item in self.preparers:
                with self.paused():
                    item.prepare(self.model, self)
        elif self.track_history and ids is not None and self.history is not None and \
                self.history.shape[0] == ids.shape[0]:
            self.history = torch.cat([self.history, ids.to(self.history.device)], dim=1)
            self.history_mask = torch.cat([self.history_mask, torch.ones_like(ids, dtype=torch.bool).to(
                self.history_mask.device)], dim=1)

    def on_vision(self, _module: Any, args: tuple, kwargs: dict) -> None:
        """Vision-tower pre-hook: keep its call arguments (flat-patch towers take ``grid_thw``)."""
        if not self.busy:
            self.vision_kwargs = {**kwargs, "_args": args}

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Every engine hook passes through inside (an intervention's own forwards)."""
        before = self.busy
        self.busy = True
        try:
            yield
        finally:
            self.busy = before

    def memo(self, key: Any, compute: Any) -> Any:
        """``compute()`` once per prompt under ``key``: several interventions of one method (one per layer)
        share a per-prompt result, e.g. VISTA's steering vectors, without each running the extra forwards."""
        if key not in self.scratch:
            self.scratch[key] = compute()
        return self.scratch[key]

    # ------------------------------------------------------------------------------------------ facts
    @property
    def in_prefill(self) -> bool:
        return self.offset == 0

    def prompt_inputs(self) -> dict[str, Any]:
        """The current prompt's model inputs for an extra no-cache forward (valid inside ``prepare``)."""
        if self.ids is None:
            raise RuntimeError("this intervention needs input_ids in the forward call (not inputs_embeds)")
        return image_forward_inputs(self.ids, self.kwargs)

    def producing(self, device: torch.device | None = None) -> torch.Tensor:
        """``[B]`` index, within the current forward, of the token whose state produces the next token: each
        row's last real prompt token at prefill (right or left padding), the newest token at a decoding step."""
        if self.offset == 0 and self.last_prompt is not None:
            idx = self.last_prompt
        else:
            idx = torch.full((self.batch,), self.length - 1, dtype=torch.long)
        return idx if device is None else idx.to(device)

    def at_producing(self, h: torch.Tensor) -> torch.Tensor:
        """``h[b, producing[b]]`` for a ``[B, T, d]`` state of the current forward."""
        rows = torch.arange(h.shape[0], device=h.device)
        return h[rows, self.producing(h.device)]

    # ------------------------------------------------------------------------------------------ masks
    def mask(self, positions: Any, phase: str, device: torch.device) -> torch.Tensor | None | bool:
        """[B, T, 1] float mask for the current forward, None for "every token", False for "no token"."""
        if phase == "both" and isinstance(positions, str) and positions == "all":
            return None  # the common case: no tensor work, no lookups
        key = (positions if isinstance(positions, str) else tuple(positions), phase)
        if key in self._masks:
            return self._masks[key]
        prompt_len = self.prompt_length if self.prompt_length is not None else self.offset + self.length
        # the current tokens sit at absolute positions offset .. offset+length-1: decide phase membership with
        # ints, so the no-op and every-token cases launch no kernel and never sync
        all_prompt = self.offset + self.length <= prompt_len
        no_prompt = self.offset >= prompt_len
        if (phase == "prompt" and no_prompt) or (phase == "generation" and all_prompt):
            result: torch.Tensor | None | bool = False
        elif positions == "all" and ((phase == "prompt" and all_prompt) or (phase == "generation" and no_prompt)):
            result = None
        else:
            absolute = torch.arange(self.offset, self.offset + self.length, device=device)
            result = self._build(positions, phase, absolute, absolute < prompt_len, prompt_len, device)
        self._masks[key] = result
        return result

    def _build(self, positions, phase, absolute, in_prompt, prompt_len, device) -> torch.Tensor:
        batch = self.last_prompt.shape[0] if self.last_prompt is not None else self.batch
        phase_mask = {"prompt": in_prompt, "generation": ~in_prompt,
                      "both": torch.ones_like(in_prompt)}[phase].expand(batch, -1)
        if positions == "all":
            sel = torch.ones_like(phase_mask)
        elif positions == "last":
            sel = absolute.unsqueeze(0) == self.last_prompt.to(device).unsqueeze(1)
        elif positions == "producing":
            sel = torch.arange(self.length, device=device).unsqueeze(0) == self.producing(device).unsqueeze(1)
        elif positions in ("image", "text"):
            if self.image is None:
                raise ValueError(f"positions={positions!r} needs a vision-language model and input_ids")
            img = torch.zeros(batch, self.length, dtype=torch.bool, device=device)
            inside = absolute < prompt_len
            if bool(inside.any()):
                img[:, inside] = self.image.to(device)[:, absolute[inside]]
            sel = img if positions == "image" else (in_prompt.expand(batch, -1) & ~img) | ~in_prompt
        else:
            idx = torch.tensor([p + prompt_len if p < 0 else p for p in positions], device=device)
            if bool(((idx < 0) | (idx >= prompt_len)).any()):
                raise ValueError(f"steering positions {list(positions)} out of range for a prompt of "
                                 f"{prompt_len} tokens (valid 0..{prompt_len - 1} or negative from the end)")
            sel = (absolute.unsqueeze(1) == idx.unsqueeze(0)).any(1).unsqueeze(0).expand(batch, -1)
        return (sel & phase_mask).unsqueeze(-1)
