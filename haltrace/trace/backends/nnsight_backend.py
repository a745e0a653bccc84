"""Capture with nnsight 0.8: trace the HF module, read each hook's module envoy, ``.save()`` the values.

Hook names map onto envoys of the modules the family adapter names (so any family with an adapter works):

==================  ============================================================
haltrace name       envoy value
==================  ============================================================
``resid_pre.i``     ``layers[i].input``
``resid_post.i``    ``layers[i].output``
``attn_out.i``      ``layers[i].<attention>.output[0]``
``attn_pattern.i``  ``layers[i].<attention>.output[1]`` (eager attention only)
``mlp_out.i``       ``layers[i].<mlp>.output``
``head_out.i``      ``<o_proj>.input`` reshaped to ``[..., n_heads, head_dim]``
``vision_out``      ``<projector>.input`` (families with the default projector hooks)
``projector_out``   ``<projector>.output``
==================  ============================================================

Positions are selected *inside* the trace, so a remote run ships back only the rows asked for.

Remote execution
----------------
``remote`` (default ``model.remote``): falsy runs locally on ``NNsight(model.hf)``; ``"local"`` wraps the
in-memory model in nnsight's ``HuggingFaceModel`` and runs nnsight's remote path in-process (the trace is
serialized and deserialized with haltrace's modules hidden, exactly as NDIF would receive it); ``True`` (or a
host URL) builds ``TransformersModel(model.name_or_path, revision=...)`` on the meta device and sends the
trace to NDIF, which must host that checkpoint.

.. warning::
   nnsight returns remote results with ``torch.load(weights_only=False)``, i.e. by unpickling what the
   server sent. Only use ``remote=True`` with a server you trust.

.. note::
   Wrapping a module with nnsight replaces every submodule's ``forward`` with an nnsight controller (inert
   outside a trace, but it stays). Wrappers are built once per model and reused.

>>> from haltrace.models import Model
>>> from haltrace.models.tiny import build_tiny, build_tiny_inputs
>>> hf, tok = build_tiny("llama")
>>> model = Model.from_hf(hf, tok)
>>> capture_nnsight(model, build_tiny_inputs("llama", tok), ["head_out.0"], "last")["head_out.0"].shape
torch.Size([2, 1, 4, 8])
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from haltrace._optional import require
from haltrace.trace.backends.common import check_supported, check_vision_inputs, default_position_ids
from haltrace.trace.capture import Capture, parse_hooks, resolve_positions

if TYPE_CHECKING:
    from haltrace.conventions import HookPoint
    from haltrace.models.base import Model
    from haltrace.trace.capture import PositionSpec

# Model -> {wrapper kind -> nnsight envoy}. Keyed by the Model, not its module: a wrapper holds the module,
# so a module key would keep itself alive through its own value and never be freed
_WRAPPERS: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()

# order in which a block's modules run: nnsight 0.8 refuses to read a value the forward already passed
_STAGE = {"resid_pre": 0, "head_out": 1, "attn_out": 2, "attn_pattern": 2, "mlp_out": 3, "resid_post": 4}


def _nnsight(module: str = "nnsight") -> Any:
    """The optional nnsight package (or one of its modules); names ``haltrace[nnsight]`` when it is missing."""
    return require(module, extra="nnsight", feature="the nnsight backend")


def wrapper_for(model: Model, remote: bool | str | None = None) -> Any:
    """The nnsight envoy tracing ``model.hf`` (cached): ``NNsight`` locally, a remotable wrapper otherwise.

    >>> env = wrapper_for(model)
    >>> wrapper_for(model) is env, type(env.get("model.language_model.layers.0")._module).__name__
    (True, 'LlamaDecoderLayer')
    """
    kind = "ndif" if remote is True or (isinstance(remote, str) and remote != "local") else (
        "local-remote" if remote == "local" else "local")
    per_model = _WRAPPERS.setdefault(model, {})
    if per_model.get("_hf") is not model.hf:  # model.hf was swapped: old wrappers trace the wrong module
        per_model.clear()
        per_model["_hf"] = model.hf
    if kind not in per_model:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # nnsight deprecation chatter
            if kind == "local":
                per_model[kind] = _nnsight().NNsight(model.hf)
            elif kind == "local-remote":
                # Remotable wrapper around the in-memory module; inputs go straight to the module (no
                # pipeline re-batching), so results match model.hf(**inputs) exactly
                per_model[kind] = _nnsight("nnsight.modeling.huggingface").HuggingFaceModel(model.hf)
            else:
                per_model[kind] = _ndif_wrapper(model)
    return per_model[kind]


def _ndif_wrapper(model: Model) -> Any:
    """``TransformersModel`` keyed by the checkpoint name: NDIF reconstructs the model from that key."""
    TransformersModel = _nnsight("nnsight.modeling.transformers").TransformersModel

    name = model.name_or_path
    if not name or "/" not in name and not model.revision:
        warnings.warn(f"remote tracing needs a Hub repo id that the server hosts; got {name!r}", stacklevel=3)
    task = "image-text-to-text" if model.is_vlm else "text-generation"
    pre = {"processor": model.processor} if model.is_vlm else {"tokenizer": model.tokenizer}
    # the attention kernel travels with each request (nnsight sends it as env): keep the local model's, so
    # attn_pattern works remotely exactly when it works here
    impl = model.adapter.attn_implementation
    extra = {"attn_implementation": impl} if impl else {}
    return TransformersModel(name, revision=model.revision, task=task, **pre, **extra)


def _trace_call(model: Any, wrapper: Any, call: dict, remote: Any) -> dict:
    """The forward's keyword arguments for a trace: HF's default positions pinned for a pipeline wrapper (nnsight's
    TransformersModel re-batches text inputs and would add mask-derived ones), and a warning for remote traces."""
    if _is_pipeline_wrapper(wrapper) and "position_ids" not in call:
        derived = default_position_ids(model, call)
        if derived is not None:
            call["position_ids"] = derived
    if remote is True or (isinstance(remote, str) and remote != "local"):
        warnings.warn("nnsight remote results are unpickled (torch.load(weights_only=False)); only trace on "
                      "servers you trust", stacklevel=3)
    return call


def _is_pipeline_wrapper(wrapper: Any) -> bool:
    return isinstance(wrapper, _nnsight("nnsight.modeling.transformers").TransformersModel)


def _module_paths(model: Model) -> dict[int, str]:
    return {id(module): name for name, module in model.hf.named_modules()}


def build_plan(model: Model, points: Sequence[HookPoint]) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """``[(module_path, "input"|"output", [(hook_name, kind), ...]), ...]`` in forward order.

    >>> build_plan(model, parse_hooks(model, ["resid_post.0", "resid_pre.0"]))
    [('model.language_model.layers.0', 'input', [('resid_pre.0', 'resid_pre')]),
     ('model.language_model.layers.0', 'output', [('resid_post.0', 'resid_post')])]
    """
    adapter, paths = model.adapter, _module_paths(model)
    steps: dict[tuple[str, str], list[tuple[str, str]]] = {}
    order: dict[tuple[str, str], tuple[int, int]] = {}
    for point in points:
        site = adapter.site(point)  # the module and pre/post, as the hooks backend uses them
        what = "input" if site.kind == "pre" else "output"
        if site.per_image:
            key = (-1, 0 if what == "input" else 1)
        else:
            key = (point.layer, _STAGE[point.kind])
        path = paths[id(site.module)]
        steps.setdefault((path, what), []).append((point.name, point.kind))
        order[(path, what)] = min(order.get((path, what), key), key)
    return [(path, what, steps[(path, what)]) for path, what in sorted(steps, key=order.__getitem__)]


def capture_nnsight(
    model: Model,
    inputs: Mapping[str, Any],
    hooks: Sequence[str] | str,
    positions: PositionSpec = None,
    *,
    remote: bool | str | None = None,
    output: bool = True,
    **forward_kwargs: Any,
) -> Capture:
    """Like :func:`haltrace.trace.capture.capture`, traced with nnsight (remotely if ``remote``/``model.remote``).

    ``output=False`` skips saving the model output (logits), which matters for remote runs.

    >>> cap = capture_nnsight(model, inputs, ["resid_post.1"], positions="last", remote="local")
    >>> cap["resid_post.1"].shape
    torch.Size([2, 1, 32])
    """
    if remote is None:
        remote = getattr(model, "remote", False)
    points = parse_hooks(model, hooks)
    check_supported("nnsight", model, points)
    check_vision_inputs(points, inputs)
    pos = resolve_positions(positions, inputs, model.image_token_mask)
    wrapper = wrapper_for(model, remote)
    plan = [(wrapper.get(path) if path else wrapper, what, names) for path, what, names in build_plan(model, points)]
    call = _trace_call(model, wrapper, {**inputs, **forward_kwargs}, remote)
    n_heads, head_dim = model.adapter.n_heads, model.adapter.head_dim
    trace_kw = {"remote": remote} if remote else {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        got, out = _trace(wrapper, call, trace_kw, plan, pos, n_heads, head_dim, output)
    cap = Capture(got, output=out, positions=pos, n_layers=model.n_layers)
    missing = [p.name for p in points if p.name not in dict.keys(cap)]
    if missing:
        raise RuntimeError(f"hooks {missing} did not fire during the forward (no images in the inputs?)")
    return cap


def _trace(wrapper: Any, call: dict[str, Any], trace_kw: dict[str, Any], plan: list, pos: torch.Tensor | None,
           n_heads: int, head_dim: int, want_output: bool) -> tuple[dict[str, torch.Tensor], Any]:
    # The block below is what nnsight ships to a remote server: it uses only torch and the captured
    # locals (envoys, tensors, ints), never haltrace code, so the server needs nothing but nnsight.
    nnsight = _nnsight()  # the nnsight module itself, as `import nnsight` would bind it

    out = None  # set before the block: a remote run returns only saved values, and None is never saved
    with wrapper.trace(**call, **trace_kw):
        got = {}
        rows = None if pos is None else torch.arange(pos.shape[0], device=pos.device).unsqueeze(1)
        for envoy, what, names in plan:
            raw = envoy.input if what == "input" else envoy.output
            for name, kind in names:
                if kind == "attn_pattern":
                    x = raw[1] if isinstance(raw, tuple) else None
                    if x is None:
                        raise RuntimeError(f"{name}: the attention module returned no weights; load the model "
                                           "with attn_implementation=\"eager\"")
                else:
                    x = raw[0] if isinstance(raw, (tuple, list)) else raw
                if rows is not None and kind not in ("vision_out", "projector_out"):
                    if kind == "attn_pattern":  # [B, H, T, T]: select query positions
                        x = x.movedim(2, 1)[rows, pos.to(x.device)].movedim(1, 2)
                    else:
                        x = x[rows, pos.to(x.device)]
                if kind == "head_out":
                    x = x.reshape(*x.shape[:2], n_heads, head_dim)
                got[name] = x.detach().clone()
        got = nnsight.save(got)
        if want_output:
            out = wrapper.output.save()
    return got, out


def lens_logits_nnsight(model: Model, inputs: Mapping[str, Any], hooks: Sequence[str], pos: torch.Tensor | None, *,
                        apply_norm: bool = True, softcap: float | None = None,
                        remote: bool | str | None = None) -> torch.Tensor:
    """Logit-lens logits ``[L, B, P, V]`` (float32) of the residual ``hooks`` at ``pos``, with the final norm and
    the unembedding applied *inside* the trace: a ``remote=True`` model's lens runs on NDIF and ships back only
    the selected rows' logits (never the weights, never every position).

    >>> z = lens_logits_nnsight(model, inputs, ["resid_post.0"], None)
    >>> z.shape[:2], z.shape[-1] == model.hf.config.text_config.vocab_size   # [L, B, P, V]
    (torch.Size([1, 2]), True)
    """
    if remote is None:
        remote = getattr(model, "remote", False)
    points = parse_hooks(model, hooks)
    check_vision_inputs(points, inputs)
    wrapper = wrapper_for(model, remote)
    paths = _module_paths(model)
    plan = [(wrapper.get(path) if path else wrapper, what, names) for path, what, names in build_plan(model, points)]
    norm = wrapper.get(paths[id(model.adapter.final_norm)])
    head = wrapper.get(paths[id(model.adapter.unembed)])
    call = _trace_call(model, wrapper, dict(inputs), remote)
    trace_kw = {"remote": remote} if remote else {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        got = _lens_trace(wrapper, call, trace_kw, plan, pos, norm, head, apply_norm, softcap)
    return torch.stack([got[h].cpu() for h in hooks])


def _lens_trace(wrapper: Any, call: dict[str, Any], trace_kw: dict[str, Any], plan: list, pos: torch.Tensor | None,
                norm: Any, head: Any, apply_norm: bool, softcap: float | None) -> dict[str, torch.Tensor]:
    # shipped to the server as is: torch and the captured locals only
    nnsight = _nnsight()

    with wrapper.trace(**call, **trace_kw):
        got = {}
        rows = None if pos is None else torch.arange(pos.shape[0], device=pos.device).unsqueeze(1)
        for envoy, what, names in plan:
            raw = envoy.input if what == "input" else envoy.output
            x = raw[0] if isinstance(raw, (tuple, list)) else raw
            if rows is not None:
                x = x[rows, pos.to(x.device)]
            if apply_norm:
                x = norm(x)
            z = head(x).float()
            if softcap:
                z = softcap * torch.tanh(z / softcap)
            for name, _kind in names:
                got[name] = z.detach().clone()
        got = nnsight.save(got)
    return got
