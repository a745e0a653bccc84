"""The organism's held-out evaluations (POPE, CHAIR, counterfactual colours, entity refusal, colour control), run
by :func:`haltrace.evals.suite.evaluate` through the data-source hooks of :mod:`haltrace.organism.source`
(``world_for`` -> :func:`haltrace.organism.paths.organism_world`, ``evaluate_world`` -> :func:`evaluate_world`
here; the registry is :mod:`haltrace.data.sources`): the evals layer never imports the organism. The single
evaluations and their runner live in :mod:`haltrace.organism.phenomena`; this module picks the requested ones
and runs them under a fitted intervention, for ``haltrace eval`` and ``haltrace steer``.

>>> world = organism_world(haltrace.load("shapes-llava"))                             # doctest: +SKIP
>>> evaluate_world(model, world, ["pope"])["pope"]["adversarial"]["f1"]               # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

from haltrace.evals.counterfactual import counterfactual_rates, label_answers


def eval_counterfactual_most(runner: Any, *, keep_answers: bool = False) -> dict:
    """The organism's held-out counterfactual images (``counterfactual_colour_set``) asked the *most* way
    ("what colour are most X ?"): prior / pixel / other (broken) rates of the greedy one-word answers; with
    ``keep_answers`` also ``answers``, ``labels`` and the ``pixel`` colours (for
    :func:`haltrace.evals.counterfactual.counterfactual_flips`).
    """
    from dataclasses import replace

    from haltrace.organism import tasks

    items = tasks.counterfactual_colour_set(runner.world)
    asked = [replace(e, prompt=tasks.prior_colour_prompt(e.meta["kind"])) for e in items]
    answers = runner.answers(asked)
    prior = [e.meta["prior"] for e in items]
    pixel = [e.meta["pixel"] for e in items]
    labels = label_answers(answers, prior, pixel)
    report = counterfactual_rates(labels) | {"prompt": "what colour are most X ? (PvP's world-knowledge prompt)"}
    if keep_answers:
        report |= {"answers": answers, "labels": labels, "pixel": pixel}
    return report


def evaluate_world(model: Any, world: Any, evals: Sequence[str], *, fitted: Any = None,
                   keep_answers: bool = False) -> dict:
    """Run ``evals`` (names checked by the caller) on ``world``'s held-out sets; with ``fitted`` (a
    FittedIntervention) everything runs under it. The report's keys: :func:`haltrace.evals.suite.evaluate`.

    ``model`` is a haltrace Model (its ``.hf`` is what runs); ``keep_answers`` keeps the counterfactual sets'
    per-item answers and labels, which flip rates between two runs need."""
    from haltrace.organism import phenomena

    runner = phenomena.OrganismRunner(model.hf, world)
    context = fitted.apply(model) if fitted is not None else nullcontext()
    # decoding arguments only reach generate(), i.e. the CHAIR captions; the one-word answers are single
    # forward passes, which only the interventions installed by ``context`` change
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
            # PvP's headline prompt ("what colour are most X ?") on the same held-out images
            out["counterfactual"]["most"] = eval_counterfactual_most(runner, keep_answers=keep_answers)
        if "refusal" in evals:
            out["refusal"] = phenomena.eval_entity(runner)
        if "colour_control" in evals:
            out["colour_control"] = phenomena.eval_colour_control(runner)
    return out
