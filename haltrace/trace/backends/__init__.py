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

# the shared helpers live one level down (common), so the backends never import this package module
from haltrace.trace.backends.common import (
    BACKENDS,
    UnsupportedHookError,
    check_supported,
    check_vision_inputs,
    default_position_ids,
    supports,
)

if TYPE_CHECKING:
    from haltrace.models.base import Model
    from haltrace.trace.capture import Capture, PositionSpec


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

    >>> cap = capture_with(model, inputs, ["head_out.1"], positions="last", backend="nnsight")
    >>> cap["head_out.1"].shape  # [B, P, n_heads, head_dim], whatever the backend
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


__all__ = ["BACKENDS", "UnsupportedHookError", "capture_with", "check_supported", "check_vision_inputs",
           "default_position_ids", "supports"]
