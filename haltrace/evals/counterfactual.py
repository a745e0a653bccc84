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
prompt towards the pixel colour; the organism's :func:`~haltrace.organism.suite.eval_counterfactual_most` measures that quantity on its
held-out counterfactual images, beside the ``this`` prompt's flips.

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

LABELS = ("prior", "pixel", "other")

#: near colours that count as the target colour: ``color_mappings`` of PvP's ``count_flips`` (rsinghlab/
#: pixels_vs_priors), read as "an answer in COLOUR_SYNONYMS[target] matches target"
COLOUR_SYNONYMS: dict[str, tuple[str, ...]] = {
    "yellow": ("gold",),
    "gold": ("orange", "yellow"),
    "purple": ("pink",),
    "pink": ("purple",),
    "brown": ("orange",),
    "orange": ("brown",),
    "red": ("red",),
    "black": ("gray", "grey", "silver"),
    "gray": ("black", "silver"),
    "grey": ("black", "silver", "gray"),
    "green": ("green",),
    "blue": ("blue",),
    "silver": ("silver", "gray", "grey"),
}


def normalise_answer(text: str) -> str:
    """The whole answer lower-cased, ``_`` as a space, punctuation dropped, whitespace collapsed.

    >>> normalise_answer(" Light_Blue. "), normalise_answer("Red!")
    ('light blue', 'red')
    """
    text = str(text).lower().replace("_", " ")
    return " ".join("".join(ch if ch.isalnum() or ch.isspace() else " " for ch in text).split())


def answer_matches(answer: str, target: str, synonyms: Mapping[str, Sequence[str]] | None = None) -> bool:
    """Whether ``answer`` (whole, normalised) is ``target`` or one of its near colours (default: the official
    map, :data:`COLOUR_SYNONYMS`; pass ``{}`` for exact matching only)."""
    synonyms = COLOUR_SYNONYMS if synonyms is None else synonyms
    a, t = normalise_answer(answer), normalise_answer(target)
    return bool(t) and (a == t or a in synonyms.get(t, ()))


def label_answers(answers: Sequence[str], prior: Sequence[str], pixel: Sequence[str], *,
                  synonyms: Mapping[str, Sequence[str]] | None = None) -> list[str]:
    """Label each answer ``prior`` / ``pixel`` / ``other`` (:func:`answer_matches`: whole normalised answer,
    the official colour synonyms; an answer matching both is ``pixel`` only when it is the pixel colour
    itself)."""
    if not len(answers) == len(prior) == len(pixel):
        raise ValueError(f"{len(answers)} answers, {len(prior)} prior and {len(pixel)} pixel colours: "
                         "they are aligned by order and must have the same length")
    out = []
    for answer, p, q in zip(answers, prior, pixel, strict=True):
        exact = normalise_answer(answer)
        if exact == normalise_answer(q):
            out.append("pixel")
        elif exact == normalise_answer(p) or answer_matches(answer, p, synonyms):
            out.append("prior")
        elif answer_matches(answer, q, synonyms):
            out.append("pixel")
        else:
            out.append("other")
    return out


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


def eligible_flips(before: Sequence[str], after: Sequence[str], targets: Sequence[str], *,
                   synonyms: Mapping[str, Sequence[str]] | None = None) -> dict:
    """PvP's ``count_flips`` on answers before/after steering and the target of each item.

    ``eligible_flip_rate``: of the items whose answer before is not the target (``n_eligible``), the share whose
    answer changed and now matches the target (the paper's "Eligible Flip to Counterfact %"; ``None`` when no
    item is eligible). ``flip_rate``: the share of all items whose normalised answer changed.
    """
    if not len(before) == len(after) == len(targets):
        raise ValueError(f"{len(before)} answers before, {len(after)} after and {len(targets)} targets: they "
                         "are aligned by order and must have the same length")
    if not targets:
        raise ValueError("no items to count flips on")
    eligible = flipped = changed = 0
    for b, a, t in zip(before, after, targets, strict=True):
        moved = normalise_answer(a) != normalise_answer(b)
        changed += moved
        if not answer_matches(b, t, synonyms):
            eligible += 1
            flipped += moved and answer_matches(a, t, synonyms)
    return {"eligible_flip_rate": flipped / eligible if eligible else None, "n_eligible": eligible,
            "flip_rate": changed / len(targets), "n": len(targets)}


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

