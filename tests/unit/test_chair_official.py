"""CHAIR with the official rules (``LisaAnne/Hallucination`` ``utils/chair.py``) and COCO-file ground truth.

Each golden caption's expected objects are derived by hand from ``chair.py``'s ``caption_to_words``:
lower-case -> ``nltk.word_tokenize`` -> ``pattern.en.singularize`` per token -> merge bigrams through
``double_word_dict`` (left to right) -> drop "seat" when "toilet" is present -> keep tokens that are entries of
``synonyms.txt`` split on ", " -> map each to its line's first entry (repeats kept).
"""

from __future__ import annotations

import json
import re

import pytest

from haltrace.data.chair_rules import (
    COCO_SYNONYMS,
    OFFICIAL_DOUBLE_WORDS,
    chair_scores,
    identity_table,
    official_caption_words,
    parse_caption,
    read_synonym_table,
    singularize,
    tokenize,
)
from haltrace.evals import formats
from haltrace.evals.coco import load_coco_ground_truth, score_chair
from haltrace.evals.formats import FormatError, _image_key

GOLDEN = [
    # "dogs" -> "dog" (pattern's final "-s" rule); "frisbee" is its own class; "two", "are", ... are not entries
    ("Two dogs are playing with a frisbee.", ["dog", "frisbee"]),
    # "men" -> "man" (irregular) and "woman" are person synonyms; "bus" -> "bu" (final "-s" rule), no entry
    ("Two men and a woman standing near a bus.", ["person", "person"]),
    # "women" ends in the irregular "men" -> "woman" -> person; "horses" -> "horse"
    ("A group of women riding horses.", ["person", "horse"]),
    # "baby elephant" / "adult giraffe" are double words mapped to the animal, so no "person" from baby/adult
    ("A baby elephant walking next to an adult giraffe.", ["elephant", "giraffe"]),
    # "passenger train" -> "train", so "passenger" (a person synonym) does not fire
    ("A passenger train pulling into the station.", ["train"]),
    # "toilet seat" -> "toilet": the seat is not read as chair
    ("A white toilet seat in a bathroom.", ["toilet"]),
    # "toilet" and "seat" both present -> every "seat" dropped; "chair" still counts
    ("The seat of the toilet is up next to a chair.", ["toilet", "chair"]),
    # "hot dog" is a double word and its own class; "man" -> person
    ("A man eating a hot dog.", ["person", "hot dog"]),
    # "motor bike" merges, but the table's entry is " motor bike" (double space after "scooter,"): not counted
    ("A man riding a motor bike.", ["person"]),
    # "bow tie" -> "tie" (assigned after the compounds, so it wins over "bow tie" -> "bow tie")
    ("A man wearing a bow tie.", ["person", "tie"]),
    # "tracks" -> "track"; "train track" merges into a non-entry, so only the first "train" counts
    ("A train on the train tracks.", ["train"]),
    # "glasses" -> "glass" ("-sses" rule) -> "wine glass"; "table" -> dining table
    ("Two wine glasses on a table.", ["wine glass", "dining table"]),
    # "glass" -> "glas" (final "-s" rule) -> "wine glas" -> "wine glass" (the table's own fix-up)
    ("A wine glass.", ["wine glass"]),
    # "phones" -> "phone" -> "cell phone"; "desk" -> dining table
    ("Two cell phones on a desk.", ["cell phone", "dining table"]),
    # repeats are counted
    ("A dog and another dog chase a dog.", ["dog", "dog", "dog"]),
    # "buses" -> "bus" ("(bus)es" rule): the plural counts while the singular does not
    ("Two buses parked on a street.", ["bus"]),
    # "people" -> "person"; "skis" -> "ski" -> skis
    ("People on skis.", ["person", "skis"]),
    # sentence split: "dog." must not stay one token
    ("A dog. A cat.", ["dog", "cat"]),
    # "knives" -> "knife" ("-ives" rule); "plate" is not a COCO entry
    ("Knives and forks on a plate.", ["knife", "fork"]),
    # "children" -> "child" -> person; "bears" -> "bear", "teddy bear" merges
    ("Children playing with teddy bears.", ["person", "teddy bear"]),
    # the table's "iPhone" is capitalised and never matches the lower-cased caption
    ("A man holding an iPhone.", ["person"]),
    # "tennis" -> "tenni", so no "tennis racket" bigram; "racket" alone maps to tennis racket
    ("A tennis racket.", ["tennis racket"]),
    # "stove top oven" is three words; the bigram pass never sees it: "stove" and "oven" each count as oven
    ("A stove top oven.", ["oven", "oven"]),
    # "canoes" -> "cano", "doggies"/"collies" are returned unchanged, "ties" -> "ty": none is an entry
    ("Canoes and doggies and collies and ties.", []),
    # "mice" -> "mouse"; "laptop computer" merges and is a laptop entry
    ("Two mice next to a keyboard and a laptop computer.", ["mouse", "keyboard", "laptop"]),
    # "policemen" ends in "men" -> "policeman"; "signs" -> "sign", "stop sign" merges
    ("Policemen near a fire hydrant and stop signs.", ["person", "fire hydrant", "stop sign"]),
    # " cheesecake" has a leading space in the table, so only "cake" counts
    ("A piece of cheesecake next to a cake.", ["cake"]),
    # "locomotives" -> "locomotive" (train), "calves" -> "calf" (cow), "stoves" -> "stove" (oven),
    # "gloves" -> "glove", then "baseball glove" merges
    ("Locomotives and calves and stoves and baseball gloves.", ["train", "cow", "oven", "baseball glove"]),
]


