"""Counterfactual-colour evaluation: does the model answer with the prior colour or the pixel colour?

Each item shows an object in an atypical colour (a blue banana); its answer is labelled ``prior`` (the
typical colour), ``pixel`` (what the image shows) or ``other`` (a *broken* answer: neither). Steering should
move ``prior`` answers to ``pixel``; :func:`flip_rates` measures that from per-item labels before and after.

Answers are compared as PvP's official code compares them (``task_vectors_inference_WK_CF.py``,
``count_flips``): the *whole* answer, lower-cased, ``_`` read as a space and punctuation dropped, equals the
target or one of the target's near colours in the official synonym map (:data:`COLOUR_SYNONYMS`: "gold" counts
as yellow, "grey" as black, ...). "Yellow." matches yellow; "yellow banana" does not (the paper asks for one
word). :func:`eligible_flips` is the paper's headline metric: of the items whose answer before steering is not
the target, the share whose answer changed *and* now matches the target.

Two prompts are asked about the same counterfactual image: "what colour is the X" (``this``: answered from the
pixels) and "what colour are most X" (``most``: the world-knowledge question). PvP's 92.5 % steers the ``most``
prompt towards the pixel colour; the organism's :func:`~haltrace.organism.suite.eval_counterfactual_most`
measures that quantity on its held-out counterfactual images, beside the ``this`` prompt's flips, and
:func:`evaluate_pvp` measures either prompt under a fit on any model (whole greedy answers).

>>> label_answers(["yellow", "Blue.", "red", "gold"], prior=["yellow"] * 4, pixel=["blue"] * 4)
['prior', 'pixel', 'other', 'prior']
>>> flip_rates(["prior", "prior", "pixel"], ["pixel", "prior", "pixel"])["prior_to_pixel"]
0.5
>>> eligible_flips(["yellow", "yellow", "blue"], ["blue", "purple", "blue"], ["blue"] * 3)["eligible_flip_rate"]
0.5
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from haltrace.data.answers import (  # noqa: F401  (re-exported: the answer rules live with the data)
    COLOUR_SYNONYMS,
    answer_matches,
    eligible_flips,
    label_answers,
    normalise_answer,
)

LABELS = ("prior", "pixel", "other")

def counterfactual_rates(labels: Sequence[str]) -> dict:
    """Prior / pixel / other rates of a list of labels (``other_rate`` is the broken-answer rate)."""
    if not labels:
        raise ValueError("no counterfactual items to score")
    bad = sorted(set(labels) - set(LABELS))
    if bad:
        raise ValueError(f"labels must be one of {LABELS}, got {bad}")
    n = len(labels)
    return {f"{k}_rate": sum(lab == k for lab in labels) / n for k in LABELS} | {"n": n}


def flip_rates(before_labels: Sequence[str], after_labels: Sequence[str]) -> dict:
    """Of items answered with the prior before, the share answered with the pixel colour after
    (``prior_to_pixel``, the fix), and the reverse (``pixel_to_prior``, the damage). ``None`` when no item
    had that label before."""
    if len(before_labels) != len(after_labels):
        raise ValueError(f"before has {len(before_labels)} labels and after {len(after_labels)}: "
                         "they must label the same items in the same order")
    pairs = list(zip(before_labels, after_labels, strict=True))
    prior = [a for b, a in pairs if b == "prior"]
    pixel = [a for b, a in pairs if b == "pixel"]
    return {
        "prior_to_pixel": sum(a == "pixel" for a in prior) / len(prior) if prior else None,
        "pixel_to_prior": sum(a == "prior" for a in pixel) / len(pixel) if pixel else None,
        "n_prior": len(prior), "n_pixel": len(pixel),
    }


def counterfactual_flips(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict:
    """Flip rates between two ``counterfactual`` reports of :func:`haltrace.evals.suite.evaluate` (run with
    ``keep_answers``): the ``this`` prompt's :func:`flip_rates`, plus, when both reports hold the ``most``
    prompt (``before["most"]``), PvP's headline ``most_prior_to_pixel`` (:func:`eligible_flips` towards the
    pixel colour on the "most" prompt) and ``most_pixel_to_prior`` (:func:`flip_rates`' reverse direction)."""
    out = flip_rates(before["labels"], after["labels"])
    b_most, a_most = before.get("most"), after.get("most")
    if isinstance(b_most, Mapping) and isinstance(a_most, Mapping) and "answers" in b_most and "answers" in a_most:
        paper = eligible_flips(b_most["answers"], a_most["answers"], b_most["pixel"])
        reverse = flip_rates(b_most["labels"], a_most["labels"])
        out |= {"most_prior_to_pixel": paper["eligible_flip_rate"], "most_n_eligible": paper["n_eligible"],
                "most_pixel_to_prior": reverse["pixel_to_prior"]}
    return out



def evaluate_pvp(model: Any, fitted: Any, items: Sequence[Any], *, prompt: str = "most",
                 direction: str | None = None, max_new_tokens: int = 20, template: str | None = None,
                 batch_size: int = 16, keep_answers: bool = False) -> dict:
    """PvP's evaluation of a fitted intervention on counterfactual ``items`` (:class:`~haltrace.data.PvPItem`
    with ``prior`` and ``pixel``), on any model, as ``task_vectors_inference_WK_CF.py`` runs it.

    Both runs ask ``prompt`` ("most": the paper's headline, or "this") about each item's image, greedy, up to
    ``max_new_tokens`` (20, as the official code): once without and once under ``fitted`` (a fit, or a list of
    engine interventions). ``direction`` (default: the fit's) sets the target: the pixel colour for "pixels",
    the prior for "priors". Returns ``eligible_flip_rate`` (the paper's metric), ``flip_rate``, the
    prior/pixel/other (broken) rates ``before`` and ``after`` (also as ``broken_rate_before`` /
    ``broken_rate_after``), and :func:`flip_rates` between the two label lists (``flips``);
    ``answers_before`` / ``answers_after`` with ``keep_answers``.

    >>> report = evaluate_pvp(model, fitted, items, prompt="most")        # doctest: +SKIP
    >>> report["eligible_flip_rate"], report["broken_rate_after"]         # doctest: +SKIP
    """
    from contextlib import nullcontext

    from haltrace.data.items import PvPItem, of_kind
    from haltrace.errors import InputError
    from haltrace.steering.engine import steer
    from haltrace.steering.pvp import PROMPTS, generated_answers, pvp_questions

    items = of_kind(items, PvPItem, method="evaluate_pvp")
    if any(not (it.prior and it.pixel) for it in items):
        raise InputError("evaluate_pvp needs items with both prior and pixel answers")
    if prompt not in PROMPTS:
        raise InputError(f"prompt must be one of {PROMPTS}, got {prompt!r}")
    direction = direction or (getattr(fitted, "provenance", None) or {}).get("direction", "pixels")
    if direction not in ("pixels", "priors"):
        raise InputError(f"direction must be 'pixels' or 'priors', got {direction!r}")
    questions, images = pvp_questions(items, prompt), [it.image for it in items]
    kwargs = {"max_new_tokens": max_new_tokens, "template": template, "batch_size": batch_size}
    before = generated_answers(model, questions, images, **kwargs)
    context = fitted.apply(model) if hasattr(fitted, "apply") else steer(model, *fitted)
    with context if fitted else nullcontext():
        after = generated_answers(model, questions, images, **kwargs)
    prior, pixel = [it.prior for it in items], [it.pixel for it in items]
    targets = pixel if direction == "pixels" else prior
    lb, la = label_answers(before, prior, pixel), label_answers(after, prior, pixel)
    rates_b, rates_a = counterfactual_rates(lb), counterfactual_rates(la)
    report = {"prompt": prompt, "direction": direction, "target": "pixel" if direction == "pixels" else "prior",
              **eligible_flips(before, after, targets), "before": rates_b, "after": rates_a,
              "flips": flip_rates(lb, la), "broken_rate_before": rates_b["other_rate"],
              "broken_rate_after": rates_a["other_rate"]}
    if keep_answers:
        report |= {"answers_before": before, "answers_after": after}
    return report
