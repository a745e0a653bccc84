"""The intervention engine: add, project out, norm-preserving add, and head scaling, at any hook, on chosen
positions, in the prompt phase, the generation phase or both, correct under the KV cache.

Positions are *absolute* token indices of the running sequence. A pre-hook on the top-level model works out,
for every forward, which absolute positions the current tokens occupy (``attention_mask`` length minus the
number of new tokens, i.e. the KV-cache offset), so the same rule means the same tokens in a plain forward, in
``generate()``'s prefill and in each decoding step. The first forward whose offset is 0 defines the prompt
(its length, its last real token per row, its image tokens); later forwards with an offset belong to the
generation phase.

>>> import haltrace
>>> from haltrace.steering import Add, steer
>>> model = haltrace.load("shapes-llava")                                    # doctest: +SKIP
>>> with steer(model, Add("resid_post.2", vector, alpha=4.0, positions="last")):  # doctest: +SKIP
...     model.hf.generate(**inputs, max_new_tokens=8)

Hooks are removed when the block exits, also when it raises.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from haltrace.conventions import HookPoint, parse_hook
from haltrace.models.adapters.base import forward_offset, last_real_token

Phase = Literal["prompt", "generation", "both"]
PositionRule = str | Sequence[int]  # "all" | "last" | "image" | "text" | absolute prompt indices
STEERABLE = ("resid_pre", "resid_post", "attn_out", "mlp_out", "head_out")


def _check_finite(name: str, value: torch.Tensor | float) -> None:
    ok = math.isfinite(value) if isinstance(value, (int, float)) else bool(torch.isfinite(value).all())
    if not ok:
        raise ValueError(f"{name} contains NaN or inf; steering with it would corrupt every output")


@dataclass
class Intervention:
    """Base: where (``hook``), on which tokens (``positions``) and when (``phase``)."""

    hook: str
    positions: PositionRule = field(default="all", kw_only=True)
    phase: Phase = field(default="both", kw_only=True)

    def __post_init__(self) -> None:
        if self.phase not in ("prompt", "generation", "both"):
            raise ValueError(f"phase must be 'prompt', 'generation' or 'both', got {self.phase!r}")
        if isinstance(self.positions, str) and self.positions not in ("all", "last", "image", "text"):
            raise ValueError(f"positions must be 'all', 'last', 'image', 'text' or a list of prompt indices, "
                             f"got {self.positions!r}")

    def point(self, model: Any) -> HookPoint:
        point = parse_hook(self.hook, model.n_layers, vision=model.is_vlm)
        if point.kind not in STEERABLE:
            raise ValueError(f"cannot steer at {point.name!r}: steerable hooks are "
                             f"{', '.join(k + '.<layer>' for k in STEERABLE)}")
        return point

    def width(self, model: Any, point: HookPoint) -> int:
        return model.head_dim if point.kind == "head_out" else model.hidden_size

    def validate(self, model: Any) -> HookPoint:
        return self.point(model)

    def edit(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def _vector(value: Any) -> torch.Tensor:
    return torch.as_tensor(value, dtype=torch.float32).detach().clone()


@dataclass
class Add(Intervention):
    """``x <- x + alpha * vector`` (ActAdd / CAA / ITI-style)."""

    vector: torch.Tensor = field(default=None)  # type: ignore[assignment]
    alpha: float = 1.0
    #: at ``head_out.L`` only: add a ``head_dim`` vector to this head's slice of the o_proj input;
    #: without it the vector must span the whole o_proj input (``n_heads * head_dim``)
    head: int | None = field(default=None, kw_only=True)
    _head_slice: slice | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.vector is None:
            raise ValueError("Add needs a vector")
        self.vector = _vector(self.vector)
        _check_finite("steering vector", self.vector)
        _check_finite("alpha", float(self.alpha))

    def validate(self, model: Any) -> HookPoint:
        point = self.point(model)
        if self.head is not None and point.kind != "head_out":
            raise ValueError(f"head= only applies at head_out.<layer>, not {point.name!r}")
        if point.kind == "head_out" and self.head is not None:
            if not 0 <= self.head < model.n_heads:
                raise ValueError(f"head {self.head} invalid: this model has heads 0..{model.n_heads - 1}")
            expect, what = model.head_dim, "head"
            self._head_slice = slice(self.head * model.head_dim, (self.head + 1) * model.head_dim)
        elif point.kind == "head_out":
            expect, what = model.n_heads * model.head_dim, "o_proj input (n_heads * head_dim)"
        else:
            expect, what = model.hidden_size, "hidden"
        if self.vector.dim() != 1 or self.vector.shape[0] != expect:
            raise ValueError(f"vector for {point.name} has shape {tuple(self.vector.shape)} but the model's "
                             f"{what} size is {expect}: vector size {self.vector.shape[-1]} != model size {expect}")
        return point

    def _delta(self, x: torch.Tensor) -> torch.Tensor:
        """``alpha * vector`` (placed in its head's slice with ``head=``) on x's device and dtype, cached:
        during decoding, rebuilding it costs more than the add itself (bench_steer). The key holds alpha and
        the vector's version counter, so in-place changes are picked up. A vector made under
        ``torch.inference_mode()`` has no version counter: its delta is rebuilt on every call instead."""
        if self.vector.is_inference():
            return self._build_delta(x)
        key = (x.device, x.dtype, x.shape[-1], float(self.alpha), id(self.vector), self.vector._version)
        cache = self.__dict__.setdefault("_delta_cache", {})
        delta = cache.get(key)
        if delta is None:
            delta = self._build_delta(x)
            cache.clear()
            cache[key] = delta
        return delta

    def _build_delta(self, x: torch.Tensor) -> torch.Tensor:
        delta = (self.alpha * self.vector).to(device=x.device, dtype=x.dtype)
        if self._head_slice is None:
            return delta
        full = torch.zeros(x.shape[-1], device=x.device, dtype=x.dtype)
        full[self._head_slice] = delta
        return full

    def edit(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        delta = self._delta(x)
        return x + delta if mask is None else torch.addcmul(x, mask.to(x.dtype), delta)


@dataclass
class NormPreservingAdd(Add):
    """Add, then rescale each token back to its original norm (VTI/VISTA-style shift that keeps scale)."""

    def edit(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        shifted = super().edit(x, mask)
        scale = x.norm(dim=-1, keepdim=True) / shifted.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        return shifted * scale


@dataclass
class Project(Intervention):
    """``x <- x - weight * P x`` with ``P`` the projector onto span(``directions``) (ProjectAway, ablations).

    ``directions`` is ``[d]`` or ``[k, d]``; it is orthonormalised once. ``weight=1`` removes the component.
    """

    directions: torch.Tensor = field(default=None)  # type: ignore[assignment]
    weight: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.directions is None:
            raise ValueError("Project needs directions")
        d = _vector(self.directions)
        d = d.unsqueeze(0) if d.dim() == 1 else d
        _check_finite("projection directions", d)
        _check_finite("weight", float(self.weight))
        if d.dim() != 2 or bool((d.norm(dim=-1) == 0).any()):
            raise ValueError(f"directions must be [d] or [k, d] with non-zero rows, got shape {tuple(d.shape)}")
        q, _ = torch.linalg.qr(d.T)  # orthonormal basis of the span, [d, k]
        self.basis = q.T.contiguous()
        self.directions = d

    def validate(self, model: Any) -> HookPoint:
        point = self.point(model)
        expect = self.width(model, point)
        if self.directions.shape[-1] != expect:
            raise ValueError(f"directions for {point.name} have size {self.directions.shape[-1]} but the model's "
                             f"hidden size is {expect}")
        return point

    def edit(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        basis = self.basis.to(device=x.device, dtype=x.dtype)
        removed = (x @ basis.T) @ basis * self.weight
        return x - removed if mask is None else x - mask.to(x.dtype) * removed


@dataclass
class ScaleHeads(Intervention):
    """Multiply chosen heads' outputs (the input of o_proj) by ``factor`` (VHR-style head reinforcement).

    ``hook`` must be ``head_out.<layer>``.
    """

    heads: Sequence[int] = ()
    factor: float = 1.0
    _n_heads: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_finite("factor", float(self.factor))
        self.heads = [int(h) for h in self.heads]

    def validate(self, model: Any) -> HookPoint:
        point = self.point(model)
        if point.kind != "head_out":
            raise ValueError(f"ScaleHeads works on head_out.<layer>, got {point.name!r}")
        bad = [h for h in self.heads if not 0 <= h < model.n_heads]
        if bad or not self.heads:
            raise ValueError(f"heads {bad or '[]'} invalid: this model has heads 0..{model.n_heads - 1}")
        return point

    def edit(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        # x is [B, T, n_heads * head_dim] here; work on a head view
        batch, seq, width = x.shape
        n_heads = self._n_heads
        scale = torch.ones(n_heads, dtype=x.dtype, device=x.device)
        scale[self.heads] = self.factor
        scaled = (x.view(batch, seq, n_heads, width // n_heads) * scale[:, None]).view(batch, seq, width)
        return scaled if mask is None else torch.where(mask.bool(), scaled, x)


class _SequenceState:
    """Which absolute positions the current forward covers, and the prompt's facts (set on its prefill)."""

    def __init__(self, model: Any):
        self.model = model
        self.offset = 0
        self.length = 0
        self.prompt_length: int | None = None
        self.last_prompt: torch.Tensor | None = None  # [B] absolute index of each row's last real prompt token
        self.image: torch.Tensor | None = None  # [B, prompt_length] bool
        self._masks: dict[tuple, torch.Tensor | None] = {}

    def on_forward(self, _module: Any, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        current = ids if ids is not None else embeds
        if current is None:
            raise RuntimeError("steering needs input_ids or inputs_embeds in the forward call")
        self.length = int(current.shape[1])
        self.offset = forward_offset(kwargs, self.length)
        mask = kwargs.get("attention_mask")
        self._masks.clear()
        if self.offset == 0:  # a new prompt (plain forward, or generate's prefill)
            self.prompt_length = self.length
            if mask is not None and mask.dim() == 2:
                self.last_prompt = last_real_token(mask)
            else:
                self.last_prompt = torch.full((current.shape[0],), self.length - 1, dtype=torch.long)
            self.image = self.model.image_token_mask(ids) if (ids is not None and self.model.is_vlm) else None

    def mask(self, positions: PositionRule, phase: Phase, device: torch.device) -> torch.Tensor | None | bool:
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
        batch = self.last_prompt.shape[0] if self.last_prompt is not None else 1
        phase_mask = {"prompt": in_prompt, "generation": ~in_prompt,
                      "both": torch.ones_like(in_prompt)}[phase].expand(batch, -1)
        if positions == "all":
            sel = torch.ones_like(phase_mask)
        elif positions == "last":
            sel = absolute.unsqueeze(0) == self.last_prompt.to(device).unsqueeze(1)
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


class SteeringHandle:
    """Installed interventions; ``remove()`` takes every hook off (idempotent)."""

    def __init__(self, handles: list[Any]):
        self._handles = handles

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    @property
    def active(self) -> bool:
        return bool(self._handles)


def _refuse_partial(fitted: Any, how: str) -> None:
    """A fit with custom hooks or generate() arguments cannot go in whole as plain engine edits: refuse instead
    of silently dropping them (VTI's vision half, TruthPrInt's gate, DoLa's decoding)."""
    parts = [p for p, present in (("custom hooks", getattr(fitted, "hooks", None) is not None),
                                  ("generate() arguments " + str(sorted(getattr(fitted, "generate_kwargs", {}) or {})),
                                   bool(getattr(fitted, "generate_kwargs", None)))) if present]
    if parts:
        name = getattr(fitted, "method", type(fitted).__name__)
        raise ValueError(f"{how}(model, fitted) cannot install the {name} fit whole: it has {' and '.join(parts)}. "
                         "Use `with fitted.apply(model):` (installs everything) and pass "
                         "`**fitted.generate_kwargs` to generate(), or `fitted.attach(model)`")


def _flatten(interventions: Sequence[Any]) -> list[Intervention]:
    out: list[Intervention] = []
    for item in interventions:
        if isinstance(item, Intervention):
            out.append(item)
        elif hasattr(item, "interventions"):  # e.g. a FittedIntervention
            _refuse_partial(item, "attach")
            out.extend(_flatten(item.interventions))
        elif isinstance(item, (list, tuple)):
            out.extend(_flatten(item))
        else:
            raise TypeError(f"not an intervention: {type(item).__name__}; use Add, Project, NormPreservingAdd, "
                            "ScaleHeads, or a list of them")
    return out


def _module_and_kind(model: Any, point: HookPoint) -> tuple[torch.nn.Module, str]:
    adapter = model.adapter
    i = point.layer
    return {
        "resid_pre": (adapter.layers[i], "pre"),
        "resid_post": (adapter.layers[i], "post"),
        "attn_out": (adapter.attention(i), "post"),
        "mlp_out": (adapter.mlp(i), "post"),
        "head_out": (adapter.o_proj(i), "pre"),
    }[point.kind]


def attach(model: Any, *interventions: Any) -> SteeringHandle:
    """Install interventions on ``model`` and return a handle; prefer the :func:`steer` context manager.

    Everything is validated before any hook is installed, so a bad intervention leaves the model untouched.
    """
    from haltrace.models.base import require_local_weights

    require_local_weights(model, "steering")
    items = _flatten(interventions)
    if not items:
        raise ValueError("no interventions given")
    points = [item.validate(model) for item in items]
    for item in items:
        if isinstance(item, ScaleHeads):
            item._n_heads = model.n_heads
    state = _SequenceState(model)
    handles: list[Any] = []
    try:
        # only position- or phase-restricted edits need to know where each forward sits in the sequence; an
        # every-token edit skips the model-level pre-hook (one hooked call and its bookkeeping per decoding step)
        if any(not _every_token(item) for item in items):
            handles.append(model.hf.register_forward_pre_hook(state.on_forward, with_kwargs=True))
        for item, point in zip(items, points, strict=True):
            module, kind = _module_and_kind(model, point)
            handles.append(_install(module, kind, item, state))
    except BaseException:
        for h in handles:
            h.remove()
        raise
    return SteeringHandle(handles)


def _every_token(item: Intervention) -> bool:
    return item.phase == "both" and isinstance(item.positions, str) and item.positions == "all"


def _install(module: torch.nn.Module, kind: str, item: Intervention, state: _SequenceState) -> Any:
    if type(item) is Add and _every_token(item):
        def apply(x: torch.Tensor) -> torch.Tensor:
            # the common steering vector (an Add on every token of every forward): no mask to look up
            return x + item._delta(x)
    else:
        def apply(x: torch.Tensor) -> torch.Tensor:
            mask = state.mask(item.positions, item.phase, x.device)
            if mask is False:
                return x
            return item.edit(x, mask)

    if kind == "pre":
        def pre(_m: Any, args: tuple, kwargs: dict) -> Any:
            if args:
                return (apply(args[0]), *args[1:]), kwargs
            key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
            return args, {**kwargs, key: apply(kwargs[key])}
        return module.register_forward_pre_hook(pre, with_kwargs=True)

    def post(_m: Any, _args: tuple, output: Any) -> Any:
        if isinstance(output, torch.Tensor):
            return apply(output)
        if isinstance(output, tuple):
            return (apply(output[0]), *output[1:])
        raise TypeError(f"cannot steer a module returning {type(output).__name__}")
    return module.register_forward_hook(post)


@contextmanager
def steer(model: Any, *interventions: Any) -> Iterator[SteeringHandle]:
    """Apply interventions for the duration of the block; every hook is removed on exit, even on error.

    >>> with steer(model, Add("resid_post.1", v, alpha=2.0), Project("resid_post.2", d)):  # doctest: +SKIP
    ...     out = model.hf.generate(**inputs, max_new_tokens=8)
    """
    fits = [i for i in interventions if hasattr(i, "interventions") and hasattr(i, "apply")]
    for fitted in fits:
        if getattr(fitted, "generate_kwargs", None):  # steer() cannot reach generate(): refuse, never drop
            _refuse_partial(fitted, "steer")
    if any(getattr(f, "hooks", None) is not None for f in fits):
        from contextlib import ExitStack

        plain = [i for i in interventions if i not in fits]
        with ExitStack() as stack:
            for fitted in fits:
                stack.enter_context(fitted.apply(model))  # its engine edits and its custom hooks
            handle = attach(model, *plain) if plain else SteeringHandle([])
            stack.callback(handle.remove)
            yield handle
        return
    handle = attach(model, *interventions)
    try:
        yield handle
    finally:
        handle.remove()
