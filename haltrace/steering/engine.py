"""The intervention engine: the one runtime every steering method installs through.

An intervention (see :mod:`haltrace.steering.interventions`) says what to do (add, project out, norm-preserving
add, scale heads, a gated edit, a context-aware edit), where (a hook site), on which tokens (``positions``) and
when (the prompt phase, the generation phase or both). :func:`steer` installs any mix of them and of fitted
methods for a ``with`` block; the sequence bookkeeping (:mod:`haltrace.steering.context`) keeps positions correct
under the KV cache, so the same rule means the same tokens in a plain forward, in ``generate()``'s prefill and in
each decoding step.

Sites: ``resid_pre.L`` / ``resid_post.L`` (block input / output), ``attn_out.L``, ``mlp_out.L``, ``head_out.L``
(the o_proj input, viewed per head), ``logits`` (the model's output logits), ``vision_resid_post.K`` /
``vision_mlp_out.K`` (vision-tower block K's output / MLP output).

>>> import haltrace
>>> from haltrace.steering import Add, steer
>>> model = haltrace.load("shapes-llava")                                    # doctest: +SKIP
>>> with steer(model, Add("resid_post.2", vector, alpha=4.0, positions="last")):  # doctest: +SKIP
...     model.hf.generate(**inputs, max_new_tokens=8)

Hooks are removed when the block exits, also when it raises.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from haltrace.conventions import LOGITS_HOOK, HookPoint
from haltrace.models.adapters.base import first_tensor, hidden_states_in, with_hidden_states
from haltrace.steering.context import ForwardContext
from haltrace.steering.interventions import (  # noqa: F401  (the engine's public names)
    POSITION_RULES,
    STEERABLE,
    Add,
    Gated,
    Intervention,
    LinearDetector,
    NormPreservingAdd,
    Phase,
    PositionRule,
    Project,
    ScaleHeads,
    from_state,
    register_state_type,
    to_state,
)

#: kept for callers of the old name
_SequenceState = ForwardContext


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
    """A fit that needs ``generate()`` arguments (a third-party method) cannot go in whole through the engine:
    refuse instead of silently dropping them. Every registered method's fit is engine interventions only."""
    extra = getattr(fitted, "generate_kwargs", None)
    if extra:
        name = getattr(fitted, "method", type(fitted).__name__)
        raise ValueError(f"{how}(model, fitted) cannot install the {name} fit whole: it needs generate() arguments "
                         f"{sorted(extra)}. Use `with fitted.apply(model):` and pass `**fitted.generate_kwargs` to "
                         "generate()")


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
                            "ScaleHeads, Gated, or a list of them")
    return out


def site(model: Any, point: HookPoint) -> tuple[torch.nn.Module, str]:
    """The module to hook for ``point`` and how: ``"pre"`` (edit its first input) or ``"post"`` (its output), from
    the adapter's :meth:`~haltrace.models.adapters.base.Adapter.site` (the same table capture uses);
    ``"logits"`` edits the top-level model's output logits."""
    if point.kind == LOGITS_HOOK:
        return model.hf, "logits"
    where = model.adapter.site(point)
    return where.module, where.kind


# kept for callers of the old name
_module_and_kind = site


def attach(model: Any, *interventions: Any) -> SteeringHandle:
    """Install interventions on ``model`` and return a handle; prefer the :func:`steer` context manager.

    Everything is validated before any hook is installed, so a bad intervention leaves the model untouched.
    Install order: the model-level bookkeeping pre-hook (only when some edit needs positions, reads or a
    per-prompt step), then the read hooks (so a detector sees its site's output before any edit there), then
    the edits in the order given.
    """
    from haltrace.models.base import require_local_weights

    require_local_weights(model, "steering")
    items = _flatten(interventions)
    if not items:
        raise ValueError("no interventions given")
    points = [item.validate(model) for item in items]
    reads: dict[str, HookPoint] = {}
    for item in items:
        for name in item.reads(model):
            reads.setdefault(name, Intervention(name).point(model))
    ctx = ForwardContext(model, [item for item in items if item.prepares],
                         track_history=any(item.uses_history for item in items))
    handles: list[Any] = []
    try:
        # only position-, phase- or context-dependent edits need to know where each forward sits in the
        # sequence; an every-token edit skips the model-level pre-hook (one hooked call per decoding step)
        if reads or ctx.preparers or ctx.track_history or any(not _every_token(item) for item in items):
            handles.append(model.hf.register_forward_pre_hook(ctx.on_forward, with_kwargs=True))
        if any(p.kind.startswith("vision_") for p in points):
            handles.append(model.adapter.vision_tower.register_forward_pre_hook(ctx.on_vision, with_kwargs=True))
        for name, point in reads.items():
            module, kind = site(model, point)
            handles.append(_install_read(module, kind, name, ctx))
        for item, point in zip(items, points, strict=True):
            module, kind = site(model, point)
            handles.append(_install(module, kind, item, ctx))
    except BaseException:
        for h in handles:
            h.remove()
        raise
    return SteeringHandle(handles)


def _every_token(item: Intervention) -> bool:
    return (item.phase == "both" and isinstance(item.positions, str) and item.positions == "all"
            and type(item).edit_at is Intervention.edit_at)


def _install_read(module: torch.nn.Module, kind: str, name: str, ctx: ForwardContext) -> Any:
    if kind == "pre":
        def pre(_m: Any, args: tuple, kwargs: dict) -> None:
            if not ctx.busy:
                ctx.reads[name] = hidden_states_in(args, kwargs)
        return module.register_forward_pre_hook(pre, with_kwargs=True)

    def post(_m: Any, _args: tuple, output: Any) -> None:
        if not ctx.busy:
            ctx.reads[name] = output.logits if kind == "logits" else first_tensor(output)
    return module.register_forward_hook(post)


def _install(module: torch.nn.Module, kind: str, item: Intervention, ctx: ForwardContext) -> Any:
    if type(item) is Add and _every_token(item):
        def apply(x: torch.Tensor) -> torch.Tensor:
            # the common steering vector (an Add on every token of every forward): no mask to look up
            return x if ctx.busy else x + item._delta(x)
    else:
        def apply(x: torch.Tensor) -> torch.Tensor:
            if ctx.busy:
                return x
            mask = ctx.mask(item.positions, item.phase, x.device)
            if mask is False:
                return x
            return item.edit_at(x, mask, ctx)

    if kind == "pre":
        def pre(_m: Any, args: tuple, kwargs: dict) -> Any:
            return with_hidden_states(args, kwargs, apply(hidden_states_in(args, kwargs)))
        return module.register_forward_pre_hook(pre, with_kwargs=True)

    if kind == "logits":
        def on_logits(_m: Any, _args: tuple, output: Any) -> Any:
            output.logits = apply(output.logits)
            return output
        return module.register_forward_hook(on_logits)

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
    for item in interventions:
        if hasattr(item, "interventions"):  # steer() cannot reach generate(): refuse, never drop
            _refuse_partial(item, "steer")
    handle = attach(model, *interventions)
    try:
        yield handle
    finally:
        handle.remove()
