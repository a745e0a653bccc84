"""Read and write typed items as JSONL, one documented schema per kind (``docs/data-formats.md``).

A row may name its kind with ``"type"``; without it the kind is inferred from the keys, so a POPE question
file as released (``{"question_id", "image", "text", "label"}``) loads as :class:`YesNoQuestion` items.
Image paths are resolved against ``images`` (the ``--images DIR`` option), else against the JSONL file's
folder; absolute paths are kept. Errors name the file, the line and the field.

>>> import json
>>> from pathlib import Path
>>> Path("val2014").mkdir(); img.save("val2014/COCO_val2014_000000310196.jpg")
>>> row = {"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the image?",
...        "label": "yes"}
>>> _ = Path("pope_adversarial.jsonl").write_text(json.dumps(row) + "\\n")
>>> items = load_items("pope_adversarial.jsonl", images="val2014/")
>>> items[0].question, items[0].label
('Is there a snowboard in the image?', 'yes')
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from haltrace.data.items import (
    KINDS,
    CaptionItem,
    CaptionPair,
    EntityQuestion,
    PvPItem,
    Statement,
    VQAQuestion,
    YesNoQuestion,
)
from haltrace.errors import HaltraceError


class DataFormatError(HaltraceError):
    """A data file is missing or malformed; the message names the file, line and field."""


def _infer_kind(row: dict) -> str | None:
    if "truthful" in row and "hallucinated" in row:
        return "caption_pair"
    if "this_question" in row or "most_question" in row:
        return "pvp"
    if "statement" in row:
        return "statement"
    if "known" in row:
        return "entity"
    if "objects" in row:
        return "caption"
    if "label" in row and ("text" in row or "question" in row):
        return "yesno"
    if "answer" in row and "question" in row:
        return "vqa"
    return None


# kind -> (required JSON keys, optional JSON keys); "text" is POPE's name for the question
_SCHEMA: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "yesno": (("question", "label"), ("image", "question_id", "image_id", "object", "category")),
    "vqa": (("question", "answer"), ("image", "question_id", "image_id")),
    "caption": (("image",), ("objects", "image_id", "prompt")),
    "caption_pair": (("image", "truthful", "hallucinated"), ("image_id", "prompt")),
    "pvp": (("image", "this_question", "most_question"), ("prior", "pixel", "image_id", "attribute")),
    "entity": (("question", "known"), ("answer", "entity", "question_id")),
    "statement": (("statement", "label"), ("statement_id",)),
}


def _where(path: Path, line: int) -> str:
    return f"{path}:{line}"


def _resolve_image(value: Any, where: str, images: Path | None, base: Path, check: bool) -> Any:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise DataFormatError(f"{where}: field 'image' must be a file name, got {value!r}")
    path = Path(value)
    if not path.is_absolute():
        path = (images if images is not None else base) / path
    if check and not path.is_file():
        hint = (f" (looked in --images {images})" if images is not None
                else " (no --images DIR given: paths are relative to the JSONL file)")
        raise DataFormatError(f"{where}: field 'image' names {path}, which does not exist{hint}")
    return path


def _check_type(where: str, key: str, value: Any, kind: str) -> Any:
    if key in ("question", "text", "answer", "truthful", "hallucinated", "this_question", "most_question",
               "statement", "prompt"):
        if not isinstance(value, str) or not value.strip():
            raise DataFormatError(f"{where}: field {key!r} of a {kind} item must be a non-empty string, "
                                  f"got {value!r}")
    if key == "label" and kind == "yesno":
        text = str(value).strip().lower() if isinstance(value, str) else None
        if text not in ("yes", "no"):
            raise DataFormatError(f"{where}: field 'label' must be \"yes\" or \"no\", got {value!r}")
        return text
    if key in ("label", "known") and kind in ("statement", "entity"):
        if not isinstance(value, bool):
            raise DataFormatError(f"{where}: field {key!r} must be true or false, got {value!r}")
    if key == "objects":
        if not isinstance(value, list) or not all(isinstance(o, str) for o in value):
            raise DataFormatError(f"{where}: field 'objects' must be a list of object names, got {value!r}")
    return value


def item_from_row(row: dict, where: str = "<row>", *, images: Path | None = None, base: Path = Path("."),
                  check_images: bool = True) -> Any:
    """One item from one JSON object (see the module docstring for kinds and image paths)."""
    kind = row.get("type") or _infer_kind(row)
    if not isinstance(kind, str) or kind not in _SCHEMA:
        raise DataFormatError(f"{where}: cannot tell the item kind (keys {sorted(row)}); add \"type\": one of "
                              f"{', '.join(_SCHEMA)}")
    row = dict(row)
    if kind == "yesno" and "question" not in row and "text" in row:
        _check_type(where, "text", row["text"], kind)  # an error names the field the file holds
        row["question"] = row.pop("text")
    required, optional = _SCHEMA[kind]
    missing = [k for k in required if row.get(k) is None]
    if missing:
        raise DataFormatError(f"{where}: a {kind} item needs field(s) {missing}")
    kwargs: dict[str, Any] = {}
    for key in (*required, *optional):
        if key not in row:
            continue
        value = _check_type(where, key, row[key], kind)
        if key == "image":
            value = _resolve_image(value, where, images, base, check_images)
        kwargs[key] = value
    return KINDS[kind](**kwargs)


def load_items(path: str | Path, *, images: str | Path | None = None, kinds: Sequence[str] | None = None,
               check_images: bool = True) -> list[Any]:
    """Typed items from a JSONL file (blank lines skipped); ``kinds`` restricts which kinds are accepted."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path} not found")
    image_dir = Path(images) if images is not None else None
    if image_dir is not None and not image_dir.is_dir():
        raise DataFormatError(f"--images {image_dir} is not a folder")
    raw = path.read_bytes()
    try:
        # a byte-order mark (Windows editors) is dropped; lines end at "\n" only (str.splitlines would also
        # split inside a JSON string holding U+2028 or a form feed)
        lines = raw.decode("utf-8").removeprefix("\ufeff").split("\n")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise DataFormatError(f"{_where(path, line)} is not UTF-8 text ({exc.reason} at byte {exc.start}); save "
                              "it as UTF-8 JSONL") from None
    items = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = _where(path, number)
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataFormatError(f"{where} is not valid JSON ({exc.msg}); expected one JSON object per line") \
                from None
        if not isinstance(row, dict):
            raise DataFormatError(f"{where} holds a {type(row).__name__}, expected a JSON object")
        item = item_from_row(row, where, images=image_dir, base=path.parent, check_images=check_images)
        if kinds is not None and item.kind not in kinds:
            raise DataFormatError(f"{where}: a {item.kind} item, but this file takes {', '.join(kinds)} items")
        items.append(item)
    if not items:
        raise DataFormatError(f"{path} holds no items")
    return items


