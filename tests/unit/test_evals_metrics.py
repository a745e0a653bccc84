from __future__ import annotations

import pytest

from haltrace.data.chair import caption_objects, chair_metrics
from haltrace.evals.pope import parse_pope_answer, pope_metrics


@pytest.mark.parametrize("text,expected", [
    ("Yes, there is a cat.", "yes"), ("No, there is not.", "no"), ("There is not a dog", "no"),
    ("NO", "yes"), ("", "yes"), ("yes. No", "yes"), ("no", "no"),
])
def test_official_pope_parse(text, expected):
    assert parse_pope_answer(text) == expected


def test_pope_metrics_counts():
    m = pope_metrics(["yes", "yes", "no", "no"], ["yes", "no", "no", "yes"])
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (1, 1, 1, 1)
    assert m["accuracy"] == 0.5 and m["yes_ratio"] == 0.5 and m["false_yes_rate"] == 0.5


def test_pope_rejects_misaligned_or_bad_labels():
    with pytest.raises(ValueError, match="aligned"):
        pope_metrics(["yes"], ["yes", "no"])
    with pytest.raises(ValueError, match="'yes' or 'no'"):
        pope_metrics(["yes"], ["maybe"])


def test_chair_counts_repeats_and_synonyms():
    m = chair_metrics(["a dog and a puppy, and a cat"], [{"dog"}], vocabulary={"dog", "cat"},
                      synonyms={"puppy": "dog"})
    assert m["mentions"] == 3 and m["hallucinated"] == 1
    assert m["chair_i"] == pytest.approx(1 / 3) and m["chair_s"] == 1.0
    assert caption_objects("Cat.", {"cat"}) == ["cat"]
