"""Official-format round trips: write the files, read them back, and the metrics equal the in-memory ones."""

from __future__ import annotations

import json

import pytest

from haltrace.data.chair import chair_metrics
from haltrace.evals import formats
from haltrace.evals.counterfactual import counterfactual_rates, flip_rates, label_answers
from haltrace.evals.pope import parse_starts_with_yes, pope_metrics, pope_summary
from haltrace.evals.refusal import is_refusal, refusal_rate, refusal_report

QUESTIONS = [{"question_id": i + 1, "image": f"img{i // 2}.png", "text": f"Is there a thing {i}?",
              "label": "yes" if i % 2 == 0 else "no"} for i in range(8)]
ANSWERS = ["Yes, there is.", "No.", "There is not a cat", "Yes", "", "no", "There is a cat.", "yes it is"]


def test_pope_files_round_trip_both_parsers(tmp_path):
    q = formats.write_pope_questions(tmp_path / "pope_adversarial.jsonl", QUESTIONS)
    a = formats.write_pope_answers(tmp_path / "ans_adversarial.jsonl", QUESTIONS, ANSWERS)
    assert json.loads(a.read_text().splitlines()[0]) == {"question": QUESTIONS[0]["text"], "answer": ANSWERS[0]}
    labels = [r["label"] for r in QUESTIONS]
    for parser in ("official", "lvlm-lp"):
        scored = formats.score_pope_files({"adversarial": q}, {"adversarial": a}, parser=parser)
        assert scored["adversarial"] == pope_metrics(ANSWERS, labels, parser=parser)
        assert scored["parser"] == parser and scored["adversarial"]["parser"] == parser
    # the parsers disagree where the answer neither says no nor starts with yes
    official = formats.score_pope_files({"adversarial": q}, {"adversarial": a})["adversarial"]
    assert official["yes_ratio"] > pope_metrics(ANSWERS, labels, parser="lvlm-lp")["yes_ratio"]
    assert parse_starts_with_yes(" YES.") == "yes" and parse_starts_with_yes("There is") == "no"
    assert pope_summary({"random": official, "adversarial": official})["mean_f1"] == pytest.approx(official["f1"])


def test_pope_file_errors(tmp_path):
    q = formats.write_pope_questions(tmp_path / "q.jsonl", QUESTIONS)
    a = formats.write_pope_answers(tmp_path / "a.jsonl", QUESTIONS[:3], ANSWERS[:3])
    with pytest.raises(formats.FormatError, match="aligned by line order"):
        formats.score_pope_files({"random": q}, {"random": a})
    (tmp_path / "bad.jsonl").write_text('{"question_id": 1}\nnot json\n')
    with pytest.raises(formats.FormatError, match="lacks|not valid JSON"):
        formats.read_pope_questions(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="lvlm-lp"):
        pope_metrics(["yes"], ["yes"], parser="nope")


def test_chair_files_round_trip(tmp_path):
    syn = formats.write_synonyms(tmp_path / "synonyms.txt", {"dog": ["puppy", "pup"], "hot dog": [],
                                                              "dining table": ["table", "desk"], "cat": []})
    (tmp_path / "messy.txt").write_text("scooter,  motor bike\n\n")  # the original's double-space entry
    assert formats.read_synonyms(tmp_path / "messy.txt")[1]["motor bike"] == "scooter"
    vocab, inverse = formats.read_synonyms(syn)
    assert vocab == ["dog", "hot dog", "dining table", "cat"] and inverse["desk"] == "dining table"
    caps = {1: "A puppy eats a hot dog on a desk.", 2: "A cat and a dog.", 3: "An empty table"}
    truth = {"caption_0001.png": ["dog", "dining table"], "caption_0002.png": ["cat"],
             "caption_0003.png": ["dining table"]}
    objs = formats.write_objects(tmp_path / "objects.json", truth)
    expected = chair_metrics(list(caps.values()), list(truth.values()), vocabulary=vocab, synonyms=inverse,
                             phrases={"hot dog": "hot dog", "dining table": "dining table"})
    assert expected["hallucinated_words"] == {"dog": 1, "hot dog": 1}  # "hot dog" is not read as a dog
    for style in ("jsonl", "imgtoeval"):
        path = formats.write_captions(tmp_path / f"caps.{style}", caps, style=style)
        assert formats.read_captions(path) == {str(k): v for k, v in caps.items()}
        scored = formats.score_chair_files(path, objs, syn)
        assert {k: scored[k] for k in expected} == expected
    with pytest.raises(formats.FormatError, match="no ground truth"):
        formats.score_chair_files(path, formats.write_objects(tmp_path / "o2.json", {"x.png": []}), syn)


def test_counterfactual_and_refusal_files(tmp_path):
    items = formats.write_jsonl(tmp_path / "cf.jsonl", [{"question_id": i, "text": "what colour ?",
                                                         "prior": "yellow", "pixel": "blue"} for i in range(4)])
    answers = ["yellow", "Blue.", "red", "yellow"]
    ans = formats.write_jsonl(tmp_path / "cf_ans.jsonl", [{"question_id": i, "answer": a}
                                                          for i, a in enumerate(answers)])
    labels = label_answers(answers, ["yellow"] * 4, ["blue"] * 4)
    scored = formats.score_counterfactual_files(items, ans)
    assert scored["labels"] == labels == ["prior", "pixel", "other", "prior"]
    assert scored["prior_rate"] == counterfactual_rates(labels)["prior_rate"] == 0.5
    flips = flip_rates(labels, ["pixel", "prior", "other", "prior"])
    assert flips["prior_to_pixel"] == 0.5 and flips["pixel_to_prior"] == 1.0

    ents = formats.write_jsonl(tmp_path / "entities.jsonl", [{"question_id": 1, "text": "t", "answer": "red",
                                                              "group": g} for g in ("known", "known", "unknown")])
    ent_ans = formats.write_jsonl(tmp_path / "ent_ans.jsonl", [{"answer": a} for a in ("red", "unknown",
                                                                                       "unknown")])
    report = formats.score_refusal_files(ents, ent_ans, detector="organism")
    assert report["refusal"] == {"known": 0.5, "unknown": 1.0}
    assert report == refusal_report({"known": ["red", "unknown"], "unknown": ["unknown"]}, "organism")


@pytest.mark.parametrize("text,expected", [
    ("I'm sorry, I don't know that film.", True), ("I am not familiar with the singer X.", True),
    ("The movie was directed by Jane Doe in 1999.", False), ("Unfortunately there is no record.", True),
    ("It was released in 2001.", False),
])
def test_substring_refusal_detector(text, expected):
    assert is_refusal(text) is expected
    assert refusal_rate([text, "unknown"], detector="organism") == 0.5
