"""Write the organism's held-out sets and default fit data to disk, in the public benchmarks' own formats.

The files hold *plain* questions, like the released benchmark files; the organism's chat template adds its
answer cue, so ``haltrace eval --model shapes-llava --pope DIR/pope/pope_adversarial.jsonl --images DIR/images``
takes exactly the path a hub checkpoint takes. Layout of ``DIR``::

    images/<set>_<image_id>.png
    pope/pope_{random,popular,adversarial}.jsonl   {"question_id", "image", "text", "label"} (POPE's format)
    chair/annotations/instances_organism.json      COCO instances (categories = the organism's kinds)
    chair/annotations/captions_organism.json       COCO captions (the ground-truth caption of each image)
    chair/objects.json                             {image file: [objects]} (the older ground-truth format)
    chair/prompts.jsonl                            {"image_id", "image", "text"} ("caption :")
    counterfactual_color.jsonl                     {"question_id", "image", "text", "prior", "pixel"}
    entities.jsonl                                 {"question_id", "text", "answer", "group"}
    fit/<method>.jsonl                             each method's default fit items (docs/data-formats.md)

>>> write_eval_sets(ShapesWorld(), "/tmp/sets")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from haltrace.data.jsonl import save_items
from haltrace.organism import tasks
from haltrace.organism.fit_data import DEFAULT_SIZES, fit_items
from haltrace.organism.world import ShapesWorld

#: fit sets drawn by one generator (same seed): their images are shared on disk
_IMAGE_GROUPS = {"truthprint-yesno": "yesno", "iti": "yesno", "caa": "yesno", "vhr": "yesno"}


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    path.chmod(0o644)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    _write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def _save_image(folder: Path, name: str, pixels: Any, written: set[str]) -> str:
    if name not in written:
        path = folder / name
        tmp = folder / f".{name}.tmp"
        image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(np.asarray(pixels))
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
        path.chmod(0o644)
        written.add(name)
    return name


def _coco_files(world: ShapesWorld, caps: list[tasks.Example], names: list[str]) -> tuple[dict, dict]:
    """COCO ``instances`` and ``captions`` dicts for the caption set (one instance per present object)."""
    categories = [{"id": i + 1, "name": k, "supercategory": "shape"} for i, k in enumerate(world.config.kinds)]
    cat_id = {c["name"]: c["id"] for c in categories}
    size = world.config.image_size
    images = [{"id": int(ex.meta["image_id"]), "file_name": name, "width": size, "height": size}
              for ex, name in zip(caps, names, strict=True)]
    instances, captions = [], []
    for ex in caps:
        for kind in sorted(ex.scene.kinds):
            instances.append({"id": len(instances) + 1, "image_id": int(ex.meta["image_id"]),
                              "category_id": cat_id[kind], "iscrowd": 0})
        captions.append({"id": len(captions) + 1, "image_id": int(ex.meta["image_id"]),
                         "caption": world.caption_text(ex.scene)})
    info = {"description": "haltrace ShapesWorld organism caption set (COCO-style ground truth)"}
    return ({"info": info, "images": images, "annotations": instances, "categories": categories},
            {"info": info, "images": images, "annotations": captions})


def write_fit_sets(world: ShapesWorld, out: str | Path, written: set[str] | None = None) -> dict[str, Path]:
    """Each data-using method's default fit items to ``out/fit/<method>.jsonl``, images to ``out/images``."""
    out = Path(out)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    written = written if written is not None else set()
    paths = {}
    for method in DEFAULT_SIZES:
        items = fit_items(world, method)
        group = _IMAGE_GROUPS.get(method, method)
        names = []
        for i, item in enumerate(items):
            key = item.image_id if item.image_id is not None else i
            names.append(_save_image(images, f"fit_{group}_{key}.png", item.image, written))
        paths[method] = save_items(out / "fit" / f"{method}.jsonl", items, names)
    return paths


def write_eval_sets(world: ShapesWorld, out: str | Path) -> Path:
    """Write every held-out set (and its images) and every method's fit data under ``out``; returns ``out``."""
    out = Path(out)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    written: set[str] = set()

    for split, examples in tasks.pope_sets(world).items():
        rows = []
        for qid, ex in enumerate(examples):
            name = _save_image(images, f"pope_{ex.meta['image_id']:04d}.png", ex.image, written)
            rows.append({"question_id": qid + 1, "image": name, "text": tasks.plain_question(ex.prompt),
                         "label": ex.target})
        _write_jsonl(out / "pope" / f"pope_{split}.jsonl", rows)

    caps = tasks.caption_set(world)
    objects, prompts, names = {}, [], []
    for ex in caps:
        name = _save_image(images, f"caption_{ex.meta['image_id']:04d}.png", ex.image, written)
        names.append(name)
        objects[name] = sorted(ex.scene.kinds)
        prompts.append({"image_id": ex.meta["image_id"], "image": name, "text": ex.prompt})
    _write_text(out / "chair" / "objects.json", json.dumps(objects, indent=1))
    _write_jsonl(out / "chair" / "prompts.jsonl", prompts)
    instances, captions = _coco_files(world, caps, names)
    _write_text(out / "chair" / "annotations" / "instances_organism.json", json.dumps(instances))
    _write_text(out / "chair" / "annotations" / "captions_organism.json", json.dumps(captions))

    rows = []
    for qid, ex in enumerate(tasks.counterfactual_colour_set(world)):
        name = _save_image(images, f"counterfactual_{ex.meta['image_id']:04d}.png", ex.image, written)
        rows.append({"question_id": qid + 1, "image": name, "text": tasks.plain_question(ex.prompt),
                     "prior": ex.meta["prior"], "pixel": ex.meta["pixel"]})
    _write_jsonl(out / "counterfactual_color.jsonl", rows)

    rows = []
    for group, examples in tasks.entity_sets(world).items():
        for ex in examples:
            rows.append({"question_id": len(rows) + 1, "text": tasks.plain_question(ex.prompt),
                         "answer": ex.target, "group": group})
    _write_jsonl(out / "entities.jsonl", rows)
    write_fit_sets(world, out, written)
    return out
