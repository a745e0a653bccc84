"""Counterfactual-colour evaluation: does the model answer with the prior colour or the pixel colour?

Each item shows an object in an atypical colour (a blue banana); its answer is labelled ``prior`` (the
typical colour), ``pixel`` (what the image shows) or ``other``. Steering should move ``prior`` answers to
``pixel``; :func:`flip_rates` measures that from per-item labels before and after.

>>> label_answers(["yellow", "blue", "red"], prior=["yellow"] * 3, pixel=["blue"] * 3)
['prior', 'pixel', 'other']
>>> flip_rates(["prior", "prior", "pixel"], ["pixel", "prior", "pixel"])["prior_to_pixel"]
0.5
"""

from __future__ import annotations

from collections.abc import Sequence

LABELS = ("prior", "pixel", "other")


def _first_word(text: str) -> str:
    words = "".join(ch if ch.isalnum() or ch.isspace() else " " for ch in text.lower()).split()
    return words[0] if words else ""


def label_answers(answers: Sequence[str], prior: Sequence[str], pixel: Sequence[str]) -> list[str]:
    """Label each answer ``prior`` / ``pixel`` / ``other`` by its first word (lower-cased, punctuation off)."""
    if not len(answers) == len(prior) == len(pixel):
        raise ValueError(f"{len(answers)} answers, {len(prior)} prior and {len(pixel)} pixel colours: "
                         "they are aligned by order and must have the same length")
    out = []
    for answer, p, q in zip(answers, prior, pixel, strict=True):
        word = _first_word(answer)
        out.append("prior" if word == p.lower() else "pixel" if word == q.lower() else "other")
    return out


def counterfactual_rates(labels: Sequence[str]) -> dict:
    """Prior / pixel / other rates of a list of labels."""
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
