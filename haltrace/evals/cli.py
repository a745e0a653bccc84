"""``haltrace eval``: POPE and CHAIR on any supported model from the benchmarks' own files, scoring answer files
without a model, and the organism's built-in held-out sets.

Examples::

    haltrace eval --model llava-hf/llava-1.5-7b-hf --pope coco/coco_pope_adversarial.json --images val2014/
    haltrace eval --model M --chair-images val2014/ --coco-annotations annotations/ --n 500 --json
    haltrace eval --captions out/eval/chair/captions.jsonl --coco-annotations annotations/   # no model
    haltrace eval --pope-questions q/pope_adversarial.jsonl --pope-answers a/pope_adversarial.jsonl
    haltrace eval --model shapes-llava --eval pope,chair                     # the organism's built-in sets

Generated answers and captions are written as they come under ``--out`` (default ``out/eval``); the same
command again resumes a killed run. ``--json`` prints one object whose ``metrics`` hold
``pope.<file stem>.{accuracy, precision, recall, f1, yes_ratio}`` and ``chair.{chair_s, chair_i, recall}``.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer

from haltrace.cli_common import console as _console
from haltrace.cli_common import load_model

app = typer.Typer(help="Evaluate a model on POPE / CHAIR files, or score answer files.", no_args_is_help=True)

DEFAULT_OUT = Path("out/eval")
ORGANISM_EVALS = "pope,chair,counterfactual,refusal"


@contextmanager
def progress_bar(console: Any, label: str):
    """A rich bar with an ETA, driven by ``update(done, total)``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=False) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def _split_list(values: list[str]) -> list[str]:
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def parse_evals(text: str) -> list[str]:
    """``--eval`` names of the organism's built-in sets, checked (``haltrace eval`` and ``haltrace steer``)."""
    from haltrace.evals.suite import EVALS

    names = [e.strip() for e in text.split(",") if e.strip()]
    bad = [e for e in names if e not in EVALS]
    if bad or not names:
        raise typer.BadParameter(f"unknown evaluation(s) {bad or '(none given)'}; choose from "
                                 f"{', '.join(EVALS)}, or benchmark files pope=FILE / chair=IMAGE_DIR "
                                 "(comma-separated)", param_hint="--eval")
    return names


def evaluate_builtin(model: Any, evals: list[str], console, label: str, fitted: Any = None) -> dict:
    """The organism's built-in sets on a loaded model (answers kept for flip rates); a bad model is a --model error."""
    from haltrace.evals.suite import evaluate

    with console.status(f"evaluating {label} on {', '.join(evals)} ..."):
        try:
            return evaluate(model, evals, fitted=fitted, keep_answers=True)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--model") from None


def strip_answers(report: dict) -> dict:
    """The report without per-item answers (kept in memory for flip rates, too long to print)."""
    out = json.loads(json.dumps(report, default=str))
    for report in (out.get("counterfactual", {}), out.get("counterfactual", {}).get("most", {})):
        for key in ("answers", "labels", "pixel"):
            report.pop(key, None)
    return out


def evaluate_organism(model: str, evals: str, console: Any) -> dict:
    """The organism's built-in held-out sets (``haltrace eval --model ORGANISM``), answers stripped."""
    return strip_answers(evaluate_builtin(load_model(model, console), parse_evals(evals), console, model))


