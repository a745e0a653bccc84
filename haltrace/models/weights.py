"""Where a model's weights are: :func:`has_meta_weights` (``load(..., remote=True)`` builds the module tree on the
``meta`` device) and :func:`require_local_weights`, which refuses local-only work on such a model.

Duck-typed (anything with ``.hf``), so the trace layer asks without importing :mod:`haltrace.models.base`, whose
``Model.capture`` / ``Model.hooks`` call into the trace layer (that would be an import cycle).
:mod:`haltrace.models.base` re-exports both.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def has_meta_weights(model: Any) -> bool:
    """True when ``model`` (a :class:`Model` or anything with ``.hf``) holds no weights here: its module tree
    is on the ``meta`` device, as ``load(..., remote=True)`` builds it."""
    hf = getattr(model, "hf", None)
    if not isinstance(hf, nn.Module):
        return False
    first = next(iter(hf.parameters()), None)
    return first is not None and first.device.type == "meta"


def require_local_weights(model: Any, what: str) -> None:
    """Refuse ``what`` (e.g. "steering") on a model whose weights are not here (``load(..., remote=True)``).

    >>> require_local_weights(model, "steering")  # weights on the CPU: nothing to refuse
    """
    if has_meta_weights(model):
        from haltrace.errors import InputError

        raise InputError(
            f"{what} needs the model's weights in this process, but {getattr(model, 'name_or_path', 'the model')!r} "
            "was loaded with remote=True: its modules are on the meta device and its forwards run on NDIF. Remote "
            "models support capture, harvest, the logit lens and attention-to-image; load the model without "
            "remote=True on a machine that can hold it for steering, method fits and generation.")
