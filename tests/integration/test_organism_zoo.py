"""The zoo's two newer organisms carry their stated phenomena and mechanisms, on the shipped weights.

``shapes-llava-staged`` (staged recipe): co-occurrence margins, and the hallucinated partner carried by the image
tokens (oracle erasure lowers CHAIR_i by >= 25 %, erasing a present object's text direction removes it from at
least half of the captions). ``shapes-qwen2vl`` (joint recipe, Qwen2-VL): the co-occurrence and entity margins
of ``shapes-llava``. The erasure checks are re-measured at the cell recorded in each ``phenomena.json`` (the
grid search itself is ``haltrace organism eval``'s, about a minute per organism).
"""

from __future__ import annotations

import json

import pytest

from haltrace.organism.paths import resolve_organism

NEW = ("shapes-llava-staged", "shapes-qwen2vl")


@pytest.fixture(scope="module", params=NEW)
def organism(request):
    from haltrace.organism.phenomena import measure_phenomena

    folder = resolve_organism(request.param)
    return request.param, folder, measure_phenomena(folder, probe_layers=False)


@pytest.mark.parametrize("name", NEW)
def test_loads_with_plain_transformers_offline_within_size(name, monkeypatch):
    from transformers import AutoModelForImageTextToText

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = resolve_organism(name)
    model = AutoModelForImageTextToText.from_pretrained(folder)
    expected = "Qwen2VLForConditionalGeneration" if "qwen" in name else "LlavaForConditionalGeneration"
    assert type(model).__name__ == expected
    assert sum(p.stat().st_size for p in folder.iterdir()) <= 20 * 2**20
    training = json.loads((folder / "training.json").read_text())
    assert training["seconds"] <= 15 * 60 and training["threads"] <= 2


def test_co_occurrence_margins(organism):
    _, _, report = organism
    pope, chair = report["pope"], report["chair"]
    assert pope["adversarial"]["false_yes_rate"] >= 3 * pope["random"]["false_yes_rate"]
    assert pope["adversarial"]["recall"] >= 0.85
    assert chair["chair_i"] >= 0.08


def test_partner_share_of_hallucinations(organism):
    name, _, report = organism
    share = report["chair"]["partner_fraction_of_hallucinations"]
    assert share >= (0.8 if name == "shapes-llava-staged" else 0.5)


def test_qwen_entity_margins(organism):
    name, _, report = organism
    if name != "shapes-qwen2vl":
        pytest.skip("entity margins are required of the joint organisms only")
    ent = report["entity"]
    assert ent["refusal_unknown"] >= 0.8
    assert ent["refusal_known"] <= 0.2
    assert ent["accuracy_known"] >= 0.8


@pytest.fixture(scope="module")
def staged():
    import haltrace
    from haltrace.organism import tasks
    from haltrace.organism.paths import organism_world
    from haltrace.organism.phenomena import OrganismRunner

    folder = resolve_organism("shapes-llava-staged")
    model = haltrace.load(str(folder))
    runner = OrganismRunner(model.hf, organism_world(model))
    examples = tasks.caption_set(runner.world)
    recorded = json.loads((folder / "phenomena.json").read_text())["mechanism"]
    return model, runner, examples, runner.captions(examples), recorded


def _cell(record):
    return record["text_rep"], int(record["hook"].split(".")[1]), float(record["weight"])


def test_staged_oracle_erasure_lowers_chair_by_a_quarter(staged):
    from haltrace.organism.mechanism import MAX_RECALL_DROP, _chair, oracle_cell

    model, runner, examples, baseline, recorded = staged
    base = _chair(runner, baseline, examples)
    after = oracle_cell(model, runner, examples, *_cell(recorded["oracle_erasure"]["best"]))
    assert after["chair_i"] <= 0.75 * base["chair_i"], (base, after)
    assert base["recall"] - after["recall"] <= MAX_RECALL_DROP


def test_staged_present_object_removal_in_half_the_captions(staged):
    from haltrace.organism.mechanism import removal_cell

    model, runner, examples, baseline, recorded = staged
    rate = removal_cell(model, runner, examples, baseline, *_cell(recorded["present_removal"]["best"]))
    assert rate >= 0.5


def test_staged_model_card_has_a_mechanism_section():
    card = (resolve_organism("shapes-llava-staged") / "README.md").read_text()
    assert "## Where the hallucination lives" in card and "oracle erasure" in card
    assert "stage B" in card
