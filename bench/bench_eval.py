"""Eval runner overhead: ``run_pope`` (the runner, writing its files) vs a bare batched ``generate`` loop.

Both answer the same POPE questions in the same batches with the same greedy settings, and must give the
same answers (checked every round). Conditions, timed in the same run, in a rotating order within every round
(so drift from other processes on the machine hits all alike), after warm-up rounds:

* ``bare loop``: what a user would write by hand. The prompts are built once, before timing, with an
  f-string that gives the same final text as the model's chat template (asserted); in the timed part, per
  batch: open the images (PIL, ``.convert("RGB")``), ``processor(text=..., images=..., padding=True)`` with
  left padding, ``model.generate(**inputs, max_new_tokens=N, do_sample=False)``, ``batch_decode`` of the new
  tokens, stripped; texts collected in a list, no files
* ``runner``: ``run_pope(model, question_file, images, <fresh folder>, GenerationSettings(...))``: reads and
  checks the question file, writes the settings file, builds every prompt with the chat template, opens the
  images, prepares, generates, decodes, appends each batch's rows (flushed; fsync about once a second) and scores the answers
* ``generate_texts`` (diagnostic, organism only): the runner's inner step (``haltrace.evals.runner.generate_texts``)
  over the same batches, no files: splits the overhead into the per-batch step and the file/resume/scoring part

The overhead is the median over rounds of (runner time / bare loop time within that round). Goal <= 1.05x.
Threads are fixed (``--threads``, default 1) so runs are comparable. Answer files go to a temporary folder
on the local disk (``--tmp``; fsync there is real).

Models:

* the shipped organism (``haltrace.load("shapes-llava")``) on ``pope/pope_adversarial.jsonl`` of its exported
  evaluation sets (``write_eval_sets``, 600 questions, 32x32 images), CLI defaults (max_new_tokens 32,
  batch 8; it answers "yes"/"no" then EOS, so each batch decodes a few tokens)
* a random LLaVA with a Llama text model of 8 layers x 512 (the "8x512 Llama" of the other benches) behind
  the organism's tiny CLIP tower, processor and 32x32 images: the first ``--big-n`` questions of the same
  file, max_new_tokens 16, batch 8 (random weights rarely stop early, so per-token compute dominates)

After the timed rounds, ``--parts-runs`` more ``run_pope`` calls per model time each part where it is
called (the runner's own: per-batch fsync, ``build_prompt``, ``load_items``, the settings file, scoring; and
the shared ``open_images``, ``prepare``, ``generate``), so the overhead can be put on lines of the runner.
``--profile`` also prints the top of a cProfile of one ``run_pope`` per model.

Usage::

    HF_HUB_OFFLINE=1 PIP_NO_INDEX=1 .venv/bin/python bench/bench_eval.py                  # full, writes RESULTS.md
    HF_HUB_OFFLINE=1 PIP_NO_INDEX=1 .venv/bin/python bench/bench_eval.py --quick --no-write
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "bench" / "RESULTS.md"
HEADING = "## Eval runner"
GOAL = 1.05
POPE_FILE = "pope_adversarial.jsonl"

from bench import paired  # noqa: E402
from bench.paired import median_and_quartiles, paired_ratios, paired_rounds  # noqa: E402
from haltrace.evals.benchmarks import pope_answer_path, run_pope  # noqa: E402
from haltrace.evals.runner import GenerationSettings, Job, generate_texts  # noqa: E402
from haltrace.models import Model  # noqa: E402
from haltrace.models.prompting import build_prompt  # noqa: E402


@dataclass
class Case:
    label: str
    model: Model
    question_file: Path
    images: Path
    settings: GenerationSettings
    questions: list[dict]  # the rows of question_file
    diagnostic: bool = True  # also time generate_texts (where the runner's own work is a visible share)


# --- models and data -----------------------------------------------------------------------------------------

def export_sets(tmp: Path) -> tuple[Path, Path, Any]:
    """The organism's POPE files and images under ``tmp`` (``write_eval_sets``), and its world."""
    from haltrace.organism.export_sets import write_eval_sets
    from haltrace.organism.paths import resolve_organism
    from haltrace.organism.train import load_world

    world = load_world(resolve_organism("shapes-llava"))
    write_eval_sets(world, tmp / "sets")
    return tmp / "sets" / "pope" / POPE_FILE, tmp / "sets" / "images", world


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def organism_case(question_file: Path, images: Path, n: int | None) -> Case:
    import haltrace

    model = haltrace.load("shapes-llava", device="cpu", dtype="float32")
    rows = read_rows(question_file)
    if n is not None and n < len(rows):
        question_file = subset(question_file, rows[:n], "organism")
        rows = rows[:n]
    return Case(f"organism shapes-llava (trained), {len(rows)} questions", model, question_file, images,
                GenerationSettings(max_new_tokens=32, batch_size=8), rows)


