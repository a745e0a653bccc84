"""Capture with TransformerLens 3.x: ``TransformerBridge`` around the in-memory HF model + ``run_with_cache``.

Hook names map onto TransformerLens canonical names (the table lives in :mod:`haltrace.conventions`,
:func:`~haltrace.conventions.tl_bridge_hook_name`):

==================  ==========================================
haltrace name       TransformerLens name
==================  ==========================================
``resid_pre.i``     ``blocks.{i}.hook_resid_pre``
``resid_post.i``    ``blocks.{i}.hook_resid_post``
``attn_out.i``      ``blocks.{i}.attn.hook_out`` (*)
``mlp_out.i``       ``blocks.{i}.mlp.hook_out`` (*)
``head_out.i``      ``blocks.{i}.attn.hook_z``
``attn_pattern.i``  ``blocks.{i}.attn.hook_pattern``
``vision_out``      ``vision_projector.hook_in``
``projector_out``   ``vision_projector.hook_out``
==================  ==========================================

(*) the attention / MLP *module* outputs, as haltrace defines them. For most families these equal TL's
``hook_attn_out`` / ``hook_mlp_out``; for sandwich-norm families (Gemma 2/3) those are taken after the
post-attention / post-feedforward norm, and differ.

How the bridge is booted
------------------------
In memory, never from disk: ``TransformerBridge.boot_transformers(name, hf_model=copy)`` where ``copy`` is a
``deepcopy`` of ``model.hf`` that *shares every parameter and buffer* with it. The copy is needed because the
bridge rewires the module tree it is given (blocks become ``BlockBridge`` and so on), which would break the
other backends; sharing the tensors means no extra weight memory and weight edits stay visible. The bridge is
built once per model and reused. Booting never installs anything: TransformerLens 3.9 runs
``pip install torchvision`` when it cannot load a VLM processor, which is refused here (haltrace keeps its own
processor and hands it to the bridge).

Positions: the bridge derives ``position_ids`` from a left-padded ``attention_mask`` where Hugging Face keeps
``arange``; haltrace passes HF's default explicitly so results equal ``model.hf(**inputs)``.

>>> from haltrace.models import Model
>>> from haltrace.models.tiny import build_tiny, build_tiny_inputs
>>> hf, tok = build_tiny("gpt2")
>>> model = Model.from_hf(hf, tok)
>>> capture_tl(model, build_tiny_inputs("gpt2", tok), ["attn_pattern.1"], "last")["attn_pattern.1"].shape
torch.Size([2, 4, 1, 7])
"""

from __future__ import annotations

import contextlib
import copy
import subprocess
import warnings
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from haltrace._optional import require
from haltrace.trace.backends.common import check_supported, check_vision_inputs, default_position_ids
from haltrace.trace.capture import Capture, parse_hooks, resolve_positions
from haltrace.trace.capture import _select as select_positions

if TYPE_CHECKING:
    from haltrace.conventions import HookPoint
    from haltrace.models.base import Model
    from haltrace.trace.capture import PositionSpec

_BRIDGES: weakref.WeakKeyDictionary[torch.nn.Module, Any] = weakref.WeakKeyDictionary()


def tl_name(point: HookPoint) -> str:
    """TransformerLens canonical name of a haltrace hook.

    >>> from haltrace.conventions import parse_hook
    >>> tl_name(parse_hook("head_out.3"))
    'blocks.3.attn.hook_z'
    """
    from haltrace.conventions import tl_bridge_hook_name

    return tl_bridge_hook_name(point)


@contextlib.contextmanager
def _no_installs() -> Iterator[None]:
    """Refuse subprocess package installs while TransformerLens boots (it pip/uv-installs torchvision)."""
    original = subprocess.check_call

    def refuse(cmd: Any, *args: Any, **kwargs: Any) -> int:
        if "install" in (cmd if isinstance(cmd, (list, tuple)) else str(cmd).split()):
            raise RuntimeError(f"haltrace refused a package install from TransformerLens: {cmd}")
        return original(cmd, *args, **kwargs)

    subprocess.check_call = refuse
    try:
        yield
    finally:
        subprocess.check_call = original


