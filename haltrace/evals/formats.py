"""Readers and writers for the official evaluation file formats, and scoring straight from files.

POPE (``RUCAIBox/POPE``)
    questions: JSONL ``{"question_id", "image", "text", "label"}``; answers: JSONL ``{"question", "answer"}``
    (POPE) or ``{"question_id", "text"}`` (LLaVA), aligned by ``question_id`` when both files carry it, else
    **by line order** (as the official ``evaluate.py`` does).
CHAIR (``LisaAnne/Hallucination``)
    synonyms: ``data/synonyms.txt``, one line per class, comma-separated, first entry = canonical name;
    captions: LVLM JSONL ``{"image_id", "caption"}`` or the original's JSON dict with ``imgToEval``
    (``image_id -> {"caption", ...}``); ground truth: JSON ``{image: [objects]}`` (what
    ``haltrace organism eval --write-sets`` writes to ``chair/objects.json``).
Counterfactual colour / entities
    the organism's exported ``counterfactual_color.jsonl`` / ``entities.jsonl``, with answer JSONL
    ``{"question_id", "answer"}`` (or ``{"question", "answer"}``) aligned by line order.

Writers are atomic (temp file + rename), so a reader never sees a half-written file.

>>> questions = [{"question_id": 1, "image": "a.png", "text": "Is there a cat?", "label": "yes"},
...              {"question_id": 2, "image": "a.png", "text": "Is there a dog?", "label": "no"}]
>>> _ = write_pope_questions("q.jsonl", questions)
>>> _ = write_pope_answers("a.jsonl", questions, ["Yes, there is.", "No."])
>>> score_pope_files({"random": "q.jsonl"}, {"random": "a.jsonl"})["random"]["f1"]
1.0
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from haltrace.data.chair import chair_metrics, default_phrases
from haltrace.data.chair_rules import chair_scores, check_rules, identity_table, read_synonym_table
from haltrace.errors import HaltraceError
from haltrace.evals.counterfactual import counterfactual_rates, label_answers
from haltrace.evals.pope import pope_metrics, pope_summary
from haltrace.evals.refusal import refusal_report

POPE_QUESTION_KEYS = ("question_id", "image", "text", "label")


class FormatError(HaltraceError):
    """An evaluation file is missing, malformed or does not match its partner file."""


def _atomic_text(path: str | Path, text: str) -> Path:
    from haltrace.trace.store import atomic_write_text

    path = Path(path)
    atomic_write_text(path, text)
    path.chmod(0o644)  # the temp file is created 0600; result files are meant to be shared
    return path


def _read_text(path: Path) -> str:
    """The file's UTF-8 text; a file in another encoding is named (not a bare UnicodeDecodeError)."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise FormatError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8") from None


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSONL file (blank lines skipped); errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path} not found")
    rows = []
    for i, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FormatError(f"{path}:{i} is not valid JSON ({exc.msg}); expected one JSON object per line") from None
        if not isinstance(row, dict):
            raise FormatError(f"{path}:{i} holds a {type(row).__name__}, expected a JSON object")
        rows.append(row)
    return rows


