"""POPE metrics with the official answer-parsing rule (RUCAIBox/POPE ``evaluate.py``).

Parsing, in order: keep the text before the first ".", delete commas, split on single spaces; the answer is
"no" if any word *equals* "No", "not" or "no", otherwise "yes" (so an empty or odd answer counts as yes).
Positive class = yes.

A second parser, LVLM-LP's ("the lower-cased answer starts with 'yes'"), is available as ``parser="lvlm-lp"``;
the two disagree on e.g. "There is a cat." (official: yes, LVLM-LP: no). Every report records its parser.

>>> pope_metrics(["Yes", "no", "No, there is not."], ["yes", "no", "yes"])["recall"]
0.5
>>> pope_metrics(["There is a cat."], ["yes"], parser="lvlm-lp")["recall"]
0.0
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

# the answer rules live with the items (the data layer), so methods can score fit sets with them too
from haltrace.data.answers import NEGATIVE_WORDS, parse_pope_answer, parse_starts_with_yes  # noqa: F401

SPLITS = ("random", "popular", "adversarial")


#: parser name -> function; the name is recorded in every metrics dict under ``"parser"``.
PARSERS: dict[str, Callable[[str], str]] = {"official": parse_pope_answer, "lvlm-lp": parse_starts_with_yes}


def get_parser(name: str) -> Callable[[str], str]:
    """The POPE answer parser called ``name`` (``official`` or ``lvlm-lp``)."""
    if name not in PARSERS:
        raise ValueError(f"unknown POPE parser {name!r}; choose one of {', '.join(PARSERS)}")
    return PARSERS[name]


def pope_metrics(answers: Sequence[str], labels: Sequence[str], *, parsed: bool = False,
                 parser: str = "official") -> dict[str, float]:
    """Accuracy, precision, recall, F1, yes-ratio (and the raw counts) for one POPE split.

    ``answers`` are raw model outputs, parsed with ``parser`` (``official`` by default, or ``lvlm-lp``),
    unless ``parsed=True`` (already 'yes'/'no'; the recorded parser is then ``"none"``).
    Unlike the official script, a zero denominator gives 0.0 instead of raising.
    """
    if len(answers) != len(labels):
        raise ValueError(f"{len(answers)} answers but {len(labels)} labels: they are aligned by order")
    if not labels:
        raise ValueError("no POPE questions to score")
    bad = sorted({lab for lab in labels if lab not in ("yes", "no")})
    if bad:
        raise ValueError(f"POPE labels must be 'yes' or 'no', got {bad}")
    parse = get_parser(parser)
    preds = list(answers) if parsed else [parse(a) for a in answers]
    tp = sum(p == "yes" and lab == "yes" for p, lab in zip(preds, labels, strict=True))
    fp = sum(p == "yes" and lab == "no" for p, lab in zip(preds, labels, strict=True))
    tn = sum(p == "no" and lab == "no" for p, lab in zip(preds, labels, strict=True))
    fn = sum(p == "no" and lab == "yes" for p, lab in zip(preds, labels, strict=True))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    n = len(labels)
    return {
        "accuracy": (tp + tn) / n, "precision": precision, "recall": recall, "f1": f1,
        "yes_ratio": (tp + fp) / n, "false_yes_rate": fp / (fp + tn) if fp + tn else 0.0,
        "tp": tp, "fp": fp, "tn": tn, "fn": fn, "n": n, "parser": "none" if parsed else parser,
    }


def pope_summary(splits: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Mean F1 / accuracy / yes-ratio over the splits present (LLaVA-1.5 reports the mean F1 of the three).

    >>> pope_summary({"random": {"f1": 0.8, "accuracy": 0.8, "yes_ratio": 0.5}})["mean_f1"]
    0.8
    """
    if not splits:
        raise ValueError("no POPE splits to summarise")
    names = [s for s in SPLITS if s in splits] + sorted(s for s in splits if s not in SPLITS)
    out = {f"mean_{key}": sum(float(splits[s][key]) for s in names) / len(names)
           for key in ("f1", "accuracy", "yes_ratio")}
    out["splits"] = names  # type: ignore[assignment]
    return out
