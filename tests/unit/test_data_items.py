"""The JSONL formats of the typed items (docs/data-formats.md): round trips of every kind, kind inference, and
errors that name the file, the line and the field."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from haltrace.data import (
    KINDS,
    CaptionItem,
    CaptionPair,
    DataFormatError,
    EntityQuestion,
    ImageError,
    PvPItem,
    Statement,
    VQAQuestion,
    YesNoQuestion,
    load_items,
    open_image,
    save_items,
)
from haltrace.data.jsonl import item_from_row, item_to_row


def _png(folder: Path, name: str, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(folder / name, format="PNG")
    return folder / name


def _items() -> list:
    """One item of every kind, every optional field set (and one with only the required fields)."""
    return [
        YesNoQuestion("is there a knife ?", "yes", "a.png", question_id=7, image_id=1, object="knife",
                      category="adversarial"),
        YesNoQuestion("is there a fork ?", "no", "a.png"),
        VQAQuestion("what colour is the cup ?", "blue", "b.png", question_id="q-2", image_id="img-b"),
        CaptionItem("c.png", ["cup", "knife"], image_id=3, prompt="Describe the image."),
        CaptionItem("c.png"),
        CaptionPair("d.png", "a cup", "a cup and a saucer", image_id=4, prompt="caption :"),
        PvPItem("e.png", "what colour is this banana ?", "what colour are most bananas ?", prior="yellow",
                pixel="purple", image_id=5, attribute="color"),
        EntityQuestion("who wrote Hamlet ?", True, answer="Shakespeare", entity="Hamlet", question_id=9),
        EntityQuestion("who wrote Zorblax ?", False),
        Statement("Paris is the capital of France.", True, statement_id=1),
        Statement("The sun is cold.", False),
    ]


def test_every_kind_is_covered():
    assert {it.kind for it in _items()} == set(KINDS)


def test_round_trip_every_kind_with_an_images_folder(tmp_path):
    images = tmp_path / "images"
    for seed, name in enumerate("abcde"):
        _png(images, f"{name}.png", seed)
    items = _items()
    path = save_items(tmp_path / "data" / "items.jsonl", items)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["type"] for r in rows] == [it.kind for it in items]  # "type" first on every row
    assert all(next(iter(r)) == "type" for r in rows)
    assert "question_id" not in rows[1] and rows[4]["objects"] == []  # None fields left out, [] kept
    assert rows[8]["known"] is False and rows[10]["label"] is False  # false booleans are written

    loaded = load_items(path, images=images)
    assert [type(it) for it in loaded] == [type(it) for it in items]
    for before, after in zip(items, loaded, strict=True):
        for f in fields(before):
            want = getattr(before, f.name)
            if f.name == "image" and want is not None:
                want = images / want  # resolved against --images
            assert getattr(after, f.name) == want, (before.kind, f.name)
    assert all(isinstance(it.image, Path) and it.image.is_file() for it in loaded if hasattr(it, "image"))
    assert open_image(loaded[0].image).size == (8, 8)

    # a second round trip writes the resolved (absolute) paths, which load from anywhere
    again = load_items(save_items(tmp_path / "elsewhere" / "copy.jsonl", loaded))
    assert again == loaded


def test_in_memory_images_are_saved_by_name(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    items = [YesNoQuestion("is there a cup ?", "yes", Image.fromarray(pixels)), Statement("a is a", True)]
    with pytest.raises(DataFormatError, match="in-memory image"):
        save_items(tmp_path / "x.jsonl", items)
    with pytest.raises(ValueError, match="2 items but 1 image names"):
        save_items(tmp_path / "x.jsonl", items, ["q.png"])
    items[0].image.save(tmp_path / "q.png")
    path = save_items(tmp_path / "x.jsonl", items, ["q.png", None])
    loaded = load_items(path)  # no --images: relative to the JSONL file's folder
    assert loaded[0].image == tmp_path / "q.png"
    assert np.array_equal(np.asarray(open_image(loaded[0].image)), pixels)
    assert loaded[1] == items[1]


def test_kind_inference_from_keys(tmp_path):
    _png(tmp_path / "val2014", "COCO_val2014_000000000042.jpg")
    pope = {"question_id": 1, "image": "COCO_val2014_000000000042.jpg", "text": "Is there a dog in the image?",
            "label": "yes"}
    path = tmp_path / "coco_pope_adversarial.json"  # released POPE files are JSONL whatever their suffix
    path.write_text(json.dumps(pope) + "\n\n" + json.dumps({**pope, "question_id": 2, "label": "No"}) + "\n")
    first, second = load_items(path, images=tmp_path / "val2014")
    assert isinstance(first, YesNoQuestion) and first.question == pope["text"] and first.question_id == 1
    assert first.image == tmp_path / "val2014" / pope["image"] and first.present
    assert second.label == "no" and not second.present  # labels are normalised

    inferred = {
        "yesno": {"question": "is there a cup ?", "label": "no"},
        "vqa": {"question": "what colour ?", "answer": "red"},
        "caption": {"image": "x.png", "objects": ["cup"]},
        "caption_pair": {"image": "x.png", "truthful": "a cup", "hallucinated": "a cup and a fork"},
        "pvp": {"image": "x.png", "this_question": "this ?", "most_question": "most ?"},
        "entity": {"question": "who ?", "known": True},
        "statement": {"statement": "a is a", "label": True},
    }
    for kind, row in inferred.items():
        item = item_from_row(row, check_images=False)
        assert item.kind == kind, row
        assert item_from_row(item_to_row(item), check_images=False) == item
    # "type" wins over the keys: a caption without objects, a vqa row that also holds a label
    assert item_from_row({"type": "caption", "image": "x.png"}, check_images=False).objects == []
    assert isinstance(item_from_row({"type": "vqa", "question": "q ?", "answer": "a", "label": "yes"}),
                      VQAQuestion)


def test_kinds_filter(tmp_path):
    path = save_items(tmp_path / "s.jsonl", [Statement("a is a", True)])
    with pytest.raises(DataFormatError, match=r"s\.jsonl:1: a statement item, but this file takes yesno items"):
        load_items(path, kinds=("yesno",))


def _write(tmp_path: Path, *lines: str | dict) -> Path:
    path = tmp_path / "bad.jsonl"
    path.write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines))
    return path


GOOD = {"question": "is there a cup ?", "label": "yes"}


@pytest.mark.parametrize(("bad", "message"), [
    ('{"question": "is there a cup ?", "label": "yes"', "bad.jsonl:2 is not valid JSON"),
    ("[1, 2]", "bad.jsonl:2 holds a list, expected a JSON object"),
    ('"a string"', "bad.jsonl:2 holds a str"),
    ({"type": "yesno", "label": "yes"}, r"bad.jsonl:2: a yesno item needs field\(s\) \['question'\]"),
    ({"question": "q ?", "label": None}, r"bad.jsonl:2: a yesno item needs field\(s\) \['label'\]"),
    ({"type": "caption_pair", "image": "x.png", "truthful": "a"}, r"needs field\(s\) \['hallucinated'\]"),
    ({"question": "q ?", "label": "maybe"}, "bad.jsonl:2: field 'label' must be \"yes\" or \"no\", got 'maybe'"),
    ({"question": "q ?", "label": True}, "bad.jsonl:2: field 'label' must be \"yes\" or \"no\", got True"),
    ({"question": "q ?", "label": ["yes"]}, r"bad.jsonl:2: field 'label' must be \"yes\" or \"no\", got \['yes'\]"),
    ({"question": "q ?", "label": {"yes": 1}}, "bad.jsonl:2: field 'label' must be \"yes\" or \"no\", got {'yes'"),
    ({"question": "  ", "label": "no"}, "bad.jsonl:2: field 'question' of a yesno item must be a non-empty string"),
    ({"question_id": 3, "text": "", "label": "no"}, "bad.jsonl:2: field 'text' of a yesno item must be a non-empty"),
    ({"question": "q ?", "answer": 3}, "bad.jsonl:2: field 'answer' of a vqa item must be a non-empty string"),
    ({"type": "caption", "image": "x.png", "objects": "cup"}, "bad.jsonl:2: field 'objects' must be a list"),
    ({"type": "caption", "image": "x.png", "objects": ["cup", 3]}, "bad.jsonl:2: field 'objects' must be a list"),
    ({"statement": "a is a", "label": "true"}, "bad.jsonl:2: field 'label' must be true or false"),
    ({"question": "who ?", "known": 1}, "bad.jsonl:2: field 'known' must be true or false"),
    ({"question": "q ?", "label": "no", "image": 5}, "bad.jsonl:2: field 'image' must be a file name"),
    ({"type": "yesno_question", "question": "q ?", "label": "no"}, 'bad.jsonl:2: cannot tell the item kind.*"type"'),
    ({"type": ["yesno"], "question": "q ?", "label": "no"}, "bad.jsonl:2: cannot tell the item kind"),
    ({"question_id": 1, "image": "x.png"}, r"bad.jsonl:2: cannot tell the item kind \(keys \['image', 'question_id'\]"),
])
def test_errors_name_file_line_and_field(tmp_path, bad, message):
    path = _write(tmp_path, GOOD, bad)
    with pytest.raises(DataFormatError, match=message):
        load_items(path, check_images=False)


def test_missing_image_error_mentions_images_option(tmp_path):
    path = _write(tmp_path, {**GOOD, "image": "missing.png"})
    with pytest.raises(DataFormatError, match=r"bad.jsonl:1: field 'image' names .*missing.png, which does not "
                                              r"exist \(no --images DIR given"):
        load_items(path)
    (tmp_path / "val2014").mkdir()
    with pytest.raises(DataFormatError, match=r"val2014.missing.png, which does not exist \(looked in --images"):
        load_items(path, images=tmp_path / "val2014")
    with pytest.raises(DataFormatError, match="--images .*nowhere is not a folder"):
        load_items(path, images=tmp_path / "nowhere")
    assert load_items(path, check_images=False)[0].image == tmp_path / "missing.png"
    absolute = _png(tmp_path / "elsewhere", "abs.png")
    path = _write(tmp_path, {**GOOD, "image": str(absolute)})
    assert load_items(path, images=tmp_path / "val2014")[0].image == absolute  # absolute paths are kept


def test_file_level_errors(tmp_path):
    with pytest.raises(DataFormatError, match=r"nope\.jsonl not found"):
        load_items(tmp_path / "nope.jsonl")
    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes(json.dumps(GOOD).encode() + b"\n" + '{"question": "caf\u00e9 ?", "label": "no"}'
                      .encode("latin-1") + b"\n")
    with pytest.raises(DataFormatError, match=r"latin1\.jsonl:2 is not UTF-8 text .*save it as UTF-8"):
        load_items(latin)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataFormatError, match=r"empty\.jsonl holds no items"):
        load_items(empty)
    empty.write_text("\n  \n\n")
    with pytest.raises(DataFormatError, match="holds no items"):
        load_items(empty)


def test_tolerated_variants(tmp_path):
    """A byte-order mark, CRLF line ends and U+2028 inside a string (raw, as JSON allows) all load."""
    path = tmp_path / "windows.jsonl"
    raw = '{"question": "is there a cup\u2028?", "label": "yes"}'
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\r\n" + raw.encode() + b"\r\n")
    first, second = load_items(path)
    assert first == YesNoQuestion(**GOOD) and second.question == "is there a cup\u2028?"


def test_open_image_errors_name_the_file(tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")
    with pytest.raises(ImageError, match=r"image .*corrupt\.png cannot be read"):
        open_image(corrupt)
    with pytest.raises(ImageError, match=r"image .*absent\.png not found; pass --images DIR"):
        open_image(str(tmp_path / "absent.png"))
    with pytest.raises(ImageError, match="cannot use a ndarray as an image"):
        open_image(np.zeros((4, 4), dtype=np.uint8))
    grey = Image.new("L", (3, 3))
    assert open_image(grey).mode == "RGB" and open_image(None) is None