def big_llava_case(question_file: Path, images: Path, world: Any, n: int) -> Case:
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from haltrace.organism.processing import build_processor
    from haltrace.organism.train import PRESETS, build_model_config

    processor = build_processor(world)
    small = build_model_config(world, PRESETS["default"])  # the organism's vision tower, image tokens, vocab
    t = small.text_config
    text = LlamaConfig(vocab_size=t.vocab_size, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                       num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=128,
                       bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id, pad_token_id=t.pad_token_id,
                       tie_word_embeddings=False)
    cfg = LlavaConfig(vision_config=small.vision_config, text_config=text, image_token_index=small.image_token_index,
                      image_seq_length=small.image_seq_length, projector_hidden_act="gelu",
                      vision_feature_select_strategy="default", vision_feature_layer=-1)
    torch.manual_seed(0)
    hf = LlavaForConditionalGeneration(cfg).eval()
    gen = hf.generation_config  # as a saved checkpoint would have it: no "pad_token_id is None" fallback path
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = t.bos_token_id, t.eos_token_id, t.pad_token_id
    model = Model.from_hf(hf, processor, name="random-llava-llama-8x512")
    rows = read_rows(question_file)[:n]
    return Case(f"random LLaVA, Llama 8x512 text, 32x32 images, {len(rows)} questions", model,
                subset(question_file, rows, "big"), images, GenerationSettings(max_new_tokens=16, batch_size=8),
                rows, diagnostic=False)


def subset(question_file: Path, rows: list[dict], tag: str) -> Path:
    path = question_file.with_name(f"{question_file.stem}.{tag}{len(rows)}.jsonl")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# --- the two loops -------------------------------------------------------------------------------------------

def hand_prompts(case: Case) -> list[str]:
    """The prompts a user writes by hand for this model, checked against the chat template's."""
    prompts = [f"<image> {row['text']} answer :" for row in case.questions]  # LLaVA-style organism template
    for row, prompt in zip(case.questions, prompts, strict=True):
        expected = build_prompt(case.model, row["text"], image=True)
        if prompt != expected:
            raise AssertionError(f"hand-built prompt {prompt!r} differs from the chat template's {expected!r}")
    return prompts


def bare_loop(case: Case, prompts: list[str]) -> list[str]:
    """Batches as the runner cuts them: open images, process with left padding, generate, decode."""
    from PIL import Image

    processor, hf = case.model.processor, case.model.hf
    bs, n_new = case.settings.batch_size, case.settings.max_new_tokens
    paths = [case.images / row["image"] for row in case.questions]
    processor.tokenizer.padding_side = "left"
    texts: list[str] = []
    for lo in range(0, len(prompts), bs):
        images = [Image.open(p).convert("RGB") for p in paths[lo:lo + bs]]
        inputs = processor(text=prompts[lo:lo + bs], images=images, padding=True, return_tensors="pt")
        out = hf.generate(**inputs, max_new_tokens=n_new, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1]:]
        texts += [t.strip() for t in processor.batch_decode(new, skip_special_tokens=True)]
    return texts