@pytest.fixture(scope="module")
def coco_table():
    return read_synonym_table()


@pytest.mark.parametrize("caption,expected", GOLDEN)
def test_golden_captions_official(caption, expected, coco_table):
    assert parse_caption(caption, coco_table) == expected


def test_surface_words_and_simple_rules_differ(coco_table):
    words, canonical = official_caption_words("Two puppies on a bench, a baby and a toilet seat.", coco_table)
    assert words == ["puppy", "bench", "baby", "toilet"] and canonical == ["dog", "bench", "person", "toilet"]
    # the simple rules neither singularise nor apply the qualifier rules
    assert parse_caption("Two dogs and a baby elephant.", coco_table, rules="simple") == ["person", "elephant"]
    with pytest.raises(ValueError, match="official"):
        parse_caption("a dog", coco_table, rules="nope")


@pytest.mark.parametrize("word,expected", [
    ("dogs", "dog"), ("men", "man"), ("women", "woman"), ("people", "person"), ("children", "child"),
    ("glasses", "glass"), ("glass", "glas"), ("bus", "bu"), ("buses", "bus"), ("ties", "ty"), ("tie", "tie"),
    ("doggies", "doggies"), ("canoes", "cano"), ("scissors", "scissors"), ("skis", "ski"), ("mice", "mouse"),
    ("knives", "knife"), ("geese", "goose"), ("oxen", "ox"), ("puppies", "puppy"), ("benches", "bench"),
    ("sheep", "sheep"), ("luggage", "luggage"), ("bisons", "bison"), ("trolleys", "trolley"),
])
def test_singularize_matches_pattern_en(word, expected):
    # expected values are pattern.en 3.6's singularize (its rules read by hand, quirks included)
    assert singularize(word) == expected


def test_tokenizer_and_synonym_table_quirks(coco_table):
    assert tokenize("a dog. two cats, a hot-dog!") == ["a", "dog", ".", "two", "cats", ",", "a", "hot-dog", "!"]
    assert len(COCO_SYNONYMS.read_text().splitlines()) == 80 and len(coco_table.canonical) == 80
    assert " motor bike" in coco_table.words and "motor bike" not in coco_table.words
    assert "iPhone" in coco_table.words and coco_table.inverse["desk"] == "dining table"
    simple = read_synonym_table(rules="simple")  # stripped and lower-cased, as formats.read_synonyms
    assert simple.inverse["motor bike"] == "motorcycle" and "iphone" in simple.words
    assert OFFICIAL_DOUBLE_WORDS["bow tie"] == "tie" and OFFICIAL_DOUBLE_WORDS["baby cub"] == "cub"
    assert OFFICIAL_DOUBLE_WORDS["passenger jet"] == "jet" and OFFICIAL_DOUBLE_WORDS["train track"] == "train track"


def test_chair_scores_official(coco_table):
    m = chair_scores(["Two dogs and two cats.", "A man on a bus."], [{"dog"}, {"person", "bus"}], coco_table)
    # caption 1: dog, cat -> cat hallucinated; caption 2: person ("bus" is not counted)
    assert (m["mentions"], m["hallucinated"], m["n"]) == (3, 1, 2)
    assert m["chair_i"] == pytest.approx(1 / 3) and m["chair_s"] == 0.5
    assert m["recall"] == pytest.approx(2 / 3) and m["hallucinated_words"] == {"cat": 1}


# ------------------------------------------------------------------------------------ COCO-format files
def _write_coco(folder, split, images, categories, instances, captions):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"instances_{split}.json").write_text(json.dumps({
        "images": images, "categories": categories,
        "annotations": [{"id": i, "image_id": im, "category_id": c} for i, (im, c) in enumerate(instances)]}))
    (folder / f"captions_{split}.json").write_text(json.dumps({
        "images": images,
        "annotations": [{"id": i, "image_id": im, "caption": c} for i, (im, c) in enumerate(captions)]}))
    return folder


