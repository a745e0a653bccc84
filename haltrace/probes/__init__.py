"""Linear probes and directions: labelled sets, per-layer probes, steering vectors, the ``haltrace probe`` run.

>>> from haltrace.probes import build_task, fit_probes, run_probe
>>> manifest = run_probe(model, build_task("entity", model), out="runs/entity")  # doctest: +SKIP

Submodules are imported on first use, so ``import haltrace.probes`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "ProbeSet": "haltrace.probes.datasets", "TASKS": "haltrace.probes.datasets",
    "build_task": "haltrace.probes.datasets", "load_jsonl": "haltrace.probes.datasets",
    "resolve_generated": "haltrace.probes.datasets",
    "fit_probes": "haltrace.probes.linear", "ProbeSweep": "haltrace.probes.linear", "auroc": "haltrace.probes.linear",
    "majority_baseline": "haltrace.probes.linear", "bag_of_tokens": "haltrace.probes.linear",
    "vectors_from_sweep": "haltrace.probes.directions", "vector_from_store": "haltrace.probes.directions",
    "run_probe": "haltrace.probes.artifacts", "load_probe_artifacts": "haltrace.probes.artifacts",
    "parse_layers": "haltrace.probes.artifacts",
}
__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'haltrace.probes' has no attribute {name!r}")
