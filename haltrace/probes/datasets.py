"""Labelled probe sets: a JSONL file you bring, or a built-in task on the ShapesWorld organism.

JSONL format (one object per line)::

    {"prompt": "<image> is there a knife ? answer :", "image": "imgs/3.png", "label": "hallucinated",
     "group": "img3", "position": "last"}

* ``prompt`` (required), ``label`` (required; two distinct values: 0/1, booleans, or two strings, sorted
  alphabetically so that the second one is the positive class 1), ``image`` (optional path, relative to the
  JSONL file's folder), ``group`` (optional; rows of a group never straddle train and test; default: the
  image path, else the row), ``position`` (optional):
  ``"last"`` (default), ``{"word": W}`` (the last token of the first whole-word occurrence of ``W``) or
  ``{"generated": k}`` (the model's ``k``-th greedily generated token, 0-based).

Every position rule becomes "the last token of a (possibly shortened or extended) prompt": a causal model's
activation at token ``t`` depends only on tokens ``<= t``, so cutting the prompt after the word, or appending
the first ``k+1`` generated tokens, reads exactly that token. One harvest with ``positions="last"`` then
serves every rule.

Built-in tasks (:data:`TASKS`) need the organism (``haltrace.load("shapes-llava")``)::

    >>> model = haltrace.load("shapes-llava")                      # doctest: +SKIP
    >>> pset = build_task("entity", model)                          # doctest: +SKIP
    >>> pset.label_names, len(pset), pset.rows[0]["prompt"]         # doctest: +SKIP
    (['known', 'unknown'], 288, 'what sport does the player zomi')
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: built-in tasks -> one-line description (the organism builds them: haltrace.organism.probe_tasks, reached
#: through the data-source hook ``probe_task_for``, haltrace.data.sources)
TASKS: dict[str, str] = {
    "hallucination": "per generated object word in captions: real (0) vs hallucinated (1), read at that word",
    "pope": "the model's 'yes' answers: correct (0) vs hallucinated (1), balanced per question word, last token",
    "entity": "known (0) vs unknown (1) entity names, read at the name's token, text only, grouped by name",
    "entity-last": "the same known vs unknown questions, read at the last prompt token (where the model decides "
                   "to answer or refuse)",
    "prior-vs-pixel": "counterfactual colours: answer follows the pixels (0) or the prior (1), last token",
}


@dataclass
class ProbeSet:
    """Rows ready for :func:`haltrace.harvest` with ``positions="last"``.

    Each row: ``prompt`` (already cut/extended so the token to read is the last one), ``label`` (0/1),
    ``group`` (str), ``position`` (the original rule, JSON), optional ``image`` (PIL) and extras.
    """

    name: str
    rows: list[dict[str, Any]]
    label_names: list[str]
    position_rule: str
    source: str
    notes: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def labels(self) -> list[int]:
        return [int(r["label"]) for r in self.rows]

    @property
    def groups(self) -> list[str]:
        return [str(r["group"]) for r in self.rows]

    @property
    def prompts(self) -> list[str]:
        return [r["prompt"] for r in self.rows]

    def counts(self) -> dict[str, int]:
        return {name: self.labels.count(i) for i, name in enumerate(self.label_names)}


def check_two_classes(labels: list[Any], where: str) -> None:
    """Raise a ``ValueError`` naming ``where`` unless ``labels`` hold exactly two distinct values."""
    classes = sorted({json.dumps(v) for v in labels})
    if not classes:
        raise ValueError(f"{where}: no examples; nothing to probe")
    if len(classes) == 1:
        raise ValueError(f"{where}: every row has label {classes[0]}; a probe needs two classes. Add rows with "
                         f"the other label (e.g. hallucinated and correct examples).")
    if len(classes) > 2:
        raise ValueError(f"{where}: labels take {len(classes)} values {classes}; probes are binary. Map them to two "
                         f"classes (e.g. 0/1) first.")


def _label_map(values: list[Any], where: str) -> tuple[list[int], list[str]]:
    check_two_classes(values, where)
    if all(isinstance(v, bool) or v in (0, 1) for v in values):
        return [int(v) for v in values], ["0", "1"] if not all(isinstance(v, bool) for v in values) else \
            ["false", "true"]
    if not all(isinstance(v, str) for v in values):
        raise ValueError(f"{where}: labels must be 0/1, booleans or two strings, got {sorted(map(repr, set(values)))}")
    names = sorted(set(values))
    return [names.index(v) for v in values], names


# ------------------------------------------------------------------------------------------ position rules
def cut_at_word(prompt: str, word: str) -> str:
    """The prompt up to and including the first whole-word occurrence of ``word`` (else the first substring).

    >>> cut_at_word("what sport does the player zomi play ? answer :", "zomi")
    'what sport does the player zomi'
    """
    match = re.search(r"(?<!\S)" + re.escape(word) + r"(?!\S)", prompt) or re.search(re.escape(word), prompt)
    if match is None or not word:
        raise ValueError(f"position word {word!r} does not occur in prompt {prompt!r}")
    return prompt[:match.end()]


def _normalise_position(position: Any, where: str) -> Any:
    if position is None or position == "last":
        return "last"
    if isinstance(position, dict) and len(position) == 1:
        if isinstance(position.get("word"), str) and position["word"]:
            return {"word": position["word"]}
        k = position.get("generated")
        if isinstance(k, int) and not isinstance(k, bool) and k >= 0:
            return {"generated": k}
    raise ValueError(f"{where}: position must be \"last\", {{\"word\": W}} or {{\"generated\": k}} (k >= 0), "
                     f"got {position!r}")


def load_jsonl(path: str | Path) -> ProbeSet:
    """Read a labelled JSONL file (format in the module docstring) into a :class:`ProbeSet`.

    ``{"generated": k}`` rows keep their prompt and need :func:`resolve_generated` with a model.

    >>> from pathlib import Path
    >>> _ = Path("hallu.jsonl").write_text('{"prompt": "is there a cat ?", "label": "hallucinated"}\\n'
    ...                                     '{"prompt": "is there a dog ?", "label": "grounded"}\\n')
    >>> pset = load_jsonl("hallu.jsonl")
    >>> pset.label_names, [row["label"] for row in pset.rows]
    (['grounded', 'hallucinated'], [1, 0])
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label file {path} not found")
    from haltrace.data.jsonl import DataFormatError

    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataFormatError(f"{path} is not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8") from None
    raw: list[dict[str, Any]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataFormatError(f"{where}: not valid JSON ({err})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or "label" not in obj:
            raise DataFormatError(f"{where}: each line needs a \"prompt\" string and a \"label\", got "
                                  f"{sorted(obj) if isinstance(obj, dict) else type(obj).__name__}")
        if not obj["prompt"].strip():
            raise DataFormatError(f"{where}: \"prompt\" is empty; give the text to probe")
        if not isinstance(obj["label"], (bool, int, str)) or (
                isinstance(obj["label"], int) and not isinstance(obj["label"], bool) and obj["label"] not in (0, 1)):
            raise DataFormatError(f"{where}: \"label\" must be 0/1, true/false or a class name (string), got "
                                  f"{json.dumps(obj['label'])[:80]}")
        raw.append({**obj, "_where": where})
    if not raw:
        raise ValueError(f"{path} holds no rows")
    labels, names = _label_map([r["label"] for r in raw], str(path))
    rows = []
    for r, label in zip(raw, labels, strict=True):
        where = r.pop("_where")
        position = _normalise_position(r.get("position"), where)
        row = {k: v for k, v in r.items() if k not in ("prompt", "label", "image", "position", "group")}
        prompt = r["prompt"]
        if isinstance(position, dict) and "word" in position:
            try:
                prompt = cut_at_word(prompt, position["word"])
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None
        row.update(prompt=prompt, label=label, position=position, source_prompt=r["prompt"],
                   label_name=names[label])
        if r.get("image") is not None:
            image_path = (path.parent / str(r["image"])).resolve()
            if not image_path.is_file():
                raise FileNotFoundError(f"{where}: image {r['image']!r} not found (looked at {image_path}; image "
                                        f"paths are relative to the JSONL file's folder)")
            from PIL import Image

            try:
                with Image.open(image_path) as im:
                    row["image"] = im.convert("RGB")
            except (OSError, SyntaxError, ValueError) as err:  # UnidentifiedImageError, truncated files
                raise DataFormatError(f"{where}: image {image_path} cannot be read ({err}); re-save it as PNG or "
                                      "JPEG") from None
            row["image_path"] = str(r["image"])
        row["group"] = str(r.get("group", r.get("image", where.rsplit(":", 1)[1])))
        rows.append(row)
    rules = sorted({json.dumps(r["position"], sort_keys=True) for r in rows})
    return ProbeSet(path.stem, rows, names, "per row: " + ", ".join(rules), str(path))


def resolve_generated(pset: ProbeSet, model: Any, batch_size: int = 16) -> ProbeSet:
    """Extend ``{"generated": k}`` rows' prompts with the model's first ``k+1`` greedy tokens (in place).

    Rows whose generation stops before token ``k`` are dropped with a warning. The continuation is decoded
    and appended as text; for word-level and most BPE tokenizers this re-tokenises to the same ids.
    """
    todo = [i for i, r in enumerate(pset.rows) if isinstance(r["position"], dict) and "generated" in r["position"]]
    if not todo:
        return pset
    import torch

    tok = model.tokenizer
    dropped = []
    for start in range(0, len(todo), batch_size):
        chunk = [pset.rows[i] for i in todo[start:start + batch_size]]
        need = max(r["position"]["generated"] for r in chunk) + 1
        images = [r.get("image") for r in chunk]
        inputs = model.prepare([r["prompt"] for r in chunk], images=images if images[0] is not None else None)
        with torch.no_grad():
            out = model.hf.generate(**inputs, max_new_tokens=need, do_sample=False,
                                    pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        new = out[:, inputs["input_ids"].shape[1]:].tolist()
        for r, ids in zip(chunk, new, strict=True):
            k = r["position"]["generated"]
            if tok.eos_token_id in ids[:k + 1] or len(ids) <= k:
                dropped.append(r)
                continue
            text = tok.decode(ids[:k + 1], skip_special_tokens=False)
            r["prompt"] = r["prompt"] + ("" if text[:1].isspace() else " ") + text
            r["generated_token"] = tok.decode(ids[k:k + 1])
    if dropped:
        warnings.warn(f"{len(dropped)} rows dropped: the model stopped before their generated position", stacklevel=2)
        pset.rows = [r for r in pset.rows if not any(r is d for d in dropped)]
        check_two_classes([r["label"] for r in pset.rows], f"{pset.source} (after dropping short generations)")
    return pset


# ------------------------------------------------------------------------------------------ built-in tasks
def organism_folder(model: Any) -> Path:
    """The organism folder behind ``model`` (it must hold ``world.json``), or a clear error."""
    from haltrace.models.shipped import organism_folder as find

    name = str(getattr(model, "name_or_path", "") or "")
    folder = find(name)
    if folder is None:
        raise ValueError(f"the built-in tasks ({', '.join(TASKS)}) run on the ShapesWorld organism, but model "
                         f"{name!r} has no world.json; use --model shapes-llava (or an organism folder), or bring "
                         f"your own labelled set with --data FILE.jsonl")
    return folder


def build_task(name: str, model: Any) -> ProbeSet:
    """Build the built-in task ``name`` on the organism ``model`` (answers/captions from the model itself).

    >>> pset = build_task("pope", haltrace.load("shapes-llava"))  # doctest: +SKIP
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; tasks: " + "; ".join(f"{k} ({v})" for k, v in TASKS.items())
                         + ". Or bring a labelled JSONL file with --data FILE.jsonl")
    from haltrace.data.sources import source_hooks

    # the tasks' builders belong to the organism, found through the data-source registry (probes never import it)
    for probe_task_for in source_hooks("probe_task_for"):
        pset = probe_task_for(name, model)
        if pset is not None:
            break
    else:
        organism_folder(model)  # not an organism: raises the error saying what to pass instead
        raise ValueError(f"no data source builds the built-in task {name!r} for {model.name_or_path}")
    labels = [r["label"] for r in pset.rows]
    if len(set(labels)) == 1:  # the model's own behaviour decides the labels; say which behaviour was missing
        raise ValueError(f"task {name!r} on {model.name_or_path}: all {len(labels)} examples are "
                         f"'{pset.label_names[labels[0]]}' (none '{pset.label_names[1 - labels[0]]}'), so there is "
                         f"nothing to separate; this model never shows the other behaviour on this task's set "
                         f"{pset.notes or ''}".rstrip())
    check_two_classes(labels, f"task {name!r} on {model.name_or_path}")
    return pset