def item_to_row(item: Any, *, image_name: str | None = None) -> dict:
    """The JSON object of one item (``"type"`` first). In-memory images need ``image_name`` (the file they
    were saved as); path images are written as they are."""
    row: dict[str, Any] = {"type": item.kind}
    for f in fields(item):
        value = getattr(item, f.name)
        if f.name == "image":
            if image_name is not None:
                value = image_name
            elif isinstance(value, Path):
                value = str(value)
            elif value is not None and not isinstance(value, str):
                raise DataFormatError(f"{item.kind} item holds an in-memory image; save it and pass image_name=")
        if value is None and f.name != "image":
            continue
        row[f.name] = value
    return row


def save_items(path: str | Path, items: Iterable[Any], image_names: Sequence[str | None] | None = None) -> Path:
    """Write items as JSONL, atomically (temp file, then rename)."""
    from haltrace.trace.store import atomic_write_text

    items = list(items)
    names = list(image_names) if image_names is not None else [None] * len(items)
    if len(names) != len(items):
        raise ValueError(f"{len(items)} items but {len(names)} image names")
    text = "".join(json.dumps(item_to_row(it, image_name=n)) + "\n" for it, n in zip(items, names, strict=True))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
    path.chmod(0o644)
    return path


__all__ = ["CaptionItem", "CaptionPair", "DataFormatError", "EntityQuestion", "PvPItem", "Statement",
           "VQAQuestion", "YesNoQuestion", "item_from_row", "item_to_row", "load_items", "save_items"]
