"""Visual CounterFact (Golovanevsky, Rudman et al., PvP) in its released column layout, as PvP items.

The released data (HF ``mgolov/Visual-Counterfact``, splits ``color`` and ``size``) has one row per object with
``object``, ``correct_answer`` (the world-knowledge answer: the prior), ``incorrect_answer`` (what the
counterfactual image shows: the pixels), ``original_image`` and ``counterfact_image`` (image bytes). This reader
takes the split's parquet file as downloaded, or a CSV / JSONL export with the same columns whose images are
file names (resolved against ``images``). Prompts are the official ones (``pixels_vs_priors``):

=====  ====================================================  ==================================================
task   "most" (prior) question                               "this" (pixel) question
=====  ====================================================  ==================================================
color  Answer with one word. What color are most {object}s?  Answer with one word. What color is this {object}?
size   Answer with the correct option. Which is larger       Answer with the correct option. Which is larger
       usually, {A} or {B}?                                  here, {A} or {B}?
=====  ====================================================  ==================================================

(an ``s`` is appended unless the object already ends in one; ``{A}``/``{B}`` are the two answers in an order
drawn from ``random.Random(0)``; the official scripts also seed 0, but read unreleased filtered CSVs, so the
exact A/B order per row is not reproducible from the release).

>>> items = load_visual_counterfact("color-00000-of-00001.parquet", task="color")   # doctest: +SKIP
>>> items[0].most_question                                                            # doctest: +SKIP
'Answer with one word. What color are most bananas?'
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any

from haltrace.data.items import PvPItem
from haltrace.data.jsonl import DataFormatError

COLUMNS = ("object", "correct_answer", "incorrect_answer", "counterfact_image")
TASKS = ("color", "size")


def _plural(word: str) -> str:
    return word if word.endswith("s") else word + "s"


def _rows(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:  # pragma: no cover - pyarrow comes with datasets / pandas installs
            raise DataFormatError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        return pq.read_table(path).to_pylist()
    if suffix == ".csv":
        import csv

        with open(path, encoding="utf-8", newline="") as fh:
            return list(csv.DictReader(fh))
    if suffix in (".jsonl", ".json"):
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    raise DataFormatError(f"{path}: Visual CounterFact is read from .parquet, .csv or .jsonl, not {suffix!r}")


def _image(value: Any, where: str, images: Path | None, base: Path) -> Any:
    from PIL import Image

    if isinstance(value, dict) and value.get("bytes"):  # parquet's image struct {bytes, path}
        try:
            return Image.open(io.BytesIO(value["bytes"])).convert("RGB")
        except OSError as exc:
            raise DataFormatError(f"{where}: counterfact_image bytes are not an image ({exc})") from None
    if isinstance(value, dict):
        value = value.get("path")
    if not isinstance(value, str) or not value:
        raise DataFormatError(f"{where}: counterfact_image must be image bytes or a file name, got {value!r}")
    path = Path(value) if Path(value).is_absolute() else (images or base) / value
    if not path.is_file():
        raise DataFormatError(f"{where}: counterfact_image {path} does not exist (pass --images DIR)")
    return path


def load_visual_counterfact(path: str | Path, *, task: str = "color", images: str | Path | None = None,
                            limit: int | None = None) -> list[PvPItem]:
    """PvP items from a Visual CounterFact split (``task``: ``color`` or ``size``)."""
    if task not in TASKS:
        raise DataFormatError(f"task must be one of {TASKS}, got {task!r}")
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path} not found")
    rows = _rows(path)
    if not rows:
        raise DataFormatError(f"{path} holds no rows")
    missing = [c for c in COLUMNS if c not in rows[0]]
    if missing:
        raise DataFormatError(f"{path}: columns {missing} missing; Visual CounterFact rows have {list(COLUMNS)}")
    image_dir = Path(images) if images is not None else None
    rng = random.Random(0)
    items = []
    for i, row in enumerate(rows[:limit] if limit else rows):
        where = f"{path}: row {i + 1}"
        obj, prior, pixel = (str(row[k]).strip() for k in ("object", "correct_answer", "incorrect_answer"))
        if task == "color":
            most = f"Answer with one word. What color are most {_plural(obj)}?"
            this = f"Answer with one word. What color is this {obj}?"
        else:
            a, b = (prior, pixel) if rng.random() < 0.5 else (pixel, prior)
            most = f"Answer with the correct option. Which is larger usually, {a} or {b}?"
            this = f"Answer with the correct option. Which is larger here, {a} or {b}?"
        items.append(PvPItem(_image(row["counterfact_image"], where, image_dir, path.parent), this, most,
                             prior=prior, pixel=pixel, image_id=i, attribute=task))
    return items


def load_fit_file(path: str | Path, *, images: str | Path | None = None) -> list[Any]:
    """Fit items from ``--fit-data``: JSONL items (:func:`haltrace.data.load_items`), or a Visual CounterFact
    ``.parquet`` / ``.csv`` file (task ``size`` when the file name says so, else ``color``)."""
    from haltrace.data.jsonl import load_items

    path = Path(path)
    if path.suffix.lower() in (".parquet", ".csv"):
        task = "size" if "size" in path.name.lower() else "color"
        return load_visual_counterfact(path, task=task, images=images)
    return load_items(path, images=images)