def settings_from(max_new_tokens: int, num_beams: int, batch_size: int, template: str | None) -> Any:
    from haltrace.evals.runner import GenerationSettings

    try:
        return GenerationSettings(max_new_tokens=max_new_tokens, num_beams=num_beams, batch_size=batch_size,
                                  template=template)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def run_benchmarks(model: Any, *, pope: list[str], images: Path | None, chair_images: Path | None,
                   coco_annotations: Path | None, n: int | None, seed: int, caption_prompt: str,
                   pope_settings: Any, chair_settings: Any, out: Path, fitted: Any = None, overwrite: bool = False,
                   parser: str = "official", rules: str = "official", console: Any = None, label: str = "",
                   coco_split: str | None = None) -> dict:
    """Generate and score every requested benchmark; ``{"pope": {stem: metrics}, "chair": metrics}``."""
    from haltrace.evals.benchmarks import chair_images as pick_images
    from haltrace.evals.benchmarks import run_captions, run_pope
    from haltrace.evals.coco import coco_image_files, load_coco_ground_truth, score_chair

    report: dict[str, Any] = {}
    tag = f"{label}: " if label else ""
    for path in pope:
        with progress_bar(console, f"{tag}POPE {Path(path).name}") as update:
            report.setdefault("pope", {})[Path(path).stem] = run_pope(
                model, path, images, out, pope_settings, fitted=fitted, overwrite=overwrite, parser=parser,
                progress=update)
    if chair_images is not None:
        picked = pick_images(chair_images, coco_image_files(coco_annotations, coco_split), n, seed)
        # ground truth for the captioned images only: parsing all 200k val2014 captions would take ~50 s
        truth = load_coco_ground_truth(coco_annotations, coco_split, rules=rules,
                                       image_ids=[image_id for image_id, _ in picked])
        captions_file = out / "chair" / "captions.jsonl"
        with progress_bar(console, f"{tag}CHAIR captions") as update:
            rows = run_captions(model, picked, captions_file, prompt=caption_prompt, settings=chair_settings,
                                fitted=fitted, overwrite=overwrite, progress=update)
        report["chair"] = score_chair({r["image_id"]: r["caption"] for r in rows}, truth) | {
            "captions_file": str(captions_file), "prompt": caption_prompt, "n_images": len(picked),
            "image_seed": seed if n is not None else None}
    return report


