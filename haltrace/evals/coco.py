"""CHAIR ground truth from COCO annotation files, built the way ``LisaAnne/Hallucination`` ``chair.py`` does.

Per image, the ground-truth objects are the union of

* the instance annotations' category names (``instances_<split>.json``), mapped through the synonym table, and
* the objects mentioned in the image's ground-truth captions (``captions_<split>.json``), parsed with the
  same caption parser that reads the generated captions (:mod:`haltrace.data.chair_rules`).

The synonym table is, in order: the ``synonyms`` file when given; the packaged official COCO table when every
category name is one of its 80 classes; otherwise each category name (lower-cased) is its own canonical word,
so a user's or the test organism's COCO-style files (categories "fork", "knife", ...) need no synonyms file.

>>> truth = load_coco_ground_truth("coco/annotations", split="val2014")                # doctest: +SKIP
>>> score_chair({391895: "A man riding a motor bike on a dirt road."}, truth)["chair_i"]  # doctest: +SKIP
0.0
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from haltrace.data.chair_rules import (
    SynonymTable,
    chair_scores,
    check_rules,
    identity_table,
    parse_caption,
    phrases_for,
    read_synonym_table,
    tokenizer_name,
)
from haltrace.evals.formats import FormatError, _file_number


@dataclass
class CocoTruth:
    """Per-image ground truth: ``objects`` (image id -> canonical objects) and ``file_names`` (id -> name)."""

    objects: dict[int, set[str]]
    file_names: dict[int, str]
    table: SynonymTable
    rules: str
    files: tuple[str, ...]
    phrases: dict[str, str] = field(repr=False)

    @property
    def synonyms(self) -> str:
        """Where the synonym table came from (a path, the packaged COCO table, or "category names")."""
        return self.table.source

    @cached_property  # image_id() looks names up once per caption; COCO val2014 has 40k images
    def ids_by_file_name(self) -> dict[str, int]:
        """File name -> image id, e.g. ``{"COCO_val2014_000000391895.jpg": 391895}``."""
        return {name: image_id for image_id, name in self.file_names.items()}

    def image_id(self, key: Any) -> int | None:
        """The image id a caption key refers to: an exact file name first, then a numeric id.

        A numeric id is the key itself (int, or a string of digits) or, for a file name not in the
        annotations (``COCO_val2014_000000391895.jpg`` against 2017 names), the last run of digits in it.
        """
        if isinstance(key, int) and not isinstance(key, bool):
            return key if key in self.objects else None
        text = str(key).strip()
        by_name = self.ids_by_file_name
        for name in (text, Path(text).name):
            if name in by_name:
                return by_name[name]
        number = int(text) if text.isdecimal() else _file_number(text)
        return number if number in self.objects else None


def _split_files(folder: Path, split: str | Sequence[str] | None) -> list[tuple[str, Path, Path]]:
    """``(split, instances file, captions file)`` for the requested split(s), or a FormatError."""
    if not folder.is_dir():
        raise FormatError(f"{folder} is not a folder; expected the COCO annotations folder holding "
                          "instances_<split>.json and captions_<split>.json (e.g. instances_val2014.json, "
                          "captions_val2014.json)")
    found = {kind: {p.name[len(kind) + 1:-len(".json")]: p for p in folder.glob(f"{kind}_*.json")}
             for kind in ("instances", "captions")}
    available = sorted(set(found["instances"]) & set(found["captions"]))
    if split is None:
        if len(available) > 1:
            raise FormatError(f"{folder} holds several splits {available}; pass split= one of them, or a list "
                              "to combine them (chair.py combines train2014 and val2014)")
        if not available:
            raise FormatError(f"{folder} holds no instances_<split>.json + captions_<split>.json pair (e.g. "
                              f"instances_val2014.json and captions_val2014.json); found "
                              f"{sorted(p.name for p in folder.glob('*.json')) or 'no JSON files'}")
        splits = available
    else:
        splits = [split] if isinstance(split, str) else list(split)
    out = []
    for s in splits:
        paths = [folder / f"{kind}_{s}.json" for kind in ("instances", "captions")]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FormatError(f"split {s!r}: {missing} not found in {folder}; CHAIR needs both "
                              f"instances_{s}.json and captions_{s}.json (splits with both here: "
                              f"{available or 'none'})")
        out.append((s, *paths))
    return out


def _load_json(path: Path, keys: Sequence[str]) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    missing = [k for k in keys if not isinstance(data, dict) or k not in data]
    if missing:
        raise FormatError(f"{path} lacks {missing}; expected a COCO annotation file with {list(keys)}")
    return data


def _choose_table(names: Iterable[str], synonyms: str | Path | None, rules: str) -> SynonymTable:
    if synonyms is not None:
        return read_synonym_table(synonyms, rules)
    coco = read_synonym_table(None, rules)
    names = list(dict.fromkeys(names))
    if names and set(names) <= set(coco.canonical):
        return coco
    # not COCO's classes: the category names are the vocabulary, each its own canonical word
    return identity_table([n.lower() for n in names], source="category names")


def coco_image_files(annotations_dir: str | Path, split: str | Sequence[str] | None = None) -> dict[str, int]:
    """File name -> image id from the instances files' ``images`` lists (cheap: no caption parsing), so a
    caller can pick images first and then load ground truth for those ids only.

    >>> coco_image_files("annotations", "val2014")["COCO_val2014_000000391895.jpg"]   # doctest: +SKIP
    391895
    """
    out: dict[str, int] = {}
    for _, inst_path, _ in _split_files(Path(annotations_dir), split):
        for image in _load_json(inst_path, ("images",))["images"]:
            out[str(image.get("file_name", image["id"]))] = int(image["id"])
    return out


def load_coco_ground_truth(annotations_dir: str | Path, split: str | Sequence[str] | None = None,
                           rules: str = "official", synonyms: str | Path | None = None, *,
                           image_ids: Iterable[int] | None = None) -> CocoTruth:
    """CHAIR ground truth from a COCO ``annotations/`` folder (``instances_*.json`` + ``captions_*.json``).

    ``split`` picks the file pair (``"val2014"`` -> ``instances_val2014.json`` + ``captions_val2014.json``); a
    list combines several, as ``chair.py`` combines train2014 and val2014; ``None`` takes the only pair
    there. ``image_ids`` limits the work to those images (parsing all 200k val2014 captions takes a while).
    Images without annotations get an empty set (plus whatever their captions name).

    >>> truth = load_coco_ground_truth("annotations", split="val2014", image_ids=[391895])  # doctest: +SKIP
    >>> sorted(truth.objects[391895])                                                         # doctest: +SKIP
    ['bicycle', 'motorcycle', 'person']
    """
    check_rules(rules)
    folder = Path(annotations_dir)
    pairs = _split_files(folder, split)
    wanted = None if image_ids is None else {int(i) for i in image_ids}
    names: dict[int, str] = {}
    file_names: dict[int, str] = {}
    instances, captions = [], []
    for _, inst_path, cap_path in pairs:
        inst = _load_json(inst_path, ("images", "annotations", "categories"))
        caps = _load_json(cap_path, ("annotations",))
        names.update({int(c["id"]): str(c["name"]) for c in inst["categories"]})
        for image in [*caps.get("images", []), *inst["images"]]:  # instances' names win
            if wanted is None or int(image["id"]) in wanted:
                file_names[int(image["id"])] = str(image.get("file_name", image["id"]))
        instances.extend(inst["annotations"])
        captions.extend(caps["annotations"])

    table = _choose_table(names.values(), synonyms, rules)
    phrases = phrases_for(table, rules)
    objects: dict[int, set[str]] = {i: set() for i in file_names}
    unknown = set()
    for ann in instances:
        image_id = int(ann["image_id"])
        if wanted is not None and image_id not in wanted:
            continue
        name = names.get(int(ann["category_id"]), str(ann["category_id"]))
        canonical = table.inverse.get(name, table.inverse.get(name.lower()))
        if canonical is None:
            unknown.add(name)
            continue
        objects.setdefault(image_id, set()).add(canonical)
    if unknown:
        raise FormatError(f"categories {sorted(unknown)} of {[str(p[1]) for p in pairs]} are not in the synonym "
                          f"table {table.source}; add them to it (or pass no synonyms to use category names)")
    for ann in captions:
        image_id = int(ann["image_id"])
        if wanted is None or image_id in wanted:
            objects.setdefault(image_id, set()).update(parse_caption(str(ann["caption"]), table, rules, phrases))
    files = tuple(str(p) for _, a, b in pairs for p in (a, b))
    return CocoTruth(objects, file_names, table, rules, files, phrases)


def score_chair(captions: Mapping[Any, str], truth: CocoTruth, rules: str | None = None) -> dict:
    """CHAIR of generated ``captions`` (image key -> caption) against COCO ground truth.

    Keys may be COCO image ids (int or str) or file names (``COCO_val2014_000000391895.jpg``,
    ``caption_0007.png``); see :meth:`CocoTruth.image_id`. ``rules`` defaults to the rules the ground truth
    was built with. Returns ``chair_s, chair_i, recall, mean_length, mentions, hallucinated, n``, the
    ``hallucinated_words`` counts, and ``rules``, ``truth_rules``, ``synonyms`` (table source), ``tokenizer``.

    >>> score_chair({"caption_0001.png": "Two forks and a knife."}, truth)["chair_s"]  # doctest: +SKIP
    1.0
    """
    rules = check_rules(truth.rules if rules is None else rules)
    keys, missing = [], []
    for key in captions:
        image_id = truth.image_id(key)
        (keys.append((key, image_id)) if image_id is not None else missing.append(key))
    if missing:
        raise FormatError(f"{len(missing)} captioned images are not in {list(truth.files)} (first: "
                          f"{missing[:3]}); keys must be COCO image ids or the annotations' file names")
    phrases = truth.phrases if rules == truth.rules else None
    out = chair_scores([captions[k] for k, _ in keys], [truth.objects[i] for _, i in keys], truth.table,
                       rules, phrases)
    out |= {"rules": rules, "truth_rules": truth.rules, "synonyms": truth.synonyms,
            "tokenizer": tokenizer_name() if "official" in (rules, truth.rules) else None}
    return out
