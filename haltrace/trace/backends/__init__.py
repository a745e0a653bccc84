"""Capture backends behind haltrace's one hook vocabulary: plain torch hooks, nnsight, TransformerLens.

Every backend takes haltrace hook names (``resid_post.3``, ``head_out.0``, ``projector_out``; see
:mod:`haltrace.conventions`) and returns the same :class:`~haltrace.trace.capture.Capture` with the same
shapes as :func:`haltrace.trace.capture.capture`, so methods never care which engine ran the forward.

=====================  ==========================================================================
backend                when to use it
=====================  ==========================================================================
``"hooks"``            default: plain PyTorch hooks on the HF module, any family with an adapter
``"nnsight"``          nnsight 0.8 tracing; the only one that can run on NDIF (``model.remote``)
``"transformer_lens"`` TransformerLens 3.x ``TransformerBridge`` + ``run_with_cache``
=====================  ==========================================================================

>>> from haltrace.models import Model
>>> from haltrace.models.tiny import build_tiny, build_tiny_inputs
>>> hf, tok = build_tiny("gpt2")
>>> model = Model.from_hf(hf, tok)
>>> cap = capture_with(model, build_tiny_inputs("gpt2", tok), ["resid_post.1"], "last", backend="nnsight")
>>> cap["resid_post.1"].shape
torch.Size([2, 1, 32])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from haltrace.errors import HaltraceError

if TYPE_CHECKING:
    from haltrace.conventions import HookPoint
    from haltrace.models.base import Model
    from haltrace.trace.capture import Capture, PositionSpec

#: backend names accepted by :func:`capture_with`
BACKENDS: tuple[str, ...] = ("hooks", "nnsight", "transformer_lens")

#: families whose TL ``vision_projector.hook_in/out`` equal haltrace's vision_out/projector_out
_TL_VISION_FAMILIES = frozenset({"llava", "llava_next"})
#: families whose default (arange) positions TransformerLens / nnsight's pipeline would otherwise
#: replace with mask-derived ones; mRoPE families (Qwen-VL) derive their own and are left alone
_ARANGE_POSITION_FAMILIES = frozenset({"gpt2", "llama", "mistral", "qwen2", "llava", "llava_next", "gemma3"})


class UnsupportedHookError(HaltraceError):
    """A hook that the chosen backend cannot capture for this model; the message names the alternatives."""


def capture_with(
    model: Model,
    inputs: Mapping[str, Any],
    hooks: Sequence[str] | str,
    positions: PositionSpec = None,
    backend: str = "hooks",
    **forward_kwargs: Any,
) -> Capture:
    """One no-grad forward of ``model`` on ``inputs`` through ``backend``; same result as ``capture``.

    ``backend`` is ``"hooks"``, ``"nnsight"`` or ``"transformer_lens"``. The nnsight backend runs remotely
    when ``model.remote`` is truthy (``True``: NDIF, ``"local"``: the remote path simulated in-process).
    Raises :class:`UnsupportedHookError` when ``backend`` cannot capture one of ``hooks`` for this model.

    >>> cap = capture_with(model, inputs, ["head_out.1"], positions="last", backend="transformer_lens")
    ... # doctest: +SKIP
    >>> cap["head_out.1"].shape  # [B, P, n_heads, head_dim], whatever the backend  # doctest: +SKIP
    torch.Size([2, 1, 4, 8])
    """
    if backend == "hooks":
        from haltrace.trace.capture import capture

        return capture(model, inputs, hooks, positions, **forward_kwargs)
    if backend == "nnsight":
        from haltrace.trace.backends.nnsight_backend import capture_nnsight

        return capture_nnsight(model, inputs, hooks, positions, **forward_kwargs)
    if backend in ("transformer_lens", "tl"):
        from haltrace.trace.backends.tl_backend import capture_tl

        return capture_tl(model, inputs, hooks, positions, **forward_kwargs)
    raise ValueError(f"unknown capture backend {backend!r}; choose one of {', '.join(BACKENDS)}")


# --- helpers shared by the backends --------------------------------------------------------------------------

def supports(backend: str, model: Model, kind: str) -> bool:
    """Whether ``backend`` can capture hook kind ``kind`` (``"resid_post"``, ``"vision_out"``, ...) on ``model``.

    >>> supports("nnsight", model, "head_out")  # doctest: +SKIP
    True
    """
    if backend == "hooks" or kind not in ("vision_out", "projector_out"):
        return True
    if not model.is_vlm or not _default_vision_hooks(model):
        # the other engines read the projector's input/output; families whose adapter hooks something
        # else (Qwen-VL: the whole tower, reordered per image) only work with plain hooks
        return False
    # TL's vision_projector hook points match haltrace's only where checked (Gemma-3's hook_in differs)
    return backend != "transformer_lens" or model.adapter.family in _TL_VISION_FAMILIES


def _default_vision_hooks(model: Model) -> bool:
    from haltrace.models.adapters.base import Adapter

    return type(model.adapter).register_vision_hook is Adapter.register_vision_hook


def check_supported(backend: str, model: Model, points: Sequence[HookPoint]) -> None:
    """Raise :class:`UnsupportedHookError` naming backend, hook and the backends that can capture it."""
    for point in points:
        if supports(backend, model, point.kind):
            continue
        others = [b for b in BACKENDS if b != backend and supports(b, model, point.kind)]
        raise UnsupportedHookError(
            f"backend {backend!r} cannot capture hook {point.name!r} on {model.adapter.family} "
            f"({type(model.hf).__name__}): that backend's {point.kind} is not the same tensor as haltrace's "
            f"(the adapter's own vision hooks / the engine's hook point differ). Backends that support "
            f"{point.name!r} here: "
            f"{', '.join(others)}; use capture_with(..., backend={others[0]!r})")


def check_vision_inputs(points: Sequence[HookPoint], inputs: Mapping[str, Any]) -> None:
    """Vision hooks only fire when the inputs carry images; fail before running rather than after."""
    vision = [p.name for p in points if p.layer is None]
    if vision and not any(k in inputs for k in ("pixel_values", "pixel_values_videos")):
        raise RuntimeError(f"hooks {vision} did not fire during the forward (no images in the inputs?)")


def default_position_ids(model: Model, inputs: Mapping[str, Any]) -> torch.Tensor | None:
    """``position_ids`` that Hugging Face computes when none are given (``arange(T)`` per row), or ``None``.

    TransformerLens and nnsight's pipeline path derive positions from a left-padded ``attention_mask``
    instead, which changes absolute-position models (GPT-2) on padded rows. Passing HF's own default
    keeps every backend identical to ``model.hf(**inputs)``. ``None`` when the caller gave positions, when
    the family derives its own (mRoPE), or when there are no ``input_ids``.

    >>> default_position_ids(model, {"input_ids": torch.zeros(2, 3, dtype=torch.long)}).tolist()  # doctest: +SKIP
    [[0, 1, 2], [0, 1, 2]]
    """
    ids = inputs.get("input_ids")
    if "position_ids" in inputs or ids is None or model.adapter.family not in _ARANGE_POSITION_FAMILIES:
        return None
    batch, seq = ids.shape[:2]
    return torch.arange(seq, device=ids.device).unsqueeze(0).expand(batch, seq)


def select_positions(x: torch.Tensor, pos: torch.Tensor | None, seq_dim: int = 1) -> torch.Tensor:
    """Pick ``pos[b]`` along ``seq_dim`` of row ``b`` (detached copy), like the hooks backend does."""
    from haltrace.trace.capture import _select

    return _select(x, pos, seq_dim)


__all__ = ["BACKENDS", "UnsupportedHookError", "capture_with", "check_supported", "default_position_ids",
           "supports"]
