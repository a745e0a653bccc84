"""The engine's intervention types: what an edit does, where, on which tokens, when; how it is saved and
whether it exports as a plain control vector.

Every type is a small class with ``edit`` (or ``edit_at`` when it needs the forward's context) and is registered
by name with :func:`register_state_type`, as SAELens registers architectures: :func:`to_state` /
:func:`from_state` turn any registered object into JSON scalars plus tensors and back (``save_fitted`` writes
them, ``load_fitted`` reads them; a file names a registered type, it never chooses what is imported).

Exportability is decided by the type itself (:meth:`Intervention.export_refusals`) and is closed by
construction: only an object whose type is exactly :class:`Add` can be a llama.cpp control vector; a subclass
that changes what "add" means (VTI's rotation, a norm-preserving add) inherits the refusal.

Beyond the four plain edits (:class:`Add`, :class:`NormPreservingAdd`, :class:`Project`, :class:`ScaleHeads`),
methods that decide per prompt or per token compose the same engine:

* ``positions="producing"``: the token whose state produces the next token (each row's last real prompt
  token at prefill, the newest token at every decoding step);
* :meth:`Intervention.reads`: hook outputs of the current forward the engine records for the edit (a detector's
  features, DoLa's premature layers);
* :meth:`Intervention.prepare`: runs once per new prompt (``generate``'s prefill or a plain forward), may run
  its own forwards (every hook passes through while it does), e.g. ProjectAway's detection pass;
* :class:`Gated` (an edit applied only to the rows a :class:`LinearDetector` flags, TruthPrInt);
* the ``logits`` site (the model's output logits: decoding-side edits) and the vision-tower block sites
  ``vision_resid_post.K`` / ``vision_mlp_out.K``.

>>> import torch
>>> a = Add("resid_post.2", torch.ones(4), alpha=2.0, positions="last")
>>> b = from_state(to_state(a))
>>> type(b).__name__, b.alpha, b.positions
('Add', 2.0, 'last')
>>> a.export_refusals()[0].startswith("Add at resid_post.2 applies only at positions='last'")
True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal

import torch

from haltrace.conventions import LOGITS_HOOK, VISION_BLOCK_HOOKS, HookPoint, parse_hook

Phase = Literal["prompt", "generation", "both"]
PositionRule = str | Sequence[int]  # "all" | "last" | "producing" | "image" | "text" | absolute prompt indices
POSITION_RULES = ("all", "last", "producing", "image", "text")
STEERABLE = ("resid_pre", "resid_post", "attn_out", "mlp_out", "head_out")
RESIDUAL = ("resid_post", "resid_pre")

# ------------------------------------------------------------------------------------------- registry
_STATE_TYPES: dict[str, type] = {}


def register_state_type(cls: type) -> type:
    """Class decorator: let :func:`from_state` rebuild ``cls`` from a saved state (keyed by class name)."""
    name = cls.__name__
    if name in _STATE_TYPES and _STATE_TYPES[name] is not cls:
        raise ValueError(f"intervention type name {name!r} is already registered by {_STATE_TYPES[name]}")
    _STATE_TYPES[name] = cls
    return cls


def state_types() -> list[str]:
    """Registered type names (those :func:`from_state` can rebuild)."""
    return sorted(_STATE_TYPES)


def to_state(obj: Any) -> dict[str, Any]:
    """``{"type": name, ...}``: the object's constructor arguments as JSON scalars, lists and tensors."""
    if type(obj).__name__ not in _STATE_TYPES:
        raise TypeError(f"{type(obj).__name__} is not a registered intervention type; decorate it with "
                        "@register_state_type so that it can be saved and loaded")
    return {"type": type(obj).__name__, **{k: _encode(v) for k, v in obj.to_state().items()}}


def _encode(value: Any) -> Any:
    if type(value).__name__ in _STATE_TYPES and hasattr(value, "to_state"):
        return to_state(value)
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    return value


def from_state(state: dict[str, Any]) -> Any:
    """Rebuild a registered object from :func:`to_state`'s dict; unknown type names list the registered ones."""
    name = state.get("type")
    cls = _STATE_TYPES.get(str(name))
    if cls is None:
        raise ValueError(f"unknown intervention type {name!r}; known types: {', '.join(state_types())}")
    return cls.from_state({k: _decode(v) for k, v in state.items() if k != "type"})


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and str(value.get("type")) in _STATE_TYPES:
        return from_state(value)
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