def inner_steps(case: Case) -> list[str]:
    """``generate_texts`` (the runner's per-batch step) over the same batches, no files."""
    jobs = [Job(row["question_id"], row["text"], case.images / row["image"]) for row in case.questions]
    bs = case.settings.batch_size
    return [t for lo in range(0, len(jobs), bs) for t in generate_texts(case.model, jobs[lo:lo + bs], case.settings)]


#: the runner's own work (the bare loop has none of it), then the work both do, as timed by ``instrumented``
OWN_PARTS = ["fsync", "build_prompt", "load_items", "settings file (_check_record)", "_read_done",
             "pope_metrics"]
SHARED_PARTS = ["open_images", "prepare", "generate"]
PART_NAMES = [*OWN_PARTS, *SHARED_PARTS, "other", "run_pope (total)"]


@contextmanager
def instrumented(model: Model) -> Iterator[dict[str, list[float]]]:
    """Time the parts of ``run_pope`` where they are called: ``{part: [calls, seconds]}``. Module attributes of
    ``haltrace.evals.runner`` / ``benchmarks`` (and ``model.prepare``, ``model.hf.generate``) are wrapped in a
    timer for the duration (~1 us a call) and put back after."""
    import haltrace.evals.benchmarks as benchmarks
    import haltrace.evals.runner as runner

    acc: dict[str, list[float]] = {}

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*a: Any, **k: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                entry = acc.setdefault(name, [0, 0.0])
                entry[0] += 1
                entry[1] += time.perf_counter() - start
        return call

    real_os = runner.os

    class _Os:  # runner's ``os`` with a timed fsync (the per-batch one; the settings file's is in _check_record)
        fsync = staticmethod(timed("fsync", real_os.fsync))

        def __getattr__(self, attr: str) -> Any:
            return getattr(real_os, attr)

    patches = [(runner, "build_prompt", "build_prompt"), (runner, "open_images", "open_images"),
               (runner, "_check_record", "settings file (_check_record)"), (runner, "_read_done", "_read_done"),
               (benchmarks, "load_items", "load_items"), (benchmarks, "pope_metrics", "pope_metrics")]
    saved = [(mod, attr, getattr(mod, attr)) for mod, attr, _ in patches]
    for mod, attr, name in patches:
        setattr(mod, attr, timed(name, getattr(mod, attr)))
    runner.os = _Os()  # type: ignore[assignment]
    model.prepare = timed("prepare", model.prepare)  # type: ignore[method-assign]
    model.hf.generate = timed("generate", model.hf.generate)
    try:
        yield acc
    finally:
        for mod, attr, fn in saved:
            setattr(mod, attr, fn)
        runner.os = real_os
        del model.prepare
        del model.hf.generate


def timed_parts(case: Case, tmp: Path, runs: int) -> dict[str, tuple[float, float]]:
    """``{part: (calls per run, median ms per run)}`` over ``runs`` instrumented ``run_pope`` calls (fresh
    folders), plus ``"run_pope (total)"``, ``"other"`` (total minus every timed part) and ``"bare loop"`` (the
    bare loop timed alternately with them, so percentages compare like with like)."""
    prompts = hand_prompts(case)
    samples: list[dict[str, list[float]]] = []
    for i in range(runs):
        start = time.perf_counter()
        bare_loop(case, prompts)
        bare_s = time.perf_counter() - start
        out_dir = tmp / f"parts{i}"
        with instrumented(case.model) as acc:
            start = time.perf_counter()
            run_pope(case.model, case.question_file, case.images, out_dir, case.settings)
            acc["run_pope (total)"] = [1, time.perf_counter() - start]
        acc["other"] = [0, acc["run_pope (total)"][1] - sum(v[1] for k, v in acc.items() if k != "run_pope (total)")]
        acc["bare loop"] = [1, bare_s]
        samples.append(acc)
        shutil.rmtree(out_dir)
    return {n: (samples[0].get(n, [0, 0.0])[0], 1000 * statistics.median(s.get(n, [0, 0.0])[1] for s in samples))
            for n in [*PART_NAMES, "bare loop"]}


