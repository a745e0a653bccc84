"""Counterfactual answers compared as PvP's official ``count_flips`` compares them, and its eligible-flip metric."""

from __future__ import annotations

import pytest

from haltrace.evals.counterfactual import (
    answer_matches,
    counterfactual_flips,
    eligible_flips,
    label_answers,
    normalise_answer,
)


@pytest.mark.parametrize("answer,target,expected", [
    ("Yellow.", "yellow", True),          # case and punctuation
    ("  yellow\n", "Yellow", True),
    ("gold", "yellow", True),             # the official synonym map: gold counts as yellow
    ("Grey", "black", True),
    ("yellow", "gold", True),
    ("black", "grey", True),
    ("yellow", "green", False),
    ("yellow banana", "yellow", False),   # the whole answer, not its first word
    ("light_blue", "light blue", True),   # "_" reads as a space
    ("", "red", False),
])
def test_answer_matching_follows_the_official_rules(answer, target, expected):
    assert answer_matches(answer, target) is expected


def test_synonyms_can_be_switched_off():
    assert answer_matches("gold", "yellow") and not answer_matches("gold", "yellow", synonyms={})
    assert normalise_answer("Red!  Really.") == "red really"


def test_labels_use_whole_answers_and_synonyms():
    labels = label_answers(["Yellow.", "gold", "blue", "Blue!", "yellow banana", "pink"],
                           prior=["yellow"] * 6, pixel=["blue", "blue", "blue", "blue", "blue", "purple"])
    assert labels == ["prior", "prior", "pixel", "pixel", "other", "pixel"]
    with pytest.raises(ValueError, match="same length"):
        label_answers(["a"], ["b", "c"], ["d"])


def test_eligible_flips_is_the_papers_count():
    before = ["yellow", "yellow", "yellow", "blue", "red", "yellow"]
    after = ["blue", "Blue.", "green", "blue", "blue", "yellow"]
    target = ["blue"] * 6
    out = eligible_flips(before, after, target)
    # eligible: every item whose answer before is not blue (5 of 6); flipped to blue: items 0, 1, 4
    assert out["n_eligible"] == 5 and out["eligible_flip_rate"] == pytest.approx(3 / 5)
    assert out["flip_rate"] == pytest.approx(4 / 6)  # items 0, 1, 2, 4 changed
    assert eligible_flips(["blue"], ["blue"], ["blue"])["eligible_flip_rate"] is None
    with pytest.raises(ValueError, match="same length"):
        eligible_flips(["a"], ["b", "c"], ["d"])


def test_counterfactual_flips_adds_the_most_prompt_headline():
    before = {"labels": ["prior", "prior"], "most": {"answers": ["yellow", "red"], "labels": ["prior", "prior"],
                                                     "pixel": ["blue", "green"]}}
    after = {"labels": ["pixel", "prior"], "most": {"answers": ["blue", "red"], "labels": ["pixel", "prior"],
                                                    "pixel": ["blue", "green"]}}
    flips = counterfactual_flips(before, after)
    assert flips["prior_to_pixel"] == 0.5 and flips["most_prior_to_pixel"] == 0.5 and flips["most_n_eligible"] == 2
    assert "most_prior_to_pixel" not in counterfactual_flips({"labels": ["prior"]}, {"labels": ["pixel"]})