@app.command("eval")
def eval_cmd(
    model: str | None = typer.Option(None, "--model", help="Hub id, local folder or organism name. Without "
                                                           "benchmark files: the organism's built-in sets."),
    pope: list[str] = typer.Option([], "--pope", help="POPE question file(s) as released: JSONL with "
                                                      "question_id, image, text, label (comma-separated or "
                                                      "repeated)."),
    images: Path | None = typer.Option(None, "--images", help="Folder the POPE files' image names are in."),
    chair_images: Path | None = typer.Option(None, "--chair-images", help="Folder of images to caption for "
                                                                          "CHAIR (e.g. COCO val2014)."),
    coco_annotations: Path | None = typer.Option(None, "--coco-annotations", help="COCO annotations folder "
                                                 "(instances_*.json + captions_*.json): CHAIR ground truth."),
    coco_split: str | None = typer.Option(None, "--coco-split", help="Which annotation files (e.g. val2014) "
                                          "when the folder holds several splits."),
    captions: Path | None = typer.Option(None, "--captions", help="Score a captions file (JSONL image_id, "
                                         "caption or the original imgToEval JSON) without a model."),
    n: int | None = typer.Option(None, "--n", help="Caption N images drawn with --seed (default: all)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the --n image draw."),
    caption_prompt: str = typer.Option("Please describe this image in detail.", "--caption-prompt",
                                       help="The CHAIR captioning question (through the chat template)."),
    prompt_template: str | None = typer.Option(None, "--prompt-template", help="Use this instead of the chat "
                                               "template; {question} is replaced (e.g. 'USER: <image>\\n"
                                               "{question} ASSISTANT:')."),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", help="Generation length (default 32 "
                                              "for POPE, 512 for CHAIR)."),
    num_beams: int = typer.Option(1, "--num-beams", help="1 = greedy; more = beam search."),
    batch_size: int = typer.Option(8, "--batch-size", help="Prompts per generate() call (left padded)."),
    out: Path = typer.Option(DEFAULT_OUT, "--out", help="Folder for answers, captions and report.json."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start again instead of resuming."),
    parser: str = typer.Option("official", "--parser", help="POPE answer parser: official or lvlm-lp."),
    rules: str = typer.Option("official", "--rules", help="CHAIR rules: official (chair.py) or simple."),
    evals: str = typer.Option(ORGANISM_EVALS, "--eval", help="Organism built-in sets (only without files)."),
    pope_questions: list[str] = typer.Option([], "--pope-questions", help="Score: POPE question JSONL "
                                                                          "(split=path, repeatable)."),
    pope_answers: list[str] = typer.Option([], "--pope-answers", help="Score: POPE answers JSONL, aligned by "
                                                                      "question_id, else by line (split=path)."),
    objects: Path | None = typer.Option(None, "--objects", help="Score: CHAIR ground truth JSON "
                                                                "{image: [objects]} (instead of COCO files)."),
    synonyms: Path | None = typer.Option(None, "--synonyms", help="CHAIR synonyms.txt (canonical name first)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """Evaluate a model on POPE question files and CHAIR images, or score existing answer files."""
    from haltrace.evals import formats
    from haltrace.steering.results import flatten_metrics

    console = _console(as_json)
    pope_files = _split_list(pope)
    generate = bool(pope_files or chair_images)
    if generate and model is None:
        raise typer.BadParameter("--pope and --chair-images generate answers: pass --model", param_hint="--model")
    if chair_images is not None and coco_annotations is None:
        raise typer.BadParameter("CHAIR needs ground truth: pass --coco-annotations DIR", param_hint="--chair-images")
    for path in pope_files:
        if not Path(path).is_file():
            raise typer.BadParameter(f"POPE question file {path} not found", param_hint="--pope")
    report: dict[str, Any] = {}
    try:
        if pope_questions or pope_answers:
            report["pope"] = formats.score_pope_files(formats.split_files(pope_questions, "--pope-questions"),
                                                      formats.split_files(pope_answers, "--pope-answers"),
                                                      parser=parser)
        if captions is not None and coco_annotations is not None and chair_images is None:
            from haltrace.evals.coco import load_coco_ground_truth, score_chair

            truth = load_coco_ground_truth(coco_annotations, coco_split, rules=rules, synonyms=synonyms)
            report["chair"] = score_chair(formats.read_captions(captions), truth)
        elif captions is not None or objects is not None:
            if not (captions and objects):
                raise typer.BadParameter("CHAIR needs --captions with --objects or --coco-annotations",
                                         param_hint="--captions")
            report["chair"] = formats.score_chair_files(captions, objects, synonyms)
        if generate:
            hf = load_model(model, console)
            report.update(run_benchmarks(
                hf, pope=pope_files, images=images, chair_images=chair_images, coco_annotations=coco_annotations,
                n=n, seed=seed, caption_prompt=caption_prompt,
                pope_settings=settings_from(max_new_tokens or 32, num_beams, batch_size, prompt_template),
                chair_settings=settings_from(max_new_tokens or 512, num_beams, batch_size, prompt_template),
                out=out, overwrite=overwrite, parser=parser, rules=rules, console=console, coco_split=coco_split))
            from haltrace.distributed import rank_world
            from haltrace.trace.store import atomic_write_text

            if rank_world()[0] == 0:  # data-parallel: every rank holds the merged answers; one writes the report
                atomic_write_text(out / "report.json", json.dumps({"model": model, "report": report}, indent=1,
                                                                  default=str) + "\n")
                (out / "report.json").chmod(0o644)
        elif not report:
            name = model or "shapes-llava"
            report.update(evaluate_organism(name, evals, console))
    except (ValueError, OSError) as exc:
        if isinstance(exc, typer.BadParameter):
            raise
        raise typer.BadParameter(str(exc)) from None
    metrics = flatten_metrics(report)
    if as_json:
        typer.echo(json.dumps({"model": model, "metrics": metrics, "report": report}, default=str))
        return
    _print_metrics(metrics, f"{model or 'files'}")


def _print_metrics(metrics: dict[str, float], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}")
    Console().print(table)
