"""Write the organism's held-out sets to disk in the official file formats.

Layout of ``DIR``::

    images/<set>_<image_id>.png
    pope/pope_{random,popular,adversarial}.jsonl   {"question_id", "image", "text", "label"} (POPE format)
    chair/objects.json                             {image file: [ground-truth objects]} (CHAIR ground truth)
    chair/prompts.jsonl                            {"image_id", "image", "text"}
    counterfactual_color.jsonl                     {"question_id", "image", "text", "prior", "pixel"}
    entities.jsonl                                 {"question_id", "text", "answer", "group"}

>>> write_eval_sets(ShapesWorld(), "/tmp/sets")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from PIL import Image

from haltrace.organism import tasks
from haltrace.organism.world import ShapesWorld


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    _write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def _save_image(folder: Path, name: str, pixels, written: set[str]) -> str:
    if name not in written:
        path = folder / name
        tmp = folder / f".{name}.tmp"
        Image.fromarray(pixels).save(tmp, format="PNG")
        os.replace(tmp, path)
        written.add(name)
    return name


def write_eval_sets(world: ShapesWorld, out: str | Path) -> Path:
    """Write every held-out set (and its images) under ``out``; returns ``out``."""
    out = Path(out)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    written: set[str] = set()

    for split, examples in tasks.pope_sets(world).items():
        rows = []
        for qid, ex in enumerate(examples):
            name = _save_image(images, f"pope_{ex.meta['image_id']:04d}.png", ex.image, written)
            rows.append({"question_id": qid + 1, "image": name, "text": ex.full_prompt, "label": ex.target})
        _write_jsonl(out / "pope" / f"pope_{split}.jsonl", rows)

    caps = tasks.caption_set(world)
    objects, prompts = {}, []
    for ex in caps:
        name = _save_image(images, f"caption_{ex.meta['image_id']:04d}.png", ex.image, written)
        objects[name] = sorted(ex.scene.kinds)
        prompts.append({"image_id": ex.meta["image_id"], "image": name, "text": ex.full_prompt})
    _write_text(out / "chair" / "objects.json", json.dumps(objects, indent=1))
    _write_jsonl(out / "chair" / "prompts.jsonl", prompts)

    rows = []
    for qid, ex in enumerate(tasks.counterfactual_colour_set(world)):
        name = _save_image(images, f"counterfactual_{ex.meta['image_id']:04d}.png", ex.image, written)
        rows.append({"question_id": qid + 1, "image": name, "text": ex.full_prompt,
                     "prior": ex.meta["prior"], "pixel": ex.meta["pixel"]})
    _write_jsonl(out / "counterfactual_color.jsonl", rows)

    rows = []
    for group, examples in tasks.entity_sets(world).items():
        for ex in examples:
            rows.append({"question_id": len(rows) + 1, "text": ex.prompt, "answer": ex.target, "group": group})
    _write_jsonl(out / "entities.jsonl", rows)
    return out
