"""Evaluate a model on the organism's held-out sets, optionally under a steering intervention.

>>> import haltrace
>>> from haltrace.evals.suite import evaluate
>>> model = haltrace.load("shapes-llava")                            # doctest: +SKIP
>>> before = evaluate(model, ["pope", "chair"])                       # doctest: +SKIP
>>> after = evaluate(model, ["pope", "chair"], fitted=intervention)   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

from haltrace.evals.counterfactual import flip_rates  # noqa: F401  (re-exported: methods' tests use it)

EVALS = ("pope", "chair", "counterfactual", "refusal", "colour_control")


def organism_world(model: Any):
    """The ShapesWorld a haltrace Model was trained on (from its folder's world.json)."""
    from pathlib import Path

    from haltrace.organism.paths import resolve_organism
    from haltrace.organism.train import load_world

    path = resolve_organism(model.name_or_path) or Path(model.name_or_path)
    if not (Path(path) / "world.json").exists():
        raise ValueError(f"{model.name_or_path!r} is not a ShapesWorld organism (no world.json): the built-in "
                         "evaluations need the organism's world; evaluate other models on benchmark files: "
                         "`haltrace eval --pope FILE --images DIR` / `--chair-images DIR --coco-annotations DIR`, "
                         "`haltrace steer ... --eval pope=FILE,chair=IMAGE_DIR`")
    return load_world(path)


def evaluate(model: Any, evals: Sequence[str] = EVALS, *, fitted: Any = None, world: Any = None,
             keep_answers: bool = False) -> dict:
    """Run the chosen evaluations; with ``fitted`` (a FittedIntervention) everything runs under it.

    Keys: ``pope`` (per split) + ``pope_control``, ``chair``, ``counterfactual`` (prior/pixel/other rates;
    per-item ``labels`` with ``keep_answers``), ``refusal`` (entity refusal and accuracy), ``colour_control``.
    """
    from haltrace.organism import phenomena

    unknown = [e for e in evals if e not in EVALS]
    if unknown:
        raise ValueError(f"unknown evaluation(s) {unknown}; choose from {', '.join(EVALS)}")
    world = world or organism_world(model)
    runner = phenomena.OrganismRunner(model.hf, world)
    context = fitted.apply(model) if fitted is not None else nullcontext()
    kwargs = getattr(fitted, "generate_kwargs", None) or {}
    if kwargs:
        runner.generate_kwargs = kwargs
    out: dict = {}
    with context:
        if "pope" in evals:
            out["pope"], _, out["pope_control"] = phenomena.eval_pope(runner)
        if "chair" in evals:
            out["chair"] = phenomena.eval_chair(runner)
        if "counterfactual" in evals:
            out["counterfactual"], _ = phenomena.eval_counterfactual(runner, lens=False, keep_answers=keep_answers)
        if "refusal" in evals:
            out["refusal"] = phenomena.eval_entity(runner)
        if "colour_control" in evals:
            out["colour_control"] = phenomena.eval_colour_control(runner)
    return out
