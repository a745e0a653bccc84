"""The generation runner: answers and captions from any supported model, written as they come, resumable.

One runner serves every evaluation on real files (POPE questions, CHAIR images) and every model (organism or
hub checkpoint): prompts are built by :func:`haltrace.models.prompting.build_prompt` (the model's chat template,
or a ``{question}`` template), batches are left-padded, decoding is greedy or beam search, and everything can
run under a fitted intervention.

Resuming: rows are appended one batch at a time (flushed; fsynced about once a second and at the end), in the
order of the jobs, with a
settings file next to them (``<answers>.run.json``). A second run of the same command keeps only whole batches
that match the jobs, drops a torn last line, and continues; batches always start at multiples of
``batch_size``, so a resumed file is identical to an uninterrupted run's. Settings that differ (another model,
intervention, template, length or batch size) are refused instead of mixing two runs in one file.

>>> from pathlib import Path
>>> Path("val2014").mkdir(); img.save("val2014/COCO_val2014_000000000042.jpg")
>>> jobs = [Job(key=1, question="Is there a dog in the image?", image="val2014/COCO_val2014_000000000042.jpg")]
>>> rows = run_jobs(model, jobs, "out/answers.jsonl", key_field="question_id",
...                 row=lambda job, text: {"question_id": job.key, "text": text},
...                 settings=GenerationSettings(max_new_tokens=2))
>>> [r["question_id"] for r in rows], Path("out/answers.jsonl").is_file()
([1], True)
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from haltrace.data.images import open_images
from haltrace.errors import HaltraceError
from haltrace.models.prompting import build_prompt, prompt_style

#: seconds between fsyncs of an answers file (every batch is flushed to the OS, which a kill -9 cannot lose)
FSYNC_EVERY_S = 1.0


@dataclass
class Job:
    """One generation: ``key`` identifies its row (question_id / image_id), ``question`` is plain text."""

    key: Any
    question: str
    image: Any = None


@dataclass
class GenerationSettings:
    """How answers are generated; recorded next to every answer file and checked on resume."""

    max_new_tokens: int = 32
    num_beams: int = 1
    batch_size: int = 8
    template: str | None = None

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "num_beams", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.template is not None and "{question}" not in self.template:
            raise ValueError(f"--prompt-template {self.template!r} has no {{question}} field")


class ResumeError(HaltraceError):
    """An existing answers file belongs to another run (other settings or other questions)."""


def _fingerprint_fitted(fitted: Any) -> str | None:
    if fitted is None:
        return None
    prov = getattr(fitted, "provenance", {}) or {}
    data = prov.get("data", {}) if isinstance(prov, dict) else {}
    return json.dumps({"method": getattr(fitted, "method", None), "data": data.get("fingerprint"),
                       "alpha": prov.get("alpha"), "layers": prov.get("layers")}, sort_keys=True, default=str)


def run_record(model: Any, settings: GenerationSettings, fitted: Any = None, task: str = "") -> dict:
    """What identifies a run: model, intervention, prompt style and generation settings."""
    return {"task": task, "model": str(model.name_or_path), "intervention": _fingerprint_fitted(fitted),
            "prompt_style": prompt_style(model, settings.template), **asdict(settings)}


def _read_done(path: Path, jobs: Sequence[Job], key_field: str, batch_size: int) -> list[dict]:
    """Complete rows already written that match ``jobs`` in order, cut down to whole batches."""
    if not path.exists():
        return []
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.endswith("\n"):
                break  # a torn last line from a killed run
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    for i, row in enumerate(rows[: len(jobs)]):
        if not isinstance(row, dict) or row.get(key_field) != jobs[i].key:
            found = row.get(key_field) if isinstance(row, dict) else row
            raise ResumeError(f"{path} row {i + 1} is for {key_field} {found!r} but this run's item "
                              f"{i + 1} is {jobs[i].key!r}: the file belongs to other questions; use another "
                              "--out or --overwrite")
    if len(rows) >= len(jobs):
        return rows[: len(jobs)]
    return rows[: len(rows) // batch_size * batch_size]


def _rewrite(path: Path, rows: Sequence[dict]) -> None:
    from haltrace.trace.store import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    path.chmod(0o644)


def _check_record(path: Path, record: dict, overwrite: bool, *, write: bool = True) -> None:
    from haltrace.trace.store import atomic_write_text

    meta = path.with_name(path.name + ".run.json")
    if path.exists() and not overwrite:
        old = json.loads(meta.read_text()) if meta.exists() else None
        if old != record:
            diff = sorted(k for k in record if old is None or old.get(k) != record[k])
            raise ResumeError(f"{path} holds answers from another run (differs in {', '.join(diff)}); resuming "
                              "would mix them: use another --out, or --overwrite to start again")
    elif overwrite and path.exists():
        path.unlink()
    if not write:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(meta, json.dumps(record, indent=1, sort_keys=True) + "\n")
    meta.chmod(0o644)


def _batches(n: int, start: int, size: int) -> Iterator[range]:
    for lo in range(start, n, size):
        yield range(lo, min(n, lo + size))


@torch.no_grad()
def generate_texts(model: Any, jobs: Sequence[Job], settings: GenerationSettings, *, fitted: Any = None,
                   prompt_cache: dict | None = None) -> list[str]:
    """Generated text for ``jobs`` (one batch, no files): the runner's inner step, also used by fits.

    ``prompt_cache`` (a dict kept across batches) saves rendering the chat template again for a question seen
    before: benchmark files repeat few question texts (POPE asks about a handful of objects).
    """
    from haltrace.models.base import require_local_weights

    require_local_weights(model, "generation (the evaluation runner and generating fits)")
    cache = prompt_cache if prompt_cache is not None else {}
    prompts = []
    for j in jobs:
        key = (j.question, j.image is not None)
        if key not in cache:
            cache[key] = build_prompt(model, j.question, image=j.image is not None, template=settings.template)
        prompts.append(cache[key])
    images = open_images([j.image for j in jobs])
    if images is not None and any(im is None for im in images):
        raise ValueError("a batch mixes items with and without images; run them separately")
    inputs = model.prepare(prompts, images)
    tok = model.tokenizer
    kwargs: dict[str, Any] = {"max_new_tokens": settings.max_new_tokens, "do_sample": False,
                              "num_beams": settings.num_beams}
    if getattr(model.hf.generation_config, "pad_token_id", None) is None:
        kwargs["pad_token_id"] = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    context = fitted.apply(model) if fitted is not None else nullcontext()
    extra = dict(getattr(fitted, "generate_kwargs", None) or {})
    with context:
        out = model.hf.generate(**inputs, **kwargs, **extra)
    new = out[:, inputs["input_ids"].shape[1]:]
    return [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]


def part_path(out: str | Path, rank: int, world: int) -> Path:
    """``<answers>.rank<r>-of-<w>.jsonl``: the part of a data-parallel run that rank ``r`` writes."""
    path = Path(out)
    return path.with_name(f"{path.name}.rank{rank}-of-{world}.jsonl")


def _parts_world(path: Path) -> int:
    """The world size of unmerged parts next to ``path`` (0 when there are none); refuses a mix."""
    import re

    worlds = set()
    for p in path.parent.glob(f"{path.name}.rank*-of-*.jsonl"):
        m = re.fullmatch(re.escape(path.name) + r"\.rank(\d+)-of-(\d+)\.jsonl", p.name)
        if m:
            worlds.add(int(m.group(2)))
    if len(worlds) > 1:
        raise ResumeError(f"{path.parent} holds parts of {path.name} from runs with {sorted(worlds)} processes; "
                          "delete the parts of the one you do not want to resume")
    return worlds.pop() if worlds else 0


def _remove_part(part: Path) -> None:
    for p in (part, part.with_name(part.name + ".run.json")):
        p.unlink(missing_ok=True)


def run_jobs(model: Any, jobs: Sequence[Job], out: str | Path, *, row: Callable[[Job, str], dict],
             key_field: str, settings: GenerationSettings | None = None, fitted: Any = None, task: str = "",
             overwrite: bool = False, progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """Generate for every job not yet in ``out`` and append its ``row(job, text)``; returns every row.

    ``progress(done, total)`` is called after each batch (the CLI draws a bar with an ETA from it).

    Data-parallel (``torchrun`` / ``accelerate launch``: ``RANK`` and ``WORLD_SIZE`` set): rank ``r`` of ``w``
    takes a contiguous run of whole batches (:func:`haltrace.distributed.rank_slice`) and writes it, resumably,
    to ``<answers>.rank<r>-of-<w>.jsonl``; after a gloo barrier rank 0 merges the parts into ``out`` in job
    order (then byte for byte a single-process run's file) and removes them; every rank returns every row.
    Resuming reuses the parts: relaunch with the same number of processes, or run once in a single process,
    which finishes each part in turn and merges.
    """
    from haltrace.distributed import barrier, rank_slice, rank_world

    settings = settings or GenerationSettings()
    if not jobs:
        raise ValueError("nothing to generate: no questions or images given")
    path = Path(out)
    rank, world = rank_world()
    parts = world if world > 1 else (0 if overwrite else _parts_world(path))
    if parts < 2:
        return _run_file(model, jobs, path, row=row, key_field=key_field, settings=settings, fitted=fitted,
                         task=task, overwrite=overwrite, progress=progress)
    record = run_record(model, settings, fitted, task)
    if path.exists() and not overwrite:  # a finished merge, or another run's file: never mixed
        _check_record(path, record, False, write=False)
        merged = _read_done(path, jobs, key_field, settings.batch_size)
        if len(merged) == len(jobs):
            return merged
    mine = range(rank, rank + 1) if world > 1 else range(parts)
    for r in mine:
        span = rank_slice(len(jobs), settings.batch_size, r, parts)
        part = part_path(path, r, parts)
        if len(span):
            _run_file(model, [jobs[i] for i in span], part, row=row, key_field=key_field, settings=settings,
                      fitted=fitted, task=task, overwrite=overwrite, progress=progress)
    barrier()
    rows: list[dict] = []
    for r in range(parts):
        span = rank_slice(len(jobs), settings.batch_size, r, parts)
        if len(span):
            rows += _read_done(part_path(path, r, parts), [jobs[i] for i in span], key_field, settings.batch_size)
    if len(rows) != len(jobs):
        raise RuntimeError(f"data-parallel merge of {path}: the parts hold {len(rows)} of {len(jobs)} rows")
    barrier()  # every rank has read the parts before rank 0 replaces them by the merged file
    if world == 1 or rank == 0:
        _check_record(path, record, True)
        _rewrite(path, rows)
        for r in range(parts):
            _remove_part(part_path(path, r, parts))
    return rows


def _run_file(model: Any, jobs: Sequence[Job], path: Path, *, row: Callable[[Job, str], dict], key_field: str,
              settings: GenerationSettings, fitted: Any = None, task: str = "", overwrite: bool = False,
              progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """The single-process runner: one answers file, appended batch by batch, resumable."""
    _check_record(path, run_record(model, settings, fitted, task), overwrite)
    done = _read_done(path, jobs, key_field, settings.batch_size)
    if path.exists() and path.read_text(encoding="utf-8") != "".join(json.dumps(r) + "\n" for r in done):
        _rewrite(path, done)  # drop a torn line or a partial batch before appending
    if progress is not None:
        progress(len(done), len(jobs))
    prompts: dict = {}
    synced = time.monotonic()
    with open(path, "a", encoding="utf-8") as fh:
        for batch in _batches(len(jobs), len(done), settings.batch_size):
            chunk = [jobs[i] for i in batch]
            texts = generate_texts(model, chunk, settings, fitted=fitted, prompt_cache=prompts)
            rows = [row(job, text) for job, text in zip(chunk, texts, strict=True)]
            fh.write("".join(json.dumps(r) + "\n" for r in rows))
            fh.flush()  # in the OS after every batch: a killed process loses nothing written
            if time.monotonic() - synced > FSYNC_EVERY_S:  # on disk about once a second (power loss)
                os.fsync(fh.fileno())
                synced = time.monotonic()
            done += rows
            if progress is not None:
                progress(len(done), len(jobs))
        fh.flush()
        os.fsync(fh.fileno())
    path.chmod(0o644)
    return done