# --- timing --------------------------------------------------------------------------------------------------

def measure(case: Case, tmp: Path, reps: int, warmup: int, min_seconds: float, max_reps: int = 200
            ) -> dict[str, Any]:
    prompts = hand_prompts(case)
    counter = itertools.count()
    reference: list[str] = []

    def check(name: str, texts: list[str]) -> None:
        if texts != reference:
            bad = next(i for i, (a, b) in enumerate(zip(texts, reference, strict=True)) if a != b)
            raise AssertionError(f"{case.label}: {name} answered {texts[bad]!r} to question {bad + 1}, the bare "
                                 f"loop {reference[bad]!r}")

    names = ["bare loop", "runner"] + (["generate_texts"] if case.diagnostic else [])
    cpu: dict[str, list[float]] = {n: [] for n in names}  # process CPU seconds, round by round like the wall times

    def run(name: str) -> float:
        if name == "runner":
            out_dir = tmp / f"run{next(counter)}"  # a fresh folder each time: no resuming, all files written
            start, start_cpu = time.perf_counter(), time.process_time()
            run_pope(case.model, case.question_file, case.images, out_dir, case.settings)
            seconds, cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
            check(name, [r["text"] for r in read_rows(pope_answer_path(out_dir, case.question_file))])
            shutil.rmtree(out_dir)
        else:
            start, start_cpu = time.perf_counter(), time.process_time()
            texts = bare_loop(case, prompts) if name == "bare loop" else inner_steps(case)
            seconds, cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
            if not reference:
                reference.extend(texts)
            check(name, texts)
        cpu[name].append(cpu_s)
        return seconds

    for _ in range(warmup):
        for name in names:
            run(name)
    for values in cpu.values():
        values.clear()
    times, rounds = paired_rounds(run, names, reps, min_seconds, max_reps)
    stats = {n: median_and_quartiles(r) for n, r in paired_ratios(times, "bare loop").items() if n != "bare loop"}
    cpu_stats = {n: median_and_quartiles(r) for n, r in paired_ratios(cpu, "bare loop").items() if n != "bare loop"}
    n_q = len(case.questions)
    return {"median_s": {n: statistics.median(t) for n, t in times.items()},
            "qps": {n: n_q / statistics.median(t) for n, t in times.items()},
            "ratio": {n: m for n, (m, _, _) in stats.items()},
            "quartiles": {n: [q1, q3] for n, (_, q1, q3) in stats.items()}, "reps": rounds,
            "cpu_ratio": {n: m for n, (m, _, _) in cpu_stats.items()},
            "cpu_quartiles": {n: [q1, q3] for n, (_, q1, q3) in cpu_stats.items()},
            "times": times, "yes": sum(t.lower().startswith("yes") for t in reference), "n": n_q,
            "sample": reference[:3]}


def profile_runner(case: Case, tmp: Path, top: int = 30) -> str:
    """The top of a cProfile of one ``run_pope`` (fresh folder), by cumulative and by own time."""
    import cProfile
    import io
    import pstats

    out_dir = tmp / "profile"
    prof = cProfile.Profile()
    prof.enable()
    run_pope(case.model, case.question_file, case.images, out_dir, case.settings)
    prof.disable()
    shutil.rmtree(out_dir)
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(top)
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()


def parts_line(parts: dict[str, tuple[float, float]]) -> str:
    bare_ms = parts["bare loop"][1]
    return ", ".join(f"{n} {ms:.1f} ms ({100 * ms / bare_ms:.1f}%)" for n, (_c, ms) in parts.items())


# --- report --------------------------------------------------------------------------------------------------

