"""POPE metrics with the official answer-parsing rule (RUCAIBox/POPE ``evaluate.py``).

Parsing, in order: keep the text before the first ".", delete commas, split on single spaces; the answer is
"no" if any word *equals* "No", "not" or "no", otherwise "yes" (so an empty or odd answer counts as yes).
Positive class = yes.

>>> pope_metrics(["Yes", "no", "No, there is not."], ["yes", "no", "yes"])["recall"]
0.5
"""

from __future__ import annotations

from collections.abc import Sequence

NEGATIVE_WORDS = ("No", "not", "no")


def parse_pope_answer(text: str) -> str:
    """The official POPE parse: 'yes' or 'no'."""
    head = text.split(".")[0].replace(",", "")
    return "no" if any(word in NEGATIVE_WORDS for word in head.split(" ")) else "yes"


def pope_metrics(answers: Sequence[str], labels: Sequence[str], *, parsed: bool = False) -> dict[str, float]:
    """Accuracy, precision, recall, F1, yes-ratio (and the raw counts) for one POPE split.

    ``answers`` are raw model outputs (parsed with the official rule) unless ``parsed=True``.
    Unlike the official script, a zero denominator gives 0.0 instead of raising.
    """
    if len(answers) != len(labels):
        raise ValueError(f"{len(answers)} answers but {len(labels)} labels: they are aligned by order")
    if not labels:
        raise ValueError("no POPE questions to score")
    bad = sorted({lab for lab in labels if lab not in ("yes", "no")})
    if bad:
        raise ValueError(f"POPE labels must be 'yes' or 'no', got {bad}")
    preds = list(answers) if parsed else [parse_pope_answer(a) for a in answers]
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
        "tp": tp, "fp": fp, "tn": tn, "fn": fn, "n": n,
    }