def write_jsonl(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write rows as JSONL, atomically."""
    return _atomic_text(path, "".join(json.dumps(dict(r)) + "\n" for r in rows))


def _require(rows: Sequence[dict], keys: Sequence[str], path: str | Path, what: str) -> None:
    for i, row in enumerate(rows, 1):
        missing = [k for k in keys if k not in row]
        if missing:
            raise FormatError(f"{path}: row {i} lacks {missing}; {what} rows need {list(keys)}")


# ------------------------------------------------------------------------------------------------ POPE
def read_pope_questions(path: str | Path) -> list[dict]:
    """Official POPE question JSONL; checks keys and that labels are 'yes'/'no'."""
    rows = read_jsonl(path)
    _require(rows, POPE_QUESTION_KEYS, path, "POPE question")
    bad = sorted({str(r["label"]) for r in rows} - {"yes", "no"})
    if bad:
        raise FormatError(f"{path}: POPE labels must be 'yes' or 'no', found {bad}")
    return rows


def write_pope_questions(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    rows = [{k: r[k] for k in POPE_QUESTION_KEYS} for r in rows]
    return write_jsonl(path, rows)


def read_pope_answers(path: str | Path) -> list[str]:
    """Answer strings of a POPE answer JSONL in line order: POPE's ``{"question", "answer"}`` or LLaVA's
    ``{"question_id", "text"}`` (``text`` is read when there is no ``answer``)."""
    return [_answer_text(r, path, i) for i, r in enumerate(read_jsonl(path), 1)]


def _answer_text(row: dict, path: str | Path, line: int) -> str:
    if "answer" in row:
        return str(row["answer"])
    if "text" in row:
        return str(row["text"])
    raise FormatError(f"{path}: row {line} has neither 'answer' (POPE) nor 'text' (LLaVA); keys {sorted(row)}")


def aligned_pope_answers(questions: Sequence[dict], answers_path: str | Path, questions_path: str | Path = ""
                         ) -> list[str]:
    """Answers in question order: by ``question_id`` when both files carry it (LLaVA's answer files may be in
    any order), else by line order as POPE's ``evaluate.py`` does."""
    rows = read_jsonl(answers_path)
    if rows and all("question_id" in r for r in rows) and all("question_id" in q for q in questions):
        by_id = {str(r["question_id"]): _answer_text(r, answers_path, i) for i, r in enumerate(rows, 1)}
        missing = [q["question_id"] for q in questions if str(q["question_id"]) not in by_id]
        if missing:
            raise FormatError(f"{answers_path}: no answer for {len(missing)} question_id(s) of {questions_path} "
                              f"(first: {missing[:3]})")
        return [by_id[str(q["question_id"])] for q in questions]
    if len(rows) != len(questions):
        raise FormatError(f"{len(questions)} questions in {questions_path} but {len(rows)} answers in "
                          f"{answers_path}; without question_id on both sides answers are aligned by line order, "
                          "one per question")
    return [_answer_text(r, answers_path, i) for i, r in enumerate(rows, 1)]


def write_pope_answers(path: str | Path, questions: Sequence[Mapping[str, Any]], answers: Sequence[str]) -> Path:
    """Answers aligned with ``questions`` by order, as ``{"question", "answer"}`` lines."""
    if len(questions) != len(answers):
        raise FormatError(f"{len(questions)} questions but {len(answers)} answers")
    return write_jsonl(path, ({"question": q["text"], "answer": a} for q, a in zip(questions, answers, strict=True)))


def score_pope_files(questions: Mapping[str, str | Path], answers: Mapping[str, str | Path], *,
                     parser: str = "official") -> dict:
    """POPE metrics per split from official files; ``questions``/``answers`` map split -> file.

    Adds ``summary`` (mean F1/accuracy/yes-ratio over the splits) and the ``parser`` used.
    """
    if set(questions) != set(answers):
        raise FormatError(f"question splits {sorted(questions)} and answer splits {sorted(answers)} differ")
    out: dict = {}
    for split in questions:
        qs = read_pope_questions(questions[split])
        ans = aligned_pope_answers(qs, answers[split], questions[split])
        out[split] = pope_metrics(ans, [r["label"] for r in qs], parser=parser)
    out["summary"] = pope_summary({s: out[s] for s in questions})
    out["parser"] = parser
    return out


# ----------------------------------------------------------------------------------------------- CHAIR
def read_synonyms(path: str | Path) -> tuple[list[str], dict[str, str]]:
    """``data/synonyms.txt`` -> (canonical vocabulary, word -> canonical).

    Entries are stripped, so the original's double-space entries ("scooter,  motor bike") match too.
    """
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path} not found; expected CHAIR's synonyms.txt (one class per line, "
                          "comma-separated, canonical name first)")
    vocab, inverse = [], {}
    for line in _read_text(path).splitlines():
        words = [w.strip().lower() for w in line.split(",") if w.strip()]
        if not words:
            continue
        vocab.append(words[0])
        for w in words:
            inverse.setdefault(w, words[0])
    if not vocab:
        raise FormatError(f"{path} holds no synonym lines")
    return vocab, inverse