@pytest.fixture()
def coco_dir(tmp_path):
    images = [{"id": 391895, "file_name": "COCO_val2014_000000391895.jpg"},
              {"id": 42, "file_name": "COCO_val2014_000000000042.jpg"},
              {"id": 7, "file_name": "COCO_val2014_000000000007.jpg"}]
    categories = [{"id": 1, "name": "person"}, {"id": 2, "name": "bicycle"}, {"id": 4, "name": "motorcycle"},
                  {"id": 18, "name": "dog"}]
    instances = [(391895, 1), (391895, 4), (391895, 1), (42, 18)]
    captions = [(391895, "A man with a red helmet on a small moped on a dirt road."),
                (391895, "A man riding a motor bike past bicycles."),
                (42, "Two puppies sleeping on a couch."),
                (7, "A kitchen with a stove top oven.")]
    return _write_coco(tmp_path / "annotations", "val2014", images, categories, instances, captions)


def test_coco_ground_truth_adds_caption_mentions(coco_dir):
    truth = load_coco_ground_truth(coco_dir)
    assert truth.synonyms.startswith("coco") and truth.rules == "official"
    # instances: person, motorcycle; captions add "bicycles" -> bicycle ("moped" is motorcycle already)
    assert truth.objects[391895] == {"person", "motorcycle", "bicycle"}
    # instances: dog; captions: "puppies" -> dog, and the couch the annotations do not have
    assert truth.objects[42] == {"dog", "couch"}
    assert truth.objects[7] == {"oven"}  # no instance annotations: captions only
    assert truth.file_names[42] == "COCO_val2014_000000000042.jpg"
    assert truth.ids_by_file_name["COCO_val2014_000000391895.jpg"] == 391895

    caps = {42: "A dog on a couch next to a cat.", "COCO_val2014_000000391895.jpg": "A man on a bicycle.",
            "7": "An oven and an oven."}
    m = score_chair(caps, truth)
    # 42: dog, couch, cat (not in truth); 391895: person, bicycle; 7: oven twice (repeats count)
    assert (m["mentions"], m["hallucinated"], m["n"]) == (7, 1, 3)
    assert m["chair_s"] == pytest.approx(1 / 3) and m["chair_i"] == pytest.approx(1 / 7)
    assert m["recall"] == pytest.approx(5 / 6)  # motorcycle is the one truth object not mentioned
    assert m["rules"] == "official" and m["synonyms"] == truth.synonyms and m["tokenizer"]
    for key in (42, "42", "COCO_val2014_000000000042.jpg", "val2014/COCO_val2014_000000000042.jpg",
                "000000000042.jpg"):  # the last: a 2017-style name, matched by its number
        assert truth.image_id(key) == 42
    assert truth.image_id(8) is None and truth.image_id("caption_0008.png") is None
    with pytest.raises(FormatError, match="not in"):
        score_chair({999: "A dog."}, truth)
    limited = load_coco_ground_truth(coco_dir, split="val2014", image_ids=[42])
    assert limited.objects == {42: {"dog", "couch"}}


def test_coco_splits_combine_like_chair_py(coco_dir):
    # chair.py unions train2014 and val2014; a list of splits does the same
    _write_coco(coco_dir, "train2014", [{"id": 9, "file_name": "COCO_train2014_000000000009.jpg"}],
                [{"id": 18, "name": "dog"}], [(9, 18)], [(9, "A dog on a surfboard.")])
    truth = load_coco_ground_truth(coco_dir, split=["val2014", "train2014"])
    assert truth.objects[9] == {"dog", "surfboard"} and truth.objects[42] == {"dog", "couch"}
    assert truth.image_id("COCO_train2014_000000000009.jpg") == 9 and len(truth.files) == 4


