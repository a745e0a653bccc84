"""Adapter base class and registry: one adapter per model family maps HF module paths onto haltrace's names.

Adding a family
---------------
Subclass :class:`Adapter` (or :class:`DecoderAdapter` when the model keeps its blocks at
``<decoder>.layers[i].self_attn.o_proj`` / ``.mlp``), and register it for the HF ``config.model_type``::

    @register_adapter("my_arch")
    class MyArchAdapter(DecoderAdapter):
        family = "my_arch"

The module must be imported for the decorator to run; add it to ``haltrace/models/adapters/__init__.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from haltrace.conventions import GLOBAL_HOOKS, VISION_BLOCK_HOOKS, HookPoint, parse_hook

#: HF ``config.model_type`` -> adapter class
ADAPTERS: dict[str, type[Adapter]] = {}


def register_adapter(*model_types: str) -> Callable[[type[Adapter]], type[Adapter]]:
    """Class decorator that registers an adapter for one or more HF ``model_type`` strings.

    >>> @register_adapter("toy")
    ... class ToyAdapter(DecoderAdapter):
    ...     family = "toy"
    >>> "toy" in supported_model_types()
    True
    >>> del ADAPTERS["toy"]
    """

    def wrap(cls: type[Adapter]) -> type[Adapter]:
        for model_type in model_types:
            ADAPTERS[model_type] = cls
        return cls

    return wrap


def supported_model_types() -> list[str]:
    """Sorted HF ``model_type`` strings that have an adapter."""
    return sorted(ADAPTERS)


def adapter_for(hf_model: nn.Module) -> Adapter:
    """The registered adapter for ``hf_model`` (chosen by ``hf_model.config.model_type``).

    Raises ``ValueError`` listing the supported model types when there is none.
    """
    model_type = getattr(getattr(hf_model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"haltrace has no adapter for model type {model_type!r} ({type(hf_model).__name__}). "
            f"Supported model types: {', '.join(supported_model_types())}. To add one, subclass "
            f"haltrace.models.adapters.base.DecoderAdapter (or Adapter), decorate it with "
            f"@register_adapter({model_type!r}) and import it in haltrace/models/adapters/__init__.py."
        )
    return ADAPTERS[model_type](hf_model)


def cached_length(kwargs: dict) -> int:
    """How many tokens the KV cache of a forward call already holds (0: a prefill or a no-cache forward).

    The cache keyword is ``cache`` from transformers 5.2x (``generate`` passes only that name;
    ``past_key_values`` is deprecated) and ``past_key_values`` before; both are read.
    """
    past = kwargs.get("cache")
    if past is None:
        past = kwargs.get("past_key_values")
    return int(past.get_seq_length()) if past is not None and hasattr(past, "get_seq_length") else 0


def forward_offset(kwargs: dict, length: int) -> int:
    """Position of a forward's first token in its sequence (0 for a new prompt), for a forward over
    ``length`` tokens: from a 2-D attention mask when there is one (it spans cache + new tokens), else from the
    KV cache (``generate`` drops an all-ones mask)."""
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return int(mask.shape[1]) - length
    return cached_length(kwargs)


def last_real_token(mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` index of the last 1 in each row of a 2-D attention mask: the last real token, under left or
    right padding."""
    return mask.shape[1] - 1 - torch.flip(mask.to(torch.long), dims=[1]).argmax(dim=1)


def first_tensor(value: Any) -> torch.Tensor:
    """The hidden-state tensor of a module output: the tensor itself, or element 0 of a tuple/ModelOutput.

    transformers 5 decoder layers return a bare tensor; older ones (and attention modules) return tuples.
    """
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return value[0]
    if hasattr(value, "to_tuple"):  # ModelOutput
        return value.to_tuple()[0]
    raise TypeError(f"cannot find a tensor in module output of type {type(value).__name__}")


