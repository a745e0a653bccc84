"""Data sources: where a method's fit items, a built-in probe task or a built-in evaluation come from when a user
passes none.

A data source is a module named in :data:`SOURCES` (add one with :func:`register_source`) that defines any of
these hooks, each answering ``None`` for a model that is not its own:

- ``fit_data_for(model, method, **options) -> items | None``: a steering method's default fit data
  (:func:`default_fit_data`);
- ``probe_task_for(name, model) -> ProbeSet | None``: a built-in probe task
  (:func:`haltrace.probes.datasets.build_task`);
- ``world_for(model) -> world | None`` and ``evaluate_world(model, world, evals, *, fitted, keep_answers) -> dict
  | None``: the built-in held-out evaluations (:func:`haltrace.evals.suite.evaluate`).

The organism is one such source (:mod:`haltrace.organism.source`); real checkpoints have none, so their fits
need ``data=`` (or ``--fit-data FILE.jsonl``) and the error says so. Sources are registered here by name and
imported when first asked: the layers below the organism (data, probes, steering, evals) never import it
(the import-linter contracts in pyproject.toml).

>>> items = default_fit_data(model, "caa")        # an organism: its fresh yes/no questions   # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

#: modules asked in order; each answers only for its own models
SOURCES: list[str] = ["haltrace.organism.source"]


def register_source(module: str) -> None:
    """Ask ``module`` (a dotted module name defining some of the hooks above) too, after the listed sources."""
    if module not in SOURCES:
        SOURCES.append(module)


def source_hooks(name: str) -> list[Callable[..., Any]]:
    """The hook ``name`` of every source that defines it, in :data:`SOURCES` order."""
    hooks = []
    for module in SOURCES:
        hook = getattr(importlib.import_module(module), name, None)
        if hook is not None:
            hooks.append(hook)
    return hooks


def default_fit_data(model: Any, method: str, **options: Any) -> list[Any]:
    """Items from the first source that knows ``model``; a clear error naming what to pass otherwise."""
    options = {k: v for k, v in options.items() if v is not None}
    for fit_data_for in source_hooks("fit_data_for"):
        items = fit_data_for(model, method, **options)
        if items is not None:
            return items
    raise ValueError(f"{method} needs fit data for {model.name_or_path}: pass data= (a list of haltrace.data "
                     "items) or --fit-data FILE.jsonl (formats: docs/data-formats.md)")
