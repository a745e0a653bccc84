"""POPE and CHAIR on a model, from the benchmarks' own files: generate with the runner, save, score.

POPE: the question files as released (``{"question_id", "image", "text", "label"}``, plain questions) and an
image folder. Answers are written in both official answer formats at once, one row per question:
``{"question_id", "prompt", "text", "answer", "model_id"}`` (LLaVA's ``eval_pope.py`` reads ``text`` by
``question_id``; POPE's ``evaluate.py`` reads ``answer`` by line). Scored with POPE's official parser.

CHAIR: captions for the images of a folder that the COCO annotations (``instances_*.json`` +
``captions_*.json``) cover, written as ``{"image_id", "image", "caption"}``, scored by
:func:`haltrace.evals.coco.score_chair` with the official rules.

>>> import json
>>> from pathlib import Path
>>> Path("val2014").mkdir(); img.save("val2014/COCO_val2014_000000000042.jpg")
>>> rows = [{"question_id": i, "image": "COCO_val2014_000000000042.jpg", "text": f"Is there a {o} in the image?",
...          "label": label} for i, (o, label) in enumerate([("dog", "yes"), ("cat", "no")], 1)]
>>> _ = Path("coco_pope_adversarial.json").write_text("".join(json.dumps(r) + "\\n" for r in rows))
>>> settings = GenerationSettings(max_new_tokens=2, batch_size=8)
>>> report = run_pope(model, "coco_pope_adversarial.json", "val2014/", "out/eval", settings)
>>> report["n"], 0.0 <= report["f1"] <= 1.0   # a random tiny model: any F1
(2, True)
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from haltrace.data.jsonl import load_items
from haltrace.evals.pope import pope_metrics
from haltrace.evals.runner import GenerationSettings, Job, run_jobs

#: the prompt most LVLM papers caption COCO with for CHAIR
DEFAULT_CAPTION_PROMPT = "Please describe this image in detail."
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def pope_answer_path(out_dir: str | Path, question_file: str | Path) -> Path:
    return Path(out_dir) / "pope" / f"{Path(question_file).stem}.answers.jsonl"


def run_pope(model: Any, question_file: str | Path, images: str | Path | None, out_dir: str | Path,
             settings: GenerationSettings | None = None, *, fitted: Any = None, overwrite: bool = False,
             parser: str = "official", progress: Callable[[int, int], None] | None = None) -> dict:
    """Answer one POPE question file (resuming a killed run), save the answers, return the metrics.

    The metrics dict also holds ``answers_file`` and ``n``; the answers are aligned by ``question_id``.
    """
    items = load_items(question_file, images=images, kinds=("yesno",))
    keys = [q.question_id if q.question_id is not None else i for i, q in enumerate(items, 1)]
    if len(set(map(str, keys))) != len(keys):
        raise ValueError(f"{question_file}: question_id values repeat; each question needs its own id")
    jobs = [Job(key, q.question, q.image) for key, q in zip(keys, items, strict=True)]
    name = str(model.name_or_path)

    def row(job: Job, text: str) -> dict:
        return {"question_id": job.key, "prompt": job.question, "text": text, "answer": text, "model_id": name}

    out = pope_answer_path(out_dir, question_file)
    rows = run_jobs(model, jobs, out, row=row, key_field="question_id", settings=settings, fitted=fitted,
                    task=f"pope:{Path(question_file).name}", overwrite=overwrite, progress=progress)
    metrics = pope_metrics([r["text"] for r in rows], [q.label for q in items], parser=parser)
    return metrics | {"answers_file": str(out)}


def chair_images(folder: str | Path, known: dict[str, Any], n: int | None = None, seed: int = 0
                 ) -> list[tuple[Any, Path]]:
    """``(image_id, path)`` for the images in ``folder`` that have ground truth (``known``: file name ->
    image id), sorted by name; ``n`` draws that many with ``seed`` (kept in name order)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--chair-images {folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    covered = [(known[p.name], p) for p in files if p.name in known]
    if not covered:
        raise ValueError(f"none of the {len(files)} images in {folder} appears in the annotations' image list "
                         "(matched by file name); is this the image folder of that split?")
    if n is not None:
        if n < 1:
            raise ValueError(f"--n must be at least 1, got {n}")
        if n < len(covered):
            picks = sorted(random.Random(seed).sample(range(len(covered)), n))
            covered = [covered[i] for i in picks]
    return covered


def run_captions(model: Any, images: Sequence[tuple[Any, Path]], out: str | Path, *,
                 prompt: str = DEFAULT_CAPTION_PROMPT, settings: GenerationSettings | None = None,
                 fitted: Any = None, overwrite: bool = False,
                 progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """Caption ``(image_id, path)`` pairs into ``out`` (JSONL ``{"image_id", "image", "caption"}``)."""
    jobs = [Job(image_id, prompt, path) for image_id, path in images]

    def row(job: Job, text: str) -> dict:
        return {"image_id": job.key, "image": Path(job.image).name, "caption": text}

    return run_jobs(model, jobs, out, row=row, key_field="image_id", settings=settings, fitted=fitted,
                    task=f"captions:{prompt}", overwrite=overwrite, progress=progress)