def hidden_states_in(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a forward-pre hook (``with_kwargs=True``) sees: the first positional argument, else the
    ``hidden_states`` keyword, else the first keyword (a projector's ``image_features``).

    Hugging Face passes them positionally today; the keyword forms keep hooks working when a caller does not.

    >>> x = torch.zeros(1, 2, 4)
    >>> hidden_states_in((x,), {}) is x, hidden_states_in((), {"hidden_states": x, "mask": None}) is x
    (True, True)
    """
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    if not kwargs:
        raise TypeError("the hooked module was called without arguments: no hidden states to read")
    return next(iter(kwargs.values()))


def with_hidden_states(args: tuple, kwargs: dict, value: torch.Tensor) -> tuple[tuple, dict]:
    """``(args, kwargs)`` with the hidden states (where :func:`hidden_states_in` found them) replaced by
    ``value``: what a forward-pre hook returns to edit its module's input. The caller's ``kwargs`` is not changed.

    >>> args, kwargs = with_hidden_states((), {"hidden_states": torch.zeros(2)}, torch.ones(2))
    >>> args, kwargs["hidden_states"].tolist()
    ((), [1.0, 1.0])
    """
    if args:
        return (value, *args[1:]), kwargs
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": value}
    if not kwargs:
        raise TypeError("the hooked module was called without arguments: no hidden states to replace")
    return args, {**kwargs, next(iter(kwargs)): value}


@dataclass(frozen=True)
class Site:
    """Where a hook point sits on the Hugging Face module tree and how to read it (see :meth:`Adapter.site`).

    ``module`` takes a forward-pre hook (``kind="pre"``: the value is its input hidden states,
    :func:`hidden_states_in`) or a forward hook (``kind="post"``: its output, element ``output_index`` of a
    tuple). ``heads`` is ``(n_heads, head_dim)`` where the last dim is viewed per head (``head_out``);
    ``seq_dim`` the token axis of the value (2 for ``attn_pattern``'s ``[B, H, T_query, T_key]``);
    ``per_image`` marks image-level values ``[n_images, n_tokens, d]`` (token positions do not apply). A family
    whose point is not a plain module input or output gives a ``reader(args, kwargs, output) -> tensor`` for a
    ``with_kwargs`` forward hook (Qwen2-VL's vision hooks).
    """

    point: HookPoint
    module: nn.Module
    kind: str  # "pre" | "post"
    heads: tuple[int, int] | None = None
    output_index: int = 0
    seq_dim: int = 1
    per_image: bool = False
    reader: Callable[[tuple, dict, Any], torch.Tensor] | None = field(default=None, compare=False)

    def read(self, args: tuple, kwargs: dict, output: Any = None) -> torch.Tensor:
        """The point's tensor from a hook's arguments (not yet viewed per head: see :meth:`view`)."""
        if self.reader is not None:
            return self.reader(args, kwargs, output)
        if self.kind == "pre":
            return hidden_states_in(args, kwargs)
        if self.output_index == 0:
            return first_tensor(output)
        value = output[self.output_index] if isinstance(output, tuple) and len(output) > self.output_index else None
        if value is None:
            raise RuntimeError(f"{self.point.name}: the {type(self.module).__name__} module returned no weights; "
                               "load the model with attn_implementation=\"eager\"")
        return value

    def view(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with its last dim split into ``heads`` (``head_out``), else ``x`` itself."""
        return x if self.heads is None else x.reshape(*x.shape[:-1], *self.heads)

    def register(self, fn: Callable[[torch.Tensor], Any]) -> Any:
        """Hook :attr:`module` so every forward calls ``fn(value)`` (:meth:`read`'s value); returns the handle."""
        if self.kind == "pre":
            return self.module.register_forward_pre_hook(lambda _m, a, kw: fn(self.read(a, kw)), with_kwargs=True)
        return self.module.register_forward_hook(lambda _m, a, kw, out: fn(self.read(a, kw, out)), with_kwargs=True)


class Adapter:
    """Where a family keeps its blocks, norms and vision parts, plus its dimensions.

    Subclasses set ``family`` and implement the abstract properties. Dimensions are read from the text config.

    >>> from haltrace.models.tiny import build_tiny
    >>> adapter = adapter_for(build_tiny("llama")[0])
    >>> adapter
    LlamaAdapter(family='llama', n_layers=2, d=32)
    >>> adapter.o_proj(0)
    Linear(in_features=32, out_features=32, bias=False)
    """

    family: str = "base"
    # Learned absolute position embeddings (GPT-2): a left-padded row then needs position_ids from its mask,
    # which Hugging Face's forward does not derive (generate does). Rotary families are shift-invariant.
    absolute_positions: bool = False
    # Text around the processor's image placeholder when a prompt is built without a chat template (Qwen2-VL
    # finds its images by the vision-start token, so a bare <|image_pad|> is not enough).
    image_placeholder_wrap: tuple[str, str] = ("", "")
    # How the decoder numbers positions when no position_ids are given: "arange" (0..T-1 per row, what Hugging
    # Face's forward does for every 1-D rotary or absolute scheme), or "mrope" (Qwen2-VL's 3-D M-RoPE, which the
    # model derives itself from the image grid). Backends pin "arange" positions explicitly; never "mrope" ones.
    position_scheme: str = "arange"
    # The processor wants one list of images per prompt (Gemma 3), not one image per prompt.
    nested_images: bool = False
    # TransformerLens' TransformerBridge ``vision_projector.hook_in`` / ``hook_out`` hold exactly haltrace's
    # vision_out / projector_out (checked per family; Gemma 3's hook_in differs).
    tl_vision_hooks_match: bool = False

    def __init__(self, hf_model: nn.Module):
        self.hf = hf_model
        self.config = hf_model.config
        get_text = getattr(self.config, "get_text_config", None)
        self.text_config = get_text() if callable(get_text) else self.config

    # --- modules ---------------------------------------------------------------------------------------
    @property
    def decoder(self) -> nn.Module:
        """The text decoder stack (holds embeddings, blocks and final norm)."""
        raise NotImplementedError

    @property
    def layers(self) -> Sequence[nn.Module]:
        raise NotImplementedError

    @property
    def embed(self) -> nn.Module:
        raise NotImplementedError

    @property
    def final_norm(self) -> nn.Module:
        raise NotImplementedError

    @property
    def unembed(self) -> nn.Module:
        head = self.hf.get_output_embeddings() if hasattr(self.hf, "get_output_embeddings") else None
        if head is None:
            raise ValueError(f"{type(self.hf).__name__} has no LM head (load it with a *ForCausalLM class)")
        return head

    def attention(self, i: int) -> nn.Module:
        raise NotImplementedError

    def o_proj(self, i: int) -> nn.Module:
        raise NotImplementedError

    def mlp(self, i: int) -> nn.Module:
        raise NotImplementedError

    vision_tower: nn.Module | None = None
    projector: nn.Module | None = None

    @property
    def image_token_id(self) -> int | None:
        for key in ("image_token_id", "image_token_index"):
            value = getattr(self.config, key, None)
            if value is not None:
                return int(value)
        return None

    @property
    def is_vlm(self) -> bool:
        return self.vision_tower is not None

    @property
    def vision_blocks(self) -> nn.ModuleList:
        """The vision encoder's blocks: the longest ``ModuleList`` inside the vision tower (CLIP's
        ``encoder.layers``, SigLIP's, Qwen2-VL's ``blocks``), as VTI's official code finds them."""
        if self.vision_tower is None:
            raise ValueError(f"{self.family} has no vision tower")
        lists = [m for m in self.vision_tower.modules() if isinstance(m, nn.ModuleList)]
        if not lists:
            raise ValueError(f"no block list found in the vision tower {type(self.vision_tower).__name__}")
        return max(lists, key=len)

    def vision_mlp(self, k: int) -> nn.Module:
        """The MLP of vision block ``k`` (``mlp``, ``ffn`` or ``feed_forward`` by family)."""
        block = self.vision_blocks[k]
        for name in ("mlp", "ffn", "feed_forward"):
            if hasattr(block, name):
                return getattr(block, name)
        raise ValueError(f"no MLP found in vision block {type(block).__name__}")

    @property
    def vision_hidden_size(self) -> int:
        """Width of the vision tower's token states."""
        vc = getattr(self.config, "vision_config", None)
        for key in ("hidden_size", "embed_dim"):
            if vc is not None and getattr(vc, key, None):
                return int(getattr(vc, key))
        raise ValueError(f"{self.family}: no vision hidden size in the config")

    def patch_grid(self, inputs: Any, n_image_tokens: int, row: int = 0, image_size: tuple[int, int] | None = None,
                   processor: Any = None) -> Any:
        """Where the ``n_image_tokens`` image tokens of row ``row`` sit on the image: a
        :class:`~haltrace.models.grids.PatchGrid` (no views, with a note, for a family without a known grid).
        ``image_size`` is the original ``(width, height)``; ``processor`` the model's processor."""
        from haltrace.models.grids import no_grid

        return no_grid(self.family, n_image_tokens, f"haltrace knows no patch grid for the {self.family} family")

    # --- dimensions ------------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return int(self.text_config.hidden_size)

    @property
    def n_heads(self) -> int:
        return int(self.text_config.num_attention_heads)

    @property
    def n_kv_heads(self) -> int:
        value = getattr(self.text_config, "num_key_value_heads", None)
        return int(value) if value is not None else self.n_heads

    @property
    def head_dim(self) -> int:
        value = getattr(self.text_config, "head_dim", None)
        return int(value) if value else self.hidden_size // self.n_heads

    @property
    def attn_implementation(self) -> str | None:
        """The attention kernel the text decoder runs (``"eager"``, ``"sdpa"``, ...)."""
        impl = getattr(self.text_config, "_attn_implementation", None)
        return impl if impl is not None else getattr(self.config, "_attn_implementation", None)

    # --- vision hooks ----------------------------------------------------------------------------------
    # --- hook sites ------------------------------------------------------------------------------------
    def site(self, point: HookPoint | str) -> Site:
        """The module to hook for ``point``, whether to use a pre- or a post-hook, and how to read the value.

        ``resid_pre.i``/``resid_post.i``: input/output of block ``i``; ``attn_out.i``/``mlp_out.i``: output of
        the attention / MLP module; ``head_out.i``: input of ``o_proj``, viewed as ``[..., n_heads, head_dim]``;
        ``attn_pattern.i``: element 1 of the attention output; ``vision_out``/``projector_out``:
        :meth:`vision_site`; the steering-only ``vision_resid_post.K``/``vision_mlp_out.K``: output of vision
        block ``K`` / of its MLP.

        >>> from haltrace.models.tiny import build_tiny
        >>> adapter = adapter_for(build_tiny("llama")[0])
        >>> s = adapter.site("head_out.1")
        >>> s.module is adapter.o_proj(1), s.kind, s.heads
        (True, 'pre', (4, 8))
        >>> adapter.site("resid_post.0").kind, adapter.site("attn_pattern.0").output_index
        ('post', 1)
        """
        if isinstance(point, str):
            kind = point.partition(".")[0]
            point = (parse_hook(point, kinds=VISION_BLOCK_HOOKS) if kind in VISION_BLOCK_HOOKS
                     else parse_hook(point, self.n_layers, vision=self.is_vlm))
        # cached per point: a capture resolves every hooked layer on every call, and finding a family's modules
        # (get_decoder() ...) costs more than the hook itself on small models (bench_trace)
        cache = self.__dict__.setdefault("_sites", {})
        site = cache.get(point)
        if site is None:
            site = cache[point] = self._build_site(point)
        return site

    def _build_site(self, point: HookPoint) -> Site:
        kind, i = point.kind, point.layer
        if kind == "resid_pre":
            return Site(point, self.layers[i], "pre")
        if kind == "resid_post":
            return Site(point, self.layers[i], "post")
        if kind == "attn_out":
            return Site(point, self.attention(i), "post")
        if kind == "mlp_out":
            return Site(point, self.mlp(i), "post")
        if kind == "head_out":
            return Site(point, self.o_proj(i), "pre", heads=(self.n_heads, self.head_dim))
        if kind == "attn_pattern":
            return Site(point, self.attention(i), "post", output_index=1, seq_dim=2)
        if kind in GLOBAL_HOOKS:
            if not self.is_vlm or self.projector is None:
                raise ValueError(f"{kind!r} needs a vision-language model; {self.family} has no vision tower")
            return self.vision_site(point)
        if kind == "vision_resid_post":
            return Site(point, self.vision_blocks[i], "post")
        if kind == "vision_mlp_out":
            return Site(point, self.vision_mlp(i), "post")
        raise ValueError(f"no hook site for {point.name!r}")

    def vision_site(self, point: HookPoint) -> Site:
        """``vision_out``/``projector_out`` (``[n_images, n_tokens, d]``). Default: the projector's first input /
        its output; a family whose tower works otherwise overrides this (Qwen2-VL)."""
        if point.kind == "vision_out":
            return Site(point, self.projector, "pre", per_image=True)
        if point.kind == "projector_out":
            return Site(point, self.projector, "post", per_image=True)
        raise ValueError(f"unknown vision hook {point.kind!r}")

    @property
    def plain_vision_sites(self) -> bool:
        """Whether the vision hooks are the projector's plain input/output (other engines can read those too)."""
        return type(self).vision_site is Adapter.vision_site

    def register_vision_hook(self, kind: str, sink: Callable[[torch.Tensor], None]) -> list[Any]:
        """Register hooks that call ``sink(tensor[n_images, n_tokens, d])`` for ``vision_out``/``projector_out``
        (at :meth:`site`). Returns the handles."""
        if kind not in GLOBAL_HOOKS:
            raise ValueError(f"unknown vision hook {kind!r}")
        return [self.site(HookPoint(kind)).register(sink)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(family={self.family!r}, n_layers={self.n_layers}, d={self.hidden_size})"


class DecoderAdapter(Adapter):
    """Llama-style layout: ``decoder.embed_tokens``, ``decoder.layers[i].self_attn.o_proj``, ``.mlp``, ``decoder.norm``.

    ``decoder`` is found with ``get_decoder()`` (transformers 5 removed the ``language_model`` shortcut on VLMs).
    """

    @property
    def decoder(self) -> nn.Module:
        # cached: get_decoder() costs ~40 us and every hook lookup goes through here (bench_trace overhead)
        cached = self.__dict__.get("_decoder")
        if cached is not None:
            return cached
        inner = getattr(self.hf, "model", self.hf)
        lm = getattr(inner, "language_model", None)
        if lm is None:
            lm = self.hf.get_decoder() if hasattr(self.hf, "get_decoder") else inner
        self.__dict__["_decoder"] = lm
        return lm

    @property
    def layers(self) -> Sequence[nn.Module]:
        return self.decoder.layers

    @property
    def embed(self) -> nn.Module:
        return self.decoder.embed_tokens

    @property
    def final_norm(self) -> nn.Module:
        return self.decoder.norm

    def attention(self, i: int) -> nn.Module:
        return self.layers[i].self_attn

    def o_proj(self, i: int) -> nn.Module:
        return self.attention(i).o_proj

    def mlp(self, i: int) -> nn.Module:
        return self.layers[i].mlp
