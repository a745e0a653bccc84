"""Steering: the intervention engine and the methods built on it.

Submodules load lazily, so ``import haltrace.steering`` (and the ``haltrace steer`` command line) stays cheap.

>>> from haltrace.steering import Add, steer
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> defining module, imported on first access
_LAZY = {name: "haltrace.steering.engine" for name in
         ("Add", "Gated", "Intervention", "LinearDetector", "NormPreservingAdd", "Project", "ScaleHeads",
          "SteeringHandle", "attach", "steer")}

__all__ = ["Add", "Gated", "Intervention", "LinearDetector", "NormPreservingAdd", "Project", "ScaleHeads", "SteeringHandle", "attach", "steer"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'haltrace.steering' has no attribute {name!r}")