def _bridge_tokenizer(model: Model) -> Any:
    """A copy of the model's tokenizer that TL's setup accepts without a Hub round trip.

    TL re-loads the tokenizer with ``add_bos_token=True`` by name unless it already says so; haltrace feeds
    token ids, so the copy only has to pass TL's checks (the copy keeps TL's edits off our tokenizer).
    """
    tok = copy.deepcopy(model.tokenizer)
    if tok is None:
        return None
    tok.init_kwargs.setdefault("name_or_path", model.name_or_path or "haltrace")
    tok.init_kwargs["add_bos_token"] = True
    return tok


def bridge_for(model: Model) -> Any:
    """The ``TransformerBridge`` over ``model`` (built once, sharing ``model.hf``'s weights).

    >>> bridge_for(gpt2_model).cfg.n_layers
    2
    """
    bridge = _BRIDGES.get(model.hf)
    if bridge is not None:
        return bridge
    TransformerBridge = require("transformer_lens.model_bridge", extra="tl",
                                feature="the TransformerLens backend").TransformerBridge
    hf = model.hf
    shared = {id(t): t for t in [*hf.parameters(), *hf.buffers()]}
    clone = copy.deepcopy(hf, shared)  # new module tree, same tensors
    try:
        with _no_installs(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bridge = TransformerBridge.boot_transformers(
                model.name_or_path or type(hf).__name__, hf_model=clone, tokenizer=_bridge_tokenizer(model),
                dtype=model.dtype,
                # in-memory configs (from_config) carry no `architectures`, which TL dispatches on
                hf_config_overrides={"architectures": [type(hf).__name__]})
    except Exception as err:
        raise RuntimeError(f"TransformerLens could not build a bridge for {type(hf).__name__} "
                           f"({model.adapter.family}): {err}. Use capture_with(..., backend='hooks' or "
                           "'nnsight') for this model") from err
    if model.processor is not None:
        bridge.processor = model.processor
    _BRIDGES[model.hf] = bridge
    return bridge


def capture_tl(
    model: Model,
    inputs: Mapping[str, Any],
    hooks: Sequence[str] | str,
    positions: PositionSpec = None,
    **forward_kwargs: Any,
) -> Capture:
    """Like :func:`haltrace.trace.capture.capture`, through TransformerLens ``run_with_cache``.

    ``Capture.output`` holds a ``CausalLMOutputWithPast`` with ``logits`` only.

    >>> from haltrace.models.tiny import build_tiny_inputs
    >>> inputs = build_tiny_inputs("gpt2", gpt2_model.tokenizer)
    >>> cap = capture_tl(gpt2_model, inputs, ["resid_post.1", "head_out.0"], positions="last")
    >>> cap["resid_post.1"].shape, cap["head_out.0"].shape
    (torch.Size([2, 1, 32]), torch.Size([2, 1, 4, 8]))
    """
    points = parse_hooks(model, hooks)
    check_supported("transformer_lens", model, points)
    check_vision_inputs(points, inputs)
    pos = resolve_positions(positions, inputs, model.image_token_mask)
    bridge = bridge_for(model)
    wanted = {tl_name(p): p for p in points}
    missing_names = [n for n in wanted if n not in bridge.hook_dict]
    if missing_names:
        raise RuntimeError(f"TransformerLens bridge for {model.adapter.family} has no hook points "
                           f"{missing_names}; use backend='hooks' or 'nnsight'")
    call = {**inputs, **forward_kwargs}
    ids = call.pop("input_ids", None)
    if ids is None:
        ids = call.pop("inputs_embeds")
    if "position_ids" not in call and bridge._accepts_derived_position_ids():
        derived = default_position_ids(model, {"input_ids": ids, **call})
        if derived is not None:
            call["position_ids"] = derived
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(ids, names_filter=list(wanted), return_cache_object=False, **call)
    cap = Capture(positions=pos, n_layers=model.n_layers)
    for name, point in wanted.items():
        if name not in cache:
            raise RuntimeError(f"hook {point.name} ({name}) did not fire in the TransformerLens bridge")
        x = cache[name]
        if point.layer is None:
            cap[point.name] = x.detach().clone()
        else:
            cap[point.name] = select_positions(x, pos, seq_dim=2 if point.kind == "attn_pattern" else 1)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    cap.output = CausalLMOutputWithPast(logits=logits)
    return cap
