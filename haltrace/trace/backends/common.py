"""What the capture backends share: backend names, which hooks each can capture, and the input checks.

The lowest module of :mod:`haltrace.trace.backends`: the package (:func:`~haltrace.trace.backends.capture_with`)
and each backend (``nnsight_backend``, ``tl_backend``) import from here, and this module imports neither, so
there is no import cycle between the package and its backends. It imports no other trace module and no optional
package (torch, haltrace.errors, and the adapters' base class inside :func:`supports`).

>>> supports("transformer_lens", model, "projector_out"), supports("nnsight", model, "head_out")   # tiny LLaVA
(True, True)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from haltrace.errors import HaltraceError

if TYPE_CHECKING:
    from haltrace.conventions import HookPoint
    from haltrace.models.base import Model

#: backend names accepted by :func:`haltrace.trace.backends.capture_with`
BACKENDS: tuple[str, ...] = ("hooks", "nnsight", "transformer_lens")


class UnsupportedHookError(HaltraceError):
    """A hook that the chosen backend cannot capture for this model; the message names the alternatives."""


# --- helpers --------------------------------------------------------------------------------------------------

def supports(backend: str, model: Model, kind: str) -> bool:
    """Whether ``backend`` can capture hook kind ``kind`` (``"resid_post"``, ``"vision_out"``, ...) on ``model``.

    >>> supports("nnsight", model, "head_out")
    True
    """
    if backend == "hooks" or kind not in ("vision_out", "projector_out"):
        return True
    if not model.is_vlm or not model.adapter.plain_vision_sites:
        # the other engines read the projector's input/output; families whose adapter hooks something
        # else (Qwen-VL: the whole tower, reordered per image) only work with plain hooks
        return False
    # TL's vision_projector hook points match haltrace's only where checked (Gemma-3's hook_in differs)
    return backend != "transformer_lens" or model.adapter.tl_vision_hooks_match


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

    >>> default_position_ids(model, {"input_ids": torch.zeros(2, 3, dtype=torch.long)}).tolist()
    [[0, 1, 2], [0, 1, 2]]
    """
    ids = inputs.get("input_ids")
    if "position_ids" in inputs or ids is None or model.adapter.position_scheme != "arange":
        return None
    batch, seq = ids.shape[:2]
    return torch.arange(seq, device=ids.device).unsqueeze(0).expand(batch, seq)


__all__ = ["BACKENDS", "UnsupportedHookError", "check_supported", "check_vision_inputs", "default_position_ids",
           "supports"]