def section(results: list[tuple[Case, dict[str, Any]]], args: argparse.Namespace, fs: str) -> str:
    flags = "--quick" if args.quick else (f"--reps {args.reps} --min-seconds {args.min_seconds:.0f} "
                                          f"--warmup {args.warmup} --threads {args.threads} --big-n {args.big_n}")
    flags += f" --parts-runs {args.parts_runs}"
    lines = [
        HEADING, "",
        f"`bench/bench_eval.py` (`{flags}`), {time.strftime('%Y-%m-%d')}, CPU only, torch {torch.__version__}, "
        f"transformers {_transformers_version()}, Python {platform.python_version()}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores shared with other jobs, "
        f"{args.threads} torch thread(s); answer files on {fs}. "
        "`runner` = `run_pope(model, question_file, images, <fresh folder>, GenerationSettings(...))` (reads the "
        "question file, writes the settings file, chat-template prompts, appends each batch's rows with a flush, "
        "fsync about once a second and at the end, scores); `bare loop` = the same questions in the same batches by hand: prompts built once with an "
        "f-string (same text as the chat template, asserted), then per batch PIL open, `processor(..., "
        "padding=True)` left-padded, `model.generate(max_new_tokens=N, do_sample=False)`, `batch_decode`, no "
        "files; both give identical answers (asserted every round). `generate_texts` (diagnostic) = the runner's "
        "per-batch step over the same batches, no files (organism only: on the 8x512 model the runner's own "
        "work is too small a share to split). Conditions in a rotating order each round, ratio = "
        "median over rounds of x / bare loop within a round, [q1-q3] in brackets; at least `--reps` rounds, more "
        "until a model has been timed `--min-seconds`. Goal <= 1.05x (on wall time). The CPU-time ratio (process "
        "CPU seconds, same pairing) is a diagnostic that other jobs on the machine disturb much less; it leaves out "
        "time spent waiting on the disk (fsync).", "",
        "| model | batch x max_new_tokens | rounds | bare loop median (s) | runner median (s) | questions/s bare / "
        "runner | runner / bare [q1-q3] | CPU time: runner / bare [q1-q3] | generate_texts / bare [q1-q3] | goal |",
        "|---|---|---:|---:|---:|---|---|---|---|---|",
    ]
    for case, r in results:
        ratio = r["ratio"]["runner"]
        q1, q3 = r["quartiles"]["runner"]
        gen = "-"
        if "generate_texts" in r["ratio"]:
            g1, g3 = r["quartiles"]["generate_texts"]
            gen = f"{r['ratio']['generate_texts']:.3f}x [{g1:.2f}-{g3:.2f}]"
        c1, c3 = r["cpu_quartiles"]["runner"]
        s = case.settings
        lines.append(
            f"| {case.label} | {s.batch_size} x {s.max_new_tokens} | {r['reps']} | {r['median_s']['bare loop']:.3f} | "
            f"{r['median_s']['runner']:.3f} | {r['qps']['bare loop']:.0f} / {r['qps']['runner']:.0f} | "
            f"{ratio:.3f}x [{q1:.2f}-{q3:.2f}] | {r['cpu_ratio']['runner']:.3f}x [{c1:.2f}-{c3:.2f}] | "
            f"{gen} | "
            f"{'met' if ratio <= GOAL else 'missed'} |")
    lines += ["", f"Where `run_pope`'s time goes: {args.parts_runs} more calls per model after the timed rounds, "
              "each after a bare loop, with each part timed where it is called (a wrapper around the function, ~1 "
              "us a call): median ms per `run_pope` call and, in brackets, % of the median bare loop of this "
              "phase; the runner's own parts first (the bare loop has none of them), then the work both do; "
              "`other` = the rest (row JSON + writes, batching, decoding, `run_pope`'s own code).", "",
              "| model | bare loop | " + " | ".join(n if n != "run_pope (total)" else "run_pope total"
                                                   for n in PART_NAMES) + " |",
              "|---|---:|" + "---:|" * len(PART_NAMES)]
    for case, r in results:
        bare_ms = r["parts"]["bare loop"][1]
        cells = [f"{bare_ms:.1f}"] + [f"{ms:.1f} ({100 * ms / bare_ms:.1f}%)"
                                      for _calls, ms in (r["parts"][n] for n in PART_NAMES)]
        lines.append(f"| {case.label} | " + " | ".join(cells) + " |")
    lines += ["", "Rerun: `HF_HUB_OFFLINE=1 PIP_NO_INDEX=1 .venv/bin/python bench/bench_eval.py` (full, rewrites "
              "this section; ~4 min on 2 cores), `--quick --no-write` for a smoke test (<1 min), `--profile` to "
              "also print the top of a cProfile of one runner call per model."]
    return "\n".join(lines) + "\n"


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _filesystem(path: Path) -> str:
    """``ext4 (/dev/vda)`` for the mount holding ``path``, from /proc/mounts (Linux), else ``local disk``."""
    try:
        best = ("", "local disk")
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, kind = line.split()[:3]
            if str(path.resolve()).startswith(mnt.rstrip("/") + "/") and len(mnt) >= len(best[0]):
                best = (mnt, f"{kind} ({dev})")
        return best[1]
    except OSError:
        return "local disk"