def write_synonyms(path: str | Path, classes: Mapping[str, Sequence[str]]) -> Path:
    """``{canonical: [synonyms...]}`` -> synonyms.txt lines ``canonical, syn1, syn2``."""
    return _atomic_text(path, "".join(", ".join([c, *[s for s in syns if s != c]]) + "\n"
                                      for c, syns in classes.items()))


def read_captions(path: str | Path) -> dict[str, str]:
    """Captions keyed by image id (as a string) from LVLM JSONL or the original's ``imgToEval`` JSON."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path} not found")
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None  # JSONL: several objects, one per line
    if isinstance(data, dict) and "imgToEval" in data:
        return {str(k): str(v["caption"]) for k, v in data["imgToEval"].items()}
    rows = [data] if isinstance(data, dict) else read_jsonl(path)
    _require(rows, ("image_id", "caption"), path, "caption")
    return {str(r["image_id"]): str(r["caption"]) for r in rows}


def write_captions(path: str | Path, captions: Mapping[Any, str], *, style: str = "jsonl") -> Path:
    """Write captions as LVLM JSONL (``style="jsonl"``) or the original's ``imgToEval`` dict (``"imgtoeval"``)."""
    if style == "jsonl":
        return write_jsonl(path, ({"image_id": k, "caption": c} for k, c in captions.items()))
    if style == "imgtoeval":
        data = {"overall": {}, "imgToEval": {str(k): {"image_id": k, "caption": c} for k, c in captions.items()}}
        return _atomic_text(path, json.dumps(data, indent=1) + "\n")
    raise ValueError(f"unknown caption style {style!r}; choose 'jsonl' or 'imgtoeval'")


