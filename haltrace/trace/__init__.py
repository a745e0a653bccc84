"""Tracing: activation capture (``capture``), and the store, lenses and attention tools built on it.

Submodules load lazily so ``import haltrace.trace`` stays cheap.

>>> from haltrace.trace import Capture, temporary_hooks
>>> Capture.__module__
'haltrace.trace.capture'
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> defining module, imported on first access
_LAZY = {
    "Capture": "haltrace.trace.capture",
    "resolve_positions": "haltrace.trace.capture",
    "temporary_hooks": "haltrace.trace.capture",
    "capture_with": "haltrace.trace.backends",
    "logit_lens": "haltrace.trace.lens",
    "attention_to_image": "haltrace.trace.attention",
    "trace_generation": "haltrace.trace.generation",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'haltrace.trace' has no attribute {name!r}")
