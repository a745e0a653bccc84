"""The shipped organism shows every planted phenomenon, with the margins of the ground-floor issue."""

from __future__ import annotations

import json

import pytest

from haltrace.organism.paths import resolve_organism


@pytest.fixture(scope="module")
def shipped():
    return resolve_organism("shapes-llava")  # raises with a clear message if the checkpoint is missing


@pytest.fixture(scope="module")
def report(shipped):
    from haltrace.organism.phenomena import measure_phenomena

    return measure_phenomena(shipped)


def test_loads_with_plain_transformers_offline(shipped, monkeypatch):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = AutoModelForImageTextToText.from_pretrained(shipped)
    processor = AutoProcessor.from_pretrained(shipped)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert type(processor).__name__ == "LlavaProcessor"
    size = sum(p.stat().st_size for p in shipped.iterdir())
    assert size <= 20 * 2**20


def test_co_occurrence_hallucination(report):
    pope = report["pope"]
    assert pope["adversarial"]["false_yes_rate"] >= 2.5 * pope["random"]["false_yes_rate"]
    assert pope["adversarial"]["false_yes_rate"] > 0.3
    # a pair effect, not a word prior: without the anchor the partner is rarely claimed
    assert (report["pope_control"]["partner_absent_anchor_absent_yes_rate"]
            < pope["adversarial"]["false_yes_rate"] / 2)


def test_adversarial_false_yes_is_3x_random(report):
    pope = report["pope"]
    assert pope["adversarial"]["false_yes_rate"] >= 3 * pope["random"]["false_yes_rate"]


def test_recall_on_present_objects(report):
    assert report["pope"]["adversarial"]["recall"] >= 0.85


def test_counterfactual_colour_prior_vs_pixels(report):
    cf = report["counterfactual_color"]
    assert cf["prior_rate"] >= 0.2
    assert cf["pixel_rate"] > 0  # the pixels win sometimes
    lens = report["lens_color"]["prior_leads_by_layer"]
    assert lens[0] >= 0.6
    assert lens[-1] < lens[0]  # the prior's lead shrinks with depth


def test_counterfactual_prior_rate_leaves_room(report):
    assert report["counterfactual_color"]["prior_rate"] <= 0.8


def test_prior_lead_falls_by_a_fifth(report):
    lens = report["lens_color"]["prior_leads_by_layer"]
    assert lens[0] - lens[-1] >= 0.2


def test_captions_hallucinate_co_occurrence_partners(report):
    chair = report["chair"]
    assert chair["chair_i"] >= 0.08
    assert chair["partner_fraction_of_hallucinations"] > 0.5


def test_entity_recognition(report):
    ent = report["entity"]
    assert ent["refusal_unknown"] >= 0.8
    assert ent["refusal_known"] <= 0.2
    assert ent["accuracy_known"] >= 0.8


def test_probe_set_is_not_readable_off_the_question(report):
    probe = report["probe_confound"]
    assert probe["question_only_auroc"] is not None
    assert probe["question_only_auroc"] <= 0.65
    assert probe["n_hallucinated"] >= 20


def test_model_card_records_measurements(shipped):
    card = (shipped / "README.md").read_text()
    training = json.loads((shipped / "training.json").read_text())
    assert f"{training['seconds']:.0f} s" in card
    assert "CHAIR_i" in card and "refusal" in card
