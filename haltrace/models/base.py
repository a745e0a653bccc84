"""``Model``: a Hugging Face model plus its processor/tokenizer and family adapter, with capture helpers.

>>> from haltrace.models import Model
>>> from haltrace.models.tiny import build_tiny
>>> model = Model.from_hf(*build_tiny("gpt2"), name="tiny-gpt2")
>>> model.capture(model.prepare(["a red circle"]), ["resid_post.1"])["resid_post.1"].shape
torch.Size([1, 3, 32])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from haltrace.conventions import valid_hook_names
from haltrace.models.adapters import Adapter, adapter_for
from haltrace.models.weights import has_meta_weights, require_local_weights  # noqa: F401  (re-exported)

if TYPE_CHECKING:
    from PIL.Image import Image

    from haltrace.trace.capture import Capture, PositionSpec


def _is_processor(obj: Any) -> bool:
    # processors wrap a tokenizer and an image processor; tokenizers have neither attribute
    return hasattr(obj, "tokenizer") and hasattr(obj, "image_processor")


class Model:
    """A loaded model: ``hf`` (the HF module), ``processor`` (VLMs) / ``tokenizer``, and its ``adapter``.

    Build one with :func:`haltrace.load` or :meth:`Model.from_hf`.
    """

    def __init__(self, hf: nn.Module, processor: Any = None, tokenizer: Any = None, *, name_or_path: str = "",
                 revision: str | None = None, remote: bool = False, adapter: Adapter | None = None):
        self.hf = hf
        self.adapter = adapter if adapter is not None else adapter_for(hf)
        self.processor = processor
        self.tokenizer = tokenizer if tokenizer is not None else getattr(processor, "tokenizer", None)
        self.name_or_path = name_or_path
        self.revision = revision
        self.remote = remote

    @classmethod
    def from_hf(cls, hf_model: nn.Module, processor_or_tokenizer: Any = None, name: str = "", *,
                revision: str | None = None, remote: bool = False) -> Model:
        """Wrap an in-memory HF model and its processor (VLM) or tokenizer (LLM).

        >>> from haltrace.models.tiny import build_tiny
        >>> model = Model.from_hf(*build_tiny("llava"), name="tiny-llava")
        >>> model.is_vlm, model.n_layers
        (True, 2)
        """
        if _is_processor(processor_or_tokenizer):
            processor, tokenizer = processor_or_tokenizer, processor_or_tokenizer.tokenizer
        else:
            processor, tokenizer = None, processor_or_tokenizer
        name = name or getattr(hf_model.config, "_name_or_path", "") or type(hf_model).__name__
        return cls(hf_model.eval(), processor, tokenizer, name_or_path=name, revision=revision, remote=remote)

    # --- shape facts -----------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self.adapter.n_layers

    @property
    def hidden_size(self) -> int:
        return self.adapter.hidden_size

    @property
    def n_heads(self) -> int:
        return self.adapter.n_heads

    @property
    def head_dim(self) -> int:
        return self.adapter.head_dim

    @property
    def is_vlm(self) -> bool:
        return self.adapter.is_vlm

    @property
    def device(self) -> torch.device:
        """Device of the input embeddings (where inputs must go, also under a ``device_map``); the CPU for a
        ``remote=True`` model (meta weights: nnsight ships CPU inputs to the server)."""
        device = self.adapter.embed.weight.device
        return torch.device("cpu") if device.type == "meta" else device

    @property
    def dtype(self) -> torch.dtype:
        return self.adapter.embed.weight.dtype

    # --- inputs --------------------------------------------------------------------------------------------
    def _family_placeholder(self, prompts: list[str]) -> list[str]:
        """Prompts written with the generic ``<image>`` placeholder get the family's own (e.g. Qwen-VL's
        ``<|vision_start|><|image_pad|><|vision_end|>``) when they hold none of it, so one prompt spelling (the
        organisms' task files, ``<image> caption :``) works on every family."""
        from haltrace.models.prompting import image_placeholder

        own = image_placeholder(self)
        token = getattr(self.processor, "image_token", None) or own
        if not own or own == "<image>" or not isinstance(token, str):
            return prompts
        return [p.replace("<image>", own, 1) if "<image>" in p and token not in p else p for p in prompts]

    def prepare(self, prompts: str | list[str], images: list[Image] | None = None, **kw: Any) -> Any:
        """Tokenise ``prompts`` (with ``images`` for VLMs; one image per prompt) with LEFT padding, on device.

        Prompts must contain the family's image placeholder (e.g. ``"<image>"``; the generic ``<image>`` is
        translated to the family's own spelling when the prompt has none of it); the processor expands it to the
        right number of image tokens. Extra ``kw`` go to the processor/tokenizer.
        For absolute-position families (GPT-2) padded batches also get ``position_ids`` counted from each row's
        first real token, so every row's forward equals that prompt run alone.

        >>> inputs = model.prepare(["<image> what shape ?"], images=[img])
        >>> sorted(inputs)
        ['attention_mask', 'input_ids', 'pixel_values']
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        tok = self.tokenizer
        if tok is None:
            raise ValueError("this Model has no tokenizer; build it with Model.from_hf(hf, tokenizer)")
        if tok.pad_token is None:  # GPT-2 style tokenizers ship without one; batching needs it
            tok.pad_token = tok.eos_token
        kw.setdefault("padding", True)
        kw.setdefault("return_tensors", "pt")
        old_side = tok.padding_side
        tok.padding_side = "left"  # generation and "last" positions assume left padding
        try:
            if images is not None:
                if self.processor is None:
                    raise ValueError(f"{self.name_or_path or 'this model'} has no processor, so it cannot take "
                                     "images; load a VLM with haltrace.load or pass its processor to from_hf")
                if isinstance(images, (list, tuple)) and len(images) != len(prompts):
                    raise ValueError(f"got {len(prompts)} prompts and {len(images)} images; pass one image "
                                     "per prompt")
                prompts = self._family_placeholder(prompts)
                if self.adapter.nested_images:  # e.g. Gemma3Processor wants one list of images per prompt
                    images = [im if isinstance(im, (list, tuple)) else [im] for im in images]
                enc = self.processor(text=prompts, images=images, **kw)
            else:
                enc = tok(prompts, **kw)
        finally:
            tok.padding_side = old_side
        mask = enc.get("attention_mask")
        if self.adapter.absolute_positions and mask is not None and not bool(mask.all()):
            # count positions from each row's first real token, as generate() does, so that a padded row's
            # forward equals the same prompt run alone
            enc["position_ids"] = (mask.long().cumsum(-1) - 1).clamp_min(0)
        return self.to_device(enc)

    def to_device(self, inputs: Any) -> Any:
        """Move every tensor in ``inputs`` to the model device; float tensors (pixels) also to its dtype."""
        for key, value in list(inputs.items()):
            if isinstance(value, torch.Tensor):
                inputs[key] = (value.to(self.device, self.dtype) if value.is_floating_point()
                               else value.to(self.device))
        return inputs

    def image_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``BoolTensor[B, T]``: True where ``input_ids`` holds the image placeholder token (all False for LLMs).

        >>> model.image_token_mask(inputs["input_ids"]).sum(1).tolist()  # 4 image tokens per row
        [4, 4]
        """
        token = self.image_token_id
        if token is None:
            return torch.zeros_like(input_ids, dtype=torch.bool)
        return input_ids == token

    @property
    def image_token_id(self) -> int | None:
        """From the config (the token the model replaces with image features), else from the processor."""
        token = self.adapter.image_token_id
        if token is None and self.processor is not None:
            token = getattr(self.processor, "image_token_id", None)
        return token

    # --- hooks ---------------------------------------------------------------------------------------------
    def valid_hooks(self) -> list[str]:
        """Every hook name this model offers, e.g. ``["resid_pre.0", ..., "projector_out"]``."""
        return valid_hook_names(self.n_layers, vision=self.is_vlm)

    def hooks(self, hooks: Sequence[str] | str, positions: PositionSpec = None,
              inputs: Mapping[str, Any] | None = None, *,
              accumulate: bool = False) -> AbstractContextManager[Capture]:
        """Context manager that fills a :class:`~haltrace.trace.capture.Capture` during every forward inside.

        ``positions`` other than None/Tensor need ``inputs`` to resolve. With ``accumulate=True`` each entry is
        a list with one tensor per forward (e.g. per generated token). Hooks are removed on exit.

        >>> with model.hooks(["resid_post.0"], accumulate=True) as cap:
        ...     _ = model.hf.generate(**inputs, max_new_tokens=2, do_sample=False)
        >>> len(cap["resid_post.0"])  # one tensor per forward: the prompt, then one generated token
        2
        """
        from haltrace.trace import capture as _cap

        require_local_weights(self, "Model.hooks (hooks on the local modules during your own forwards)")
        if positions is None or (isinstance(positions, str) and positions == "all"):
            resolved = None
        elif inputs is not None:
            resolved = _cap.resolve_positions(positions, inputs, self.image_token_mask)
        elif isinstance(positions, torch.Tensor) and positions.dim() == 2:
            resolved = positions.long()
        else:
            raise ValueError("positions other than None or a LongTensor[B, P] need inputs= to be resolved")
        return _cap.hooks(self, hooks, resolved, accumulate=accumulate)

    def capture(self, inputs: Mapping[str, Any], hooks: Sequence[str] | str, positions: PositionSpec = None,
                *, backend: str = "hooks", **forward_kwargs: Any) -> Capture:
        """One no-grad forward; returns ``Capture`` (hook name -> tensor, plus ``.output`` and ``.positions``).

        >>> cap = model.capture(model.prepare("a red circle"), ["resid_post.0"], positions="last")
        >>> cap["resid_post.0"].shape
        torch.Size([1, 1, 32])
        """
        if backend == "hooks" and has_meta_weights(self):  # remote=True: the forward runs on NDIF via nnsight
            backend = "nnsight"
        if backend == "hooks":  # the default: fastest (bench/RESULTS.md), no extra packages, every adapter
            from haltrace.trace.capture import capture

            return capture(self, inputs, hooks, positions, **forward_kwargs)
        from haltrace.trace.backends import capture_with

        return capture_with(self, inputs, hooks, positions, backend=backend, **forward_kwargs)

    def __repr__(self) -> str:
        kind = "VLM" if self.is_vlm else "LLM"
        return (f"Model({self.name_or_path!r}, {kind}, family={self.adapter.family!r}, layers={self.n_layers}, "
                f"d={self.hidden_size}, device={self.device}, dtype={self.dtype})")
