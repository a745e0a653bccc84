"""The organism as a data source (:mod:`haltrace.data.sources` lists this module): its default fit data, built-in
probe tasks and held-out evaluations, for the layers below it that never import the organism (steering, probes,
evals). Each hook answers ``None`` for a model that is not an organism; the modules behind them load on first use.

>>> from haltrace.data.sources import source_hooks
>>> [hook.__name__ for hook in source_hooks("world_for")]
['world_for']
"""

from __future__ import annotations

from typing import Any


def fit_data_for(model: Any, method: str, **options: Any) -> list[Any] | None:
    """A method's default fit items on an organism (:func:`haltrace.organism.fit_data.fit_data_for`)."""
    from haltrace.organism import fit_data

    return fit_data.fit_data_for(model, method, **options)


def probe_task_for(name: str, model: Any) -> Any:
    """A built-in probe task on an organism (:func:`haltrace.organism.probe_tasks.probe_task_for`)."""
    from haltrace.organism import probe_tasks

    return probe_tasks.probe_task_for(name, model)


def world_for(model: Any) -> Any:
    """The ShapesWorld behind an organism model (:func:`haltrace.organism.paths.organism_world`)."""
    from haltrace.organism.paths import organism_world

    return organism_world(model)


def evaluate_world(model: Any, world: Any, evals: Any, *, fitted: Any = None, keep_answers: bool = False
                   ) -> dict | None:
    """The organism's held-out evaluations on ``world`` (:func:`haltrace.organism.suite.evaluate_world`)."""
    from haltrace.organism import suite

    return suite.evaluate_world(model, world, evals, fitted=fitted, keep_answers=keep_answers)