def write_section(text: str, path: Path = RESULTS) -> None:
    """This bench's section of RESULTS.md (``HEADING``), the others kept."""
    paired.write_section(text, HEADING, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=10, help="minimum rounds per model")
    parser.add_argument("--min-seconds", type=float, default=80.0,
                        help="keep adding rounds (up to 200) until a model has been timed this long")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--big-n", type=int, default=64, help="questions for the random 8x512 LLaVA")
    parser.add_argument("--tmp", default=None, help="folder for the sets and answer files (default: a temp dir)")
    parser.add_argument("--quick", action="store_true", help="3 rounds, 1 warm-up, 1 parts run, 200 + 32 questions")
    parser.add_argument("--profile", action="store_true", help="also print the top of each model's runner profile")
    parser.add_argument("--models", default="organism,big", help="which cases, comma-separated: organism, big")
    parser.add_argument("--parts-runs", type=int, default=3, help="instrumented run_pope calls per model")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    organism_n = None
    if args.quick:
        args.reps, args.warmup, args.min_seconds, args.big_n, args.parts_runs, organism_n = 3, 1, 0.0, 32, 1, 200
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    tmp = Path(tempfile.mkdtemp(prefix="bench_eval.", dir=args.tmp))
    try:
        question_file, images, world = export_sets(tmp)
        builders: dict[str, Callable[[], Case]] = {
            "organism": lambda: organism_case(question_file, images, organism_n),
            "big": lambda: big_llava_case(question_file, images, world, args.big_n)}
        results = []
        for key in args.models.split(","):
            case = builders[key]()
            print(f"timing {case.label} ...", file=sys.stderr, flush=True)
            r = measure(case, tmp, args.reps, args.warmup, args.min_seconds)
            print(f"{case.label}: bare {r['median_s']['bare loop']:.3f}s runner {r['median_s']['runner']:.3f}s "
                  f"ratio {r['ratio']['runner']:.3f}x [{r['quartiles']['runner'][0]:.2f}-"
                  f"{r['quartiles']['runner'][1]:.2f}], CPU time {r['cpu_ratio']['runner']:.3f}x"
                  + (f", generate_texts {r['ratio']['generate_texts']:.3f}x" if case.diagnostic else "")
                  + f"; {r['reps']} rounds, {r['yes']}/{r['n']} yes, first "
                  f"answers {r['sample']}", flush=True)
            r["parts"] = timed_parts(case, tmp, args.parts_runs)
            print(f"  parts: {parts_line(r['parts'])}", flush=True)
            if args.profile:
                print(profile_runner(case, tmp), flush=True)
            results.append((case, r))
        text = section(results, args, _filesystem(tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(text)
    if not args.no_write:
        write_section(text)
        print(f"wrote {RESULTS.relative_to(REPO)} ({HEADING})", file=sys.stderr)


if __name__ == "__main__":
    main()