# ------------------------------------------------------------------------------------------- checks
def check_finite(name: str, value: torch.Tensor | float) -> None:
    """Refuse NaN/inf in a vector or scalar that would otherwise corrupt every output."""
    ok = math.isfinite(value) if isinstance(value, (int, float)) else bool(torch.isfinite(value).all())
    if not ok:
        raise ValueError(f"{name} contains NaN or inf; steering with it would corrupt every output")


def _vector(value: Any) -> torch.Tensor:
    return torch.as_tensor(value, dtype=torch.float32).detach().clone()


def placement_refusals(label: str, positions: Any, phase: str) -> list[str]:
    """Why an add on ``positions`` in ``phase`` is not what llama.cpp does (it adds at every token, while
    reading the prompt and while generating alike); ``label`` names the edit in the messages.

    >>> placement_refusals("phase", "all", "prompt")
    ['phase applies only in the prompt phase; llama.cpp adds a control vector while reading the prompt and while generating alike']
    """
    reasons = []
    if positions != "all":
        reasons.append(f"{label} applies only at positions={positions!r}; llama.cpp adds a control vector at every "
                       "token position (it has no position masks)")
    if phase != "both":
        reasons.append(f"{label} applies only in the {phase} phase; llama.cpp adds a control vector while reading "
                       "the prompt and while generating alike")
    return reasons


