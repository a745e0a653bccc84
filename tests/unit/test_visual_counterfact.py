"""Visual CounterFact in its released layout (parquet with image bytes, or CSV with file names) -> PvP items,
and POPE answer files aligned by question_id (LLaVA's format) or by line (POPE's)."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from haltrace.data import PvPItem, load_fit_file, load_visual_counterfact
from haltrace.data.jsonl import DataFormatError
from haltrace.evals.formats import FormatError, score_pope_files


def _png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_parquet_rows_become_pvp_items(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"object": "banana", "correct_answer": "yellow", "incorrect_answer": "blue",
             "original_image": {"bytes": _png("yellow"), "path": None},
             "counterfact_image": {"bytes": _png("blue"), "path": None}},
            {"object": "grass", "correct_answer": "green", "incorrect_answer": "red",
             "original_image": {"bytes": _png("green"), "path": None},
             "counterfact_image": {"bytes": _png("red"), "path": None}}]
    path = tmp_path / "color-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    items = load_fit_file(path)
    assert all(isinstance(it, PvPItem) for it in items)
    assert items[0].most_question == "Answer with one word. What color are most bananas?"
    assert items[0].this_question == "Answer with one word. What color is this banana?"
    assert items[1].most_question.endswith("most grass?")  # no plural s after a final s
    assert (items[0].prior, items[0].pixel) == ("yellow", "blue")
    assert items[0].image.getpixel((0, 0)) == (0, 0, 255)  # the counterfactual image, not the original


def test_csv_size_task_and_errors(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "img" / "a.png")
    path = tmp_path / "size_rows.csv"
    path.write_text("object,correct_answer,incorrect_answer,counterfact_image\nant,elephant,ant,a.png\n")
    items = load_fit_file(path, images=tmp_path / "img")
    assert items[0].attribute == "size" and "Which is larger usually" in items[0].most_question
    assert {"elephant", "ant"} <= set(items[0].this_question.replace("?", "").replace(",", "").split())
    with pytest.raises(DataFormatError, match="does not exist"):
        load_visual_counterfact(path, task="size", images=tmp_path)
    bad = tmp_path / "bad.csv"
    bad.write_text("object,correct_answer\nant,elephant\n")
    with pytest.raises(DataFormatError, match="columns"):
        load_visual_counterfact(bad)
    with pytest.raises(DataFormatError, match="task"):
        load_visual_counterfact(path, task="shape")


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_pope_answers_by_question_id_or_by_line(tmp_path):
    q = _jsonl(tmp_path / "q.jsonl", [{"question_id": i, "image": "x.png", "text": "Is there a cat?",
                                       "label": lab} for i, lab in ((1, "yes"), (2, "no"), (3, "no"))])
    llava = _jsonl(tmp_path / "llava.jsonl", [{"question_id": 3, "text": "No."}, {"question_id": 1, "text": "Yes"},
                                              {"question_id": 2, "text": "Yes, there is."}])
    got = score_pope_files({"r": q}, {"r": llava})["r"]
    assert (got["tp"], got["fp"], got["tn"]) == (1, 1, 1)  # shuffled rows, aligned by id
    pope = _jsonl(tmp_path / "pope.jsonl", [{"question": "Is there a cat?", "answer": a} for a in ("yes", "yes", "no")])
    assert score_pope_files({"r": q}, {"r": pope})["r"]["fp"] == 1  # aligned by line
    short = _jsonl(tmp_path / "short.jsonl", [{"question_id": 1, "text": "Yes"}])
    with pytest.raises(FormatError, match="no answer for 2"):
        score_pope_files({"r": q}, {"r": short})
