"""Evaluate a model on the organism's held-out sets, optionally under a steering intervention.

The sets belong to the organism and are reached through the data-source registry (:mod:`haltrace.data.sources`,
:mod:`haltrace.organism.suite`): the evals layer never imports the organism.

>>> import haltrace
>>> from haltrace.evals.suite import evaluate
>>> model = haltrace.load("shapes-llava")                            # doctest: +SKIP
>>> before = evaluate(model, ["pope", "chair"])                       # doctest: +SKIP
>>> after = evaluate(model, ["pope", "chair"], fitted=intervention)   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from haltrace.evals.counterfactual import flip_rates  # noqa: F401  (re-exported: methods' tests use it)

EVALS = ("pope", "chair", "counterfactual", "refusal", "colour_control")


def organism_world(model: Any):
    """The ShapesWorld a haltrace Model was trained on (from its folder's world.json), from the data source that
    knows the model (the organism: :func:`haltrace.organism.source.world_for`)."""
    from haltrace.data.sources import source_hooks

    for world_for in source_hooks("world_for"):
        world = world_for(model)
        if world is not None:
            return world
    raise ValueError(f"{model.name_or_path!r} is not a ShapesWorld organism (no world.json): the built-in "
                     "evaluations need the organism's world; evaluate other models on benchmark files: "
                     "`haltrace eval --pope FILE --images DIR` / `--chair-images DIR --coco-annotations DIR`, "
                     "`haltrace steer ... --eval pope=FILE,chair=IMAGE_DIR`")


def evaluate(model: Any, evals: Sequence[str] = EVALS, *, fitted: Any = None, world: Any = None,
             keep_answers: bool = False) -> dict:
    """Run the chosen evaluations; with ``fitted`` (a FittedIntervention) everything runs under it.

    Keys: ``pope`` (per split) + ``pope_control``, ``chair``, ``counterfactual`` (prior/pixel/other rates of
    the "what colour is the X" prompt, and under ``most`` of PvP's "what colour are most X" prompt on the same
    images; per-item ``labels`` with ``keep_answers``), ``refusal`` (entity refusal and accuracy), ``colour_control``.
    The sets and their runner are the data source's (:func:`haltrace.organism.suite.evaluate_world`).
    """
    from haltrace.data.sources import source_hooks

    unknown = [e for e in evals if e not in EVALS]
    if unknown:
        raise ValueError(f"unknown evaluation(s) {unknown}; choose from {', '.join(EVALS)}")
    world = world or organism_world(model)
    for evaluate_world in source_hooks("evaluate_world"):
        out = evaluate_world(model, world, evals, fitted=fitted, keep_answers=keep_answers)
        if out is not None:
            return out
    raise ValueError(f"no data source (haltrace.data.sources.SOURCES) evaluates on a {type(world).__name__}")