# ------------------------------------------------------------------------------------------- base
@dataclass
class Intervention:
    """Base: where (``hook``), on which tokens (``positions``) and when (``phase``).

    Subclasses implement :meth:`edit` (``x -> x'`` on the masked tokens); those that need the current forward's
    context implement :meth:`edit_at` instead, and may declare :meth:`reads` and :meth:`prepare`.
    """

    hook: str
    positions: PositionRule = field(default="all", kw_only=True)
    phase: Phase = field(default="both", kw_only=True)
    #: True when :meth:`prepare` does something (the engine then runs it once per new prompt)
    prepares: ClassVar[bool] = False
    #: True when the edit reads ``ctx.history`` (every token id fed so far; kept only on request)
    uses_history: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.phase not in ("prompt", "generation", "both"):
            raise ValueError(f"phase must be 'prompt', 'generation' or 'both', got {self.phase!r}")
        if isinstance(self.positions, str) and self.positions not in POSITION_RULES:
            raise ValueError(f"positions must be one of {', '.join(repr(p) for p in POSITION_RULES)} or a list of "
                             f"prompt indices, got {self.positions!r}")

    # -- where
    def point(self, model: Any) -> HookPoint:
        return steer_point(self.hook, model)

    def width(self, model: Any, point: HookPoint) -> int:
        return site_width(model, point)

    def validate(self, model: Any) -> HookPoint:
        point = self.point(model)
        if point.kind not in STEERABLE and (self.positions != "all" or self.phase != "both"):
            raise ValueError(f"{type(self).__name__} at {point.name}: token positions and phases apply to the "
                             "language model's sequence; use positions='all', phase='both' there")
        return point

    # -- what
    def edit(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def edit_at(self, x: torch.Tensor, mask: torch.Tensor | None, ctx: Any) -> torch.Tensor:
        """The edit with the forward's context (:class:`haltrace.steering.context.ForwardContext`)."""
        return self.edit(x, mask)

    def reads(self, model: Any) -> tuple[str, ...]:
        """Hook names whose outputs of the current forward the engine records in ``ctx.reads`` (before any
        edit at that site) for :meth:`edit_at`."""
        return ()

    def prepare(self, model: Any, ctx: Any) -> None:
        """Once per new prompt, before its forward: may run forwards of its own (``ctx.prompt_inputs()``)."""

    # -- persistence and export
    def to_state(self) -> dict[str, Any]:
        """Constructor arguments (dataclass init fields) as JSON scalars, lists and tensors."""
        out = {}
        for f in fields(self):
            if f.init:
                value = getattr(self, f.name)
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Intervention:
        return cls(**state)

    def export_refusals(self) -> list[str]:
        """Why this is not a fixed residual add at every token (``[]`` when it is, i.e. a llama.cpp control
        vector can hold it). Only :class:`Add` itself answers ``[]``; every other type refuses by default."""
        return [f"{type(self).__name__} at {self.hook} is not a plain Add (it computes its edit from the "
                "activation or the context); llama.cpp only adds a fixed vector"]

    def describe(self) -> str:
        return f"{type(self).__name__}({self.hook})"


def steer_point(hook: str, model: Any) -> HookPoint:
    """Parse a steering hook: a language-model site (``resid_post.3``...), ``logits`` or a vision-tower block
    site (``vision_mlp_out.K``), validated against ``model``."""
    kind, _, index = hook.partition(".") if isinstance(hook, str) else ("", "", "")
    if hook == LOGITS_HOOK:
        return HookPoint(LOGITS_HOOK)
    if kind in VISION_BLOCK_HOOKS:
        if not model.is_vlm:
            raise ValueError(f"hook {hook!r} needs a vision-language model")
        n = len(model.adapter.vision_blocks)
        return parse_hook(hook, n, kinds=VISION_BLOCK_HOOKS)
    point = parse_hook(hook, model.n_layers, vision=model.is_vlm)
    if point.kind not in STEERABLE:
        raise ValueError(f"cannot steer at {point.name!r}: steerable hooks are "
                         f"{', '.join(k + '.<layer>' for k in STEERABLE)}, {LOGITS_HOOK} and "
                         f"{', '.join(k + '.<vision block>' for k in VISION_BLOCK_HOOKS)}")
    return point


def site_width(model: Any, point: HookPoint) -> int:
    if point.kind == "head_out":
        return model.head_dim
    if point.kind in VISION_BLOCK_HOOKS:
        return int(model.adapter.vision_hidden_size)
    return model.hidden_size


# ------------------------------------------------------------------------------------------- plain edits
@register_state_type
@dataclass
class Add(Intervention):
    """``x <- x + alpha * vector`` (ActAdd / CAA / ITI-style).

    >>> Add("resid_post.1", torch.ones(3), alpha=0.5).edit(torch.zeros(1, 2, 3), None)[0, 0].tolist()
    [0.5, 0.5, 0.5]
    """

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
        check_finite("steering vector", self.vector)
        check_finite("alpha", float(self.alpha))
        self.alpha = float(self.alpha)

    def validate(self, model: Any) -> HookPoint:
        point = super().validate(model)
        if self.head is not None and point.kind != "head_out":
            raise ValueError(f"head= only applies at head_out.<layer>, not {point.name!r}")
        if point.kind == "head_out" and self.head is not None:
            if not 0 <= self.head < model.n_heads:
                raise ValueError(f"head {self.head} invalid: this model has heads 0..{model.n_heads - 1}")
            expect, what = model.head_dim, "head"
            self._head_slice = slice(self.head * model.head_dim, (self.head + 1) * model.head_dim)
        elif point.kind == "head_out":
            expect, what = model.n_heads * model.head_dim, "o_proj input (n_heads * head_dim)"
        elif point.kind == LOGITS_HOOK:
            expect, what = int(model.adapter.unembed.weight.shape[0]), "vocabulary"
        else:
            expect, what = site_width(model, point), "hidden"
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

    def export_refusals(self) -> list[str]:
        if type(self) is not Add:  # a subclass changes what "add" means: it inherits the base refusal
            return Intervention.export_refusals(self)
        kind = str(self.hook).partition(".")[0]
        reasons = []
        if self.head is not None:
            reasons.append(f"Add at {self.hook} with head={self.head} edits one attention head's slice of the "
                           "o_proj input; llama.cpp has no per-head hook")
        elif kind not in RESIDUAL:
            reasons.append(f"Add at {self.hook} edits the {kind} activation inside the block, not the residual "
                           "stream; llama.cpp adds control vectors only to the residual stream at the end of a block "
                           "(fit at resid_post)")
        return reasons + placement_refusals(f"Add at {self.hook}", self.positions, self.phase)

    def describe(self) -> str:
        return f"{type(self).__name__}({self.hook}, alpha={self.alpha})"


@register_state_type
@dataclass
class NormPreservingAdd(Add):
    """Add, then rescale each token back to its original norm (VTI/VISTA-style shift that keeps scale)."""

    def edit(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        shifted = super().edit(x, mask)
        scale = x.norm(dim=-1, keepdim=True) / shifted.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        return shifted * scale

    def export_refusals(self) -> list[str]:
        return [f"NormPreservingAdd at {self.hook} rescales every token back to its own norm after adding, so the "
                "change depends on the activation; llama.cpp only adds a fixed vector"]


@register_state_type
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
        check_finite("projection directions", d)
        check_finite("weight", float(self.weight))
        if d.dim() != 2 or bool((d.norm(dim=-1) == 0).any()):
            raise ValueError(f"directions must be [d] or [k, d] with non-zero rows, got shape {tuple(d.shape)}")
        q, _ = torch.linalg.qr(d.T)  # orthonormal basis of the span, [d, k]
        self.basis = q.T.contiguous()
        self.directions = d
        self.weight = float(self.weight)

    def validate(self, model: Any) -> HookPoint:
        point = super().validate(model)
        expect = self.width(model, point)
        if self.directions.shape[-1] != expect:
            raise ValueError(f"directions for {point.name} have size {self.directions.shape[-1]} but the model's "
                             f"hidden size is {expect}")
        return point

    def edit(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        basis = self.basis.to(device=x.device, dtype=x.dtype)
        removed = (x @ basis.T) @ basis * self.weight
        return x - removed if mask is None else x - mask.to(x.dtype) * removed

    def export_refusals(self) -> list[str]:
        return [f"Project at {self.hook} removes each token's component along {tuple(self.directions.shape)[0]} "
                "direction(s) (x - w·Px), which depends on the activation; llama.cpp only adds a fixed vector"]


@register_state_type
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
        check_finite("factor", float(self.factor))
        self.heads = [int(h) for h in self.heads]
        self.factor = float(self.factor)

    def validate(self, model: Any) -> HookPoint:
        point = super().validate(model)
        if point.kind != "head_out":
            raise ValueError(f"ScaleHeads works on head_out.<layer>, got {point.name!r}")
        bad = [h for h in self.heads if not 0 <= h < model.n_heads]
        if bad or not self.heads:
            raise ValueError(f"heads {bad or '[]'} invalid: this model has heads 0..{model.n_heads - 1}")
        self._n_heads = model.n_heads
        return point

    def edit(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        # x is [B, T, n_heads * head_dim] here; work on a head view
        batch, seq, width = x.shape
        n_heads = self._n_heads
        scale = torch.ones(n_heads, dtype=x.dtype, device=x.device)
        scale[self.heads] = self.factor
        scaled = (x.view(batch, seq, n_heads, width // n_heads) * scale[:, None]).view(batch, seq, width)
        return scaled if mask is None else torch.where(mask.bool(), scaled, x)

    def export_refusals(self) -> list[str]:
        return [f"ScaleHeads at {self.hook} multiplies attention heads {list(self.heads)} by {self.factor} inside "
                "attention; llama.cpp control vectors only add to the residual stream after a block, never to heads"]


# ------------------------------------------------------------------------------------------- gating
@register_state_type
class LinearDetector:
    """A logistic detector on the producing token's ``resid_post`` states of ``layers`` (concatenated in order):
    ``p = sigmoid(((h - mean) / scale) . weight + bias)``; a row fires where ``p > threshold``.

    ``stats`` counts scored rows (``steps``) and firings (``fired``) since :meth:`reset`.

    >>> det = LinearDetector([1], torch.zeros(2), torch.ones(2), torch.tensor([1.0, 0.0]), 0.0, threshold=0.5)
    >>> [round(p, 2) for p in det.probability(torch.tensor([[2.0, 0.0], [-2.0, 0.0]])).tolist()]
    [0.88, 0.12]
    """

    def __init__(self, layers: int | Sequence[int], mean: Any, scale: Any, weight: Any, bias: float, *,
                 threshold: float):
        self.layers = [int(layers)] if isinstance(layers, int) else [int(x) for x in layers]
        if not self.layers or sorted(set(self.layers)) != self.layers:
            raise ValueError(f"detector layers must be a non-empty increasing list, got {layers}")
        self.mean, self.scale, self.weight = (torch.as_tensor(t, dtype=torch.float32).reshape(-1).clone()
                                              for t in (mean, scale, weight))
        sizes = {"mean": self.mean.numel(), "scale": self.scale.numel(), "weight": self.weight.numel()}
        if len(set(sizes.values())) != 1 or self.weight.numel() % len(self.layers):
            raise ValueError(f"mean/scale/weight must have len(layers) * hidden size values, got {sizes}")
        if not all(bool(torch.isfinite(t).all()) for t in (self.mean, self.scale, self.weight)):
            raise ValueError("detector parameters contain NaN or inf")
        if bool((self.scale <= 0).any()):
            raise ValueError("scale must be positive (a standard deviation per feature)")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold is a probability in [0, 1], got {threshold}")
        self.bias, self.threshold = float(bias), float(threshold)
        self.stats = {"steps": 0, "fired": 0}

    def to_state(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "mean": self.mean, "scale": self.scale, "weight": self.weight,
                "bias": self.bias, "threshold": self.threshold}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> LinearDetector:
        state = dict(state)
        return cls(state.pop("layers"), state.pop("mean"), state.pop("scale"), state.pop("weight"),
                   state.pop("bias"), **state)

    def validate(self, model: Any) -> None:
        bad = [x for x in self.layers if not 0 <= x < model.n_layers]
        if bad:
            raise ValueError(f"detector layers {bad} out of range: the model has layers 0..{model.n_layers - 1}")
        if self.weight.numel() != len(self.layers) * model.hidden_size:
            raise ValueError(f"detector width {self.weight.numel()} != {len(self.layers)} layers x hidden size "
                             f"{model.hidden_size}")

    def reads(self) -> tuple[str, ...]:
        return tuple(f"resid_post.{x}" for x in self.layers)

    def probability(self, h: torch.Tensor) -> torch.Tensor:
        """Probability that the token produced from features ``h`` ([..., len(layers)*d]) is flagged."""
        z = ((h.float() - self.mean.to(h.device)) / self.scale.to(h.device)) @ self.weight.to(h.device)
        return torch.sigmoid(z + self.bias)

    def fire(self, ctx: Any) -> torch.Tensor:
        """``[B]`` bool: rows whose producing token the detector flags in the current forward."""
        feats = torch.cat([ctx.at_producing(ctx.reads[name]) for name in self.reads()], dim=-1)
        fired = self.probability(feats) > self.threshold
        self.stats["steps"] += int(fired.shape[0])
        self.stats["fired"] += int(fired.sum())
        return fired

    def reset(self) -> None:
        self.stats = {"steps": 0, "fired": 0}


@register_state_type
class Gated(Intervention):
    """``inner`` applied only to the rows whose ``detector`` fires in the current forward (TruthPrInt-style
    truthful-guided intervention); ``inner``'s hook, positions and phase apply.

    >>> det = LinearDetector([1], torch.zeros(3), torch.ones(3), torch.ones(3), 0.0, threshold=0.5)
    >>> gate = Gated(Add("resid_post.1", torch.ones(3), positions="producing"), det)
    >>> gate.hook, gate.positions
    ('resid_post.1', 'producing')
    """

    def __init__(self, inner: Intervention, detector: Any):
        if not isinstance(inner, Intervention):
            raise TypeError(f"Gated needs an engine intervention to gate, got {type(inner).__name__}")
        self.inner, self.detector = inner, detector
        self.hook, self.positions, self.phase = inner.hook, inner.positions, inner.phase
        # the gated edit's own per-prompt step and token history, if it has them
        self.prepares, self.uses_history = inner.prepares, inner.uses_history  # type: ignore[misc]

    def prepare(self, model: Any, ctx: Any) -> None:
        self.inner.prepare(model, ctx)

    def to_state(self) -> dict[str, Any]:
        return {"inner": self.inner, "detector": self.detector}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Gated:
        return cls(state["inner"], state["detector"])

    def validate(self, model: Any) -> HookPoint:
        self.detector.validate(model)
        return self.inner.validate(model)

    def reads(self, model: Any) -> tuple[str, ...]:
        return tuple(self.detector.reads()) + tuple(self.inner.reads(model))

    def edit_at(self, x: torch.Tensor, mask: torch.Tensor | None, ctx: Any) -> torch.Tensor:
        fired = self.detector.fire(ctx).to(x.device)
        if not bool(fired.any()):
            return x
        rows = fired.view(-1, 1, 1).to(x.dtype)
        return self.inner.edit_at(x, rows if mask is None else mask.to(x.dtype) * rows, ctx)

    def describe(self) -> str:
        return f"Gated({self.inner.describe()})"

    def __repr__(self) -> str:
        return f"Gated(inner={self.inner!r}, detector={type(self.detector).__name__}{self.detector.layers})"
