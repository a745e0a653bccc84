"""Default fit data: where a method's items come from when a user passes none.

A data source is a module with ``fit_data_for(model, method, **options) -> items | None`` (``None``: not my
model). The organism is one such source; real checkpoints have none, so their fits need ``data=`` (or
``--fit-data FILE.jsonl``) and the error says so.

>>> items = default_fit_data(model, "caa")        # an organism: its fresh yes/no questions   # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

#: modules asked in order; each answers only for its own models
SOURCES: list[str] = ["haltrace.organism.fit_data"]


def default_fit_data(model: Any, method: str, **options: Any) -> list[Any]:
    """Items from the first source that knows ``model``; a clear error naming what to pass otherwise."""
    options = {k: v for k, v in options.items() if v is not None}
    for name in SOURCES:
        items = importlib.import_module(name).fit_data_for(model, method, **options)
        if items is not None:
            return items
    raise ValueError(f"{method} needs fit data for {model.name_or_path}: pass data= (a list of haltrace.data "
                     "items) or --fit-data FILE.jsonl (formats: docs/data-formats.md)")
