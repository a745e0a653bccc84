"""Refusal detection and refusal rates.

Two detectors, named so every report can record which one it used:

* ``"organism"``: the ShapesWorld organism answers in one word and refuses with exactly ``"unknown"``.
* ``"substrings"``: for real chat models, a lower-cased substring / prefix match in the spirit of Ferrando
  et al. (ICLR 2025, ``is_generation_refusal``): a generation is a refusal when it *starts with* one of
  :data:`REFUSAL_PREFIXES` or *contains* one of :data:`REFUSAL_SUBSTRINGS`. The lists below are ours (short,
  aimed at "I don't know this entity" answers); substring rules over-count answers such as "the movie is
  not sure to ..." and miss paraphrases, so report the rule with the number (``refusal_report`` does).

>>> is_refusal("unknown", detector="organism"), is_refusal("I'm not familiar with that film.")
(True, True)
>>> refusal_rate(["paris", "unknown", "unknown", "red"], detector="organism")
0.5
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

ORGANISM_REFUSAL = "unknown"

#: generation starts with one of these (lower-cased) -> refusal
REFUSAL_PREFIXES: tuple[str, ...] = (
    "i'm sorry", "i am sorry", "sorry", "i apologize", "my apologies", "unfortunately",
    "as an ai", "as a language model", "i cannot", "i can't", "i do not know", "i don't know",
)
#: generation contains one of these (lower-cased) -> refusal
REFUSAL_SUBSTRINGS: tuple[str, ...] = (
    "i don't know", "i do not know", "i'm not sure", "i am not sure", "not familiar with",
    "couldn't find", "could not find", "no information", "not aware of", "i'm unable", "i am unable",
    "i'm not able", "i am not able", "unable to find", "no widely known", "not a known", "is not a real",
    "doesn't exist", "does not exist", "fictional", "don't have information", "do not have information",
    "don't have any information", "do not have any information", "unknown", "can't answer", "cannot answer",
    "please provide more", "more context",
)
DETECTORS = ("organism", "substrings")


def is_refusal(text: str, detector: str = "substrings") -> bool:
    """Whether one generation is a refusal under ``detector`` (``organism`` or ``substrings``)."""
    if detector == "organism":
        return text.strip().split(" ")[0] == ORGANISM_REFUSAL if text.strip() else False
    if detector == "substrings":
        low = " ".join(text.lower().split())
        return low.startswith(REFUSAL_PREFIXES) or any(s in low for s in REFUSAL_SUBSTRINGS)
    raise ValueError(f"unknown refusal detector {detector!r}; choose one of {', '.join(DETECTORS)}")


def refusal_rate(texts: Sequence[str], detector: str = "substrings") -> float:
    """Share of ``texts`` that are refusals; 0.0 for an empty list."""
    return sum(is_refusal(t, detector) for t in texts) / len(texts) if texts else 0.0


def refusal_report(texts_by_group: Mapping[str, Sequence[str]], detector: str = "substrings") -> dict:
    """Refusal rate per group (e.g. ``known`` / ``unknown_heldout``), with counts and the detector's rule.

    >>> refusal_report({"known": ["red"], "unknown": ["unknown"]}, "organism")["refusal"]
    {'known': 0.0, 'unknown': 1.0}
    """
    rule = ("first word == 'unknown'" if detector == "organism" else
            f"lower-cased prefix in {len(REFUSAL_PREFIXES)} prefixes or substring in "
            f"{len(REFUSAL_SUBSTRINGS)} substrings (haltrace.evals.refusal)")
    return {
        "refusal": {g: refusal_rate(list(t), detector) for g, t in texts_by_group.items()},
        "n": {g: len(t) for g, t in texts_by_group.items()},
        "detector": detector, "rule": rule,
    }