def test_non_coco_categories_are_their_own_vocabulary(tmp_path):
    names = ["fork", "knife", "cup", "plate", "ball", "strawberry", "banana"]
    folder = _write_coco(tmp_path / "organism", "test", [{"id": i, "file_name": f"caption_{i:04d}.png"}
                                                          for i in (0, 7)],
                         [{"id": i + 1, "name": n} for i, n in enumerate(names)], [(0, 1), (0, 4), (7, 6)],
                         [(7, "A strawberry and a cup.")])
    truth = load_coco_ground_truth(folder)
    assert truth.synonyms == "category names" and set(truth.table.canonical) == set(names)
    assert truth.objects == {0: {"fork", "plate"}, 7: {"strawberry", "cup"}}
    caps = {"caption_0000.png": "Two forks, a knife and plates.", 7: "A strawberry."}
    official = score_chair(caps, truth)
    assert (official["mentions"], official["hallucinated"]) == (4, 1)  # fork, knife (bad), plate; strawberry
    simple = score_chair(caps, truth, rules="simple")  # no singularising: "forks", "plates" are not counted
    assert (simple["mentions"], simple["hallucinated"], simple["rules"]) == (2, 1, "simple")
    assert load_coco_ground_truth(folder, rules="simple").objects == truth.objects


def test_coco_errors_name_the_paths(tmp_path, coco_dir):
    missing = tmp_path / "nowhere"
    with pytest.raises(FormatError, match=f"{re.escape(str(missing))}.*instances_val2014.json"):
        load_coco_ground_truth(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "instances_val2014.json").write_text("{}")
    with pytest.raises(FormatError, match=f"{re.escape(str(empty))}.*captions_val2014.json"):
        load_coco_ground_truth(empty)
    with pytest.raises(FormatError, match="captions_val2014.json"):
        load_coco_ground_truth(empty, split="val2014")
    (coco_dir / "instances_train2014.json").write_text("{}")
    (coco_dir / "captions_train2014.json").write_text("{}")
    with pytest.raises(FormatError, match=r"several splits \['train2014', 'val2014'\]"):
        load_coco_ground_truth(coco_dir)
    with pytest.raises(FormatError, match="instances_train2014.json lacks"):
        load_coco_ground_truth(coco_dir, split=["val2014", "train2014"])
    syn = tmp_path / "syn.txt"
    syn.write_text("dog, puppy\n")
    with pytest.raises(FormatError, match="not in the synonym table"):
        load_coco_ground_truth(coco_dir, split="val2014", synonyms=syn)
    with pytest.raises(FileNotFoundError, match="gone.txt"):
        load_coco_ground_truth(coco_dir, split="val2014", synonyms=tmp_path / "gone.txt")


# ------------------------------------------------------------------------- formats: image keys, rules=
@pytest.mark.parametrize("key,objects,expected", [
    ("0", ["caption_0000.png", "caption_0001.png"], "caption_0000.png"),    # "0000".lstrip("0") was ""
    (0, ["caption_0000.png"], "caption_0000.png"),
    ("7", ["caption_0007.png", "caption_0017.png"], "caption_0007.png"),
    ("391895", ["COCO_val2014_000000391895.jpg"], "COCO_val2014_000000391895.jpg"),  # "2014" was read too
    (391895, ["COCO_val2014_000000391895.jpg"], "COCO_val2014_000000391895.jpg"),
    ("000391895", ["391895"], "391895"),
    ("COCO_val2014_000000391895.jpg", ["391895"], "391895"),
    ("caption_0003.png", ["caption_0003.png"], "caption_0003.png"),
    ("1", ["a_1.png", "b_1.png"], None),  # ambiguous
    ("5", ["caption_0004.png"], None),
])
def test_image_key(key, objects, expected):
    assert _image_key(key, dict.fromkeys(objects, [])) == expected


def test_score_chair_files_rules(tmp_path):
    caps = formats.write_captions(tmp_path / "caps.jsonl", {0: "Two dogs and a cat.", 1: "A man."})
    objs = formats.write_objects(tmp_path / "objects.json", {"caption_0000.png": ["dog"],
                                                             "caption_0001.png": ["person"]})
    simple = formats.score_chair_files(caps, objs, COCO_SYNONYMS)
    official = formats.score_chair_files(caps, objs, COCO_SYNONYMS, rules="official")
    assert simple["rules"] == "simple" and official["rules"] == "official"
    assert (simple["mentions"], simple["hallucinated"]) == (2, 1)   # cat, person: "dogs" is not singularised
    assert (official["mentions"], official["hallucinated"]) == (3, 1)  # dog, cat, person
    no_syn = formats.score_chair_files(caps, objs, rules="official")  # vocabulary = ground-truth objects
    assert (no_syn["mentions"], no_syn["hallucinated"], no_syn["synonyms"]) == (1, 0, None)  # "man" is no entry
    assert chair_scores(["Two dogs."], [["dog"]], identity_table(["dog"]))["chair_i"] == 0.0
    with pytest.raises(FormatError, match="gone.txt"):
        formats.score_chair_files(caps, objs, tmp_path / "gone.txt", rules="official")
    with pytest.raises(ValueError, match="unknown CHAIR rules"):
        formats.score_chair_files(caps, objs, rules="nope")