def read_objects(path: str | Path) -> dict[str, list[str]]:
    """Per-image ground-truth objects, JSON ``{image: [objects]}``."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path} not found; expected JSON {{image: [objects]}}")
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path} is not valid JSON ({exc}); expected {{image: [objects]}}") from None
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise FormatError(f"{path}: expected a JSON object mapping each image to a list of objects")
    return {str(k): [str(o) for o in v] for k, v in data.items()}


def write_objects(path: str | Path, objects: Mapping[Any, Iterable[str]]) -> Path:
    return _atomic_text(path, json.dumps({str(k): sorted(v) for k, v in objects.items()}, indent=1) + "\n")


def _file_number(name: str) -> int | None:
    """The last run of digits in a file name's stem, as an int (``COCO_val2014_000000391895.jpg`` -> 391895).

    The last run, because COCO names carry the split year first; an int, so ``caption_0000.png`` is 0.
    """
    runs = re.findall(r"\d+", Path(str(name)).stem)
    return int(runs[-1]) if runs else None


def _image_key(key: str | int, objects: Mapping[str, Any]) -> str | None:
    """The ground-truth key a caption key refers to: the same key, else the one whose number is the same.

    Captions may be keyed by numeric id while objects are keyed by file name (``caption_0007.png``), or the
    other way round; numbers compare as integers (the last digit run of a file name's stem).

    >>> _image_key(391895, {"COCO_val2014_000000391895.jpg": []})
    'COCO_val2014_000000391895.jpg'
    """
    key = str(key)
    if key in objects:
        return key
    number = int(key) if key.isdecimal() else _file_number(key)
    if number is None:
        return None
    hits = [k for k in objects if (int(k) if k.isdecimal() else _file_number(k)) == number]
    return hits[0] if len(hits) == 1 else None


def score_chair_files(captions: str | Path, objects: str | Path, synonyms: str | Path | None = None, *,
                      rules: str = "simple") -> dict:
    """CHAIR from files. Without ``synonyms`` the vocabulary is every object in the ground truth.

    ``rules`` picks the caption parser (:mod:`haltrace.data.chair_rules`): ``"simple"`` (default, the
    organism's; synonyms read by :func:`read_synonyms`) or ``"official"`` (``chair.py``'s tokeniser,
    singularisation and double words; synonyms split exactly as ``chair.py`` does). For COCO annotation
    files use :func:`haltrace.evals.coco.score_chair`.
    """
    check_rules(rules)
    caps = read_captions(captions)
    truth = read_objects(objects)
    keys, missing = [], []
    for k in caps:
        match = _image_key(k, truth)
        (keys.append((k, match)) if match is not None else missing.append(k))
    if missing:
        raise FormatError(f"{len(missing)} captioned images have no ground truth in {objects} "
                          f"(first: {missing[:3]}); caption image ids must match its keys")
    texts, truths = [caps[k] for k, _ in keys], [truth[m] for _, m in keys]
    if rules == "official":
        if synonyms is not None and not Path(synonyms).is_file():
            raise FormatError(f"{synonyms} not found; expected CHAIR's synonyms.txt")
        table = (read_synonym_table(synonyms, rules) if synonyms is not None else
                 identity_table(sorted({o for objs in truth.values() for o in objs}), source="ground truth"))
        out = chair_scores(texts, truths, table, rules)
    else:
        if synonyms is not None:
            vocab, inverse = read_synonyms(synonyms)
        else:
            vocab, inverse = sorted({o for objs in truth.values() for o in objs}), {}
        out = chair_metrics(texts, truths, vocabulary=vocab, synonyms=inverse, phrases=default_phrases(inverse))
    out["synonyms"] = str(synonyms) if synonyms is not None else None
    out["rules"] = rules
    return out


# ------------------------------------------------------------------------------- counterfactual / refusal
def _answers_by_order(path: str | Path, n: int, partner: str | Path) -> list[str]:
    rows = read_jsonl(path)
    _require(rows, ("answer",), path, "answer")
    if len(rows) != n:
        raise FormatError(f"{n} items in {partner} but {len(rows)} answers in {path}; aligned by line order")
    return [str(r["answer"]) for r in rows]


def score_counterfactual_files(items: str | Path, answers: str | Path) -> dict:
    """Prior/pixel/other rates (and per-item ``labels``) from ``counterfactual_color.jsonl`` + answers."""
    rows = read_jsonl(items)
    _require(rows, ("prior", "pixel"), items, "counterfactual")
    labels = label_answers(_answers_by_order(answers, len(rows), items), [r["prior"] for r in rows],
                           [r["pixel"] for r in rows])
    return counterfactual_rates(labels) | {"labels": labels}


def score_refusal_files(items: str | Path, answers: str | Path, detector: str = "organism") -> dict:
    """Refusal rate per ``group`` from ``entities.jsonl`` + answers, with the detector's rule recorded."""
    rows = read_jsonl(items)
    _require(rows, ("group",), items, "entity")
    texts = _answers_by_order(answers, len(rows), items)
    groups: dict[str, list[str]] = {}
    for row, text in zip(rows, texts, strict=True):
        groups.setdefault(str(row["group"]), []).append(text)
    return refusal_report(groups, detector)


def split_files(values: list[str], flag: str) -> dict[str, str]:
    """``split=path`` or a bare path whose name holds the split (``pope_adversarial.jsonl``) -> {split: path}."""
    from haltrace.evals.pope import SPLITS

    out = {}
    for value in values:
        split, sep, path = value.partition("=")
        if not sep:
            path = value
            found = [s for s in SPLITS if s in Path(value).name]
            split = found[0] if len(found) == 1 else Path(value).stem
        out[split] = path
    if len(out) != len(values):
        raise FormatError(f"two {flag} files for the same split; use split=path")
    return out
