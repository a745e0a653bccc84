"""How a generated answer is compared with an item's reference answer (PvP's official rules), and the
per-item counts built on it.

It sits in the data layer because the rules belong to the items (a :class:`~haltrace.data.PvPItem`'s ``prior``
and ``pixel`` answers): steering methods use them to choose a layer, evaluations to score
(:mod:`haltrace.evals.counterfactual` re-exports every name here).

Answers are compared as PvP's official code compares them (``task_vectors_inference_WK_CF.py``,
``count_flips``): the *whole* answer, lower-cased, ``_`` read as a space and punctuation dropped, equals the
target or one of the target's near colours in the official synonym map (:data:`COLOUR_SYNONYMS`).

>>> answer_matches("Yellow.", "yellow"), answer_matches("gold", "yellow"), answer_matches("yellow banana", "yellow")
(True, True, False)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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


# ------------------------------------------------------------------------------------------- yes/no (POPE)
#: POPE's official negative words (RUCAIBox/POPE ``evaluate.py``)
NEGATIVE_WORDS = ("No", "not", "no")


def parse_pope_answer(text: str) -> str:
    """The official POPE parse: keep the text before the first ".", drop commas, split on single spaces; "no"
    if any word equals "No", "not" or "no", else "yes" (an empty or odd answer counts as yes).

    >>> parse_pope_answer("No, there is not."), parse_pope_answer("There is a cat.")
    ('no', 'yes')
    """
    head = text.split(".")[0].replace(",", "")
    return "no" if any(word in NEGATIVE_WORDS for word in head.split(" ")) else "yes"


def parse_starts_with_yes(text: str) -> str:
    """LVLM-LP's parse (``eval_pope``): 'yes' iff the stripped, lower-cased answer starts with "yes"."""
    return "yes" if text.strip().lower().startswith("yes") else "no"
