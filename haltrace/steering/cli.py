"""``haltrace steer``: fit a steering method, measure before/after, save it (``haltrace eval`` is in
:mod:`haltrace.evals.cli`).

Examples::

    haltrace steer --method pvp --model shapes-llava --eval pope,counterfactual --alpha 4 --out runs/pvp
    haltrace steer --method vti --opt positions=last --opt n_pairs=64 --json
    haltrace steer --method all                 # every registered method -> out/results/organism.md
    haltrace steer --method all --opt pvp.alpha=4 --opt vti.alpha_text=1   # options scoped per method
    haltrace steer --from runs/pvp --eval counterfactual                    # a saved fit, no refitting

``--opt key=value`` values are read as JSON when they parse (``4``, ``true``, ``[1,2]``), else as strings.

How it fits: :mod:`haltrace.cli` merges :data:`app`'s one command into the top level (``haltrace steer``),
which is why the imports here stay light (torch loads inside the command). The methods come from
:mod:`haltrace.steering.registry` (``get_method(name).fit(model, data, **options)`` returns a
``FittedIntervention``); the measurements from :mod:`haltrace.evals.cli` (the organism's built-in sets through
:func:`haltrace.evals.suite.evaluate`, or POPE/CHAIR benchmark files through the generation runner); the
before/after rows and the saved files from :mod:`haltrace.steering.results`. ``--method all`` hands over to
:func:`haltrace.evals.results_table.run_methods` and writes the results table instead.

One run of :func:`steer_cmd`: check every option and output path (cheap), load the model, check the method's
fit options against it, evaluate the baseline, fit (or load ``--from``), warn about absurd strengths, evaluate
under the intervention (an evaluation for which the method's paper sets other fit options gets a fit of its
own, ``Method.eval_fit_options``), then print or save the comparison. Each user mistake is raised as
``typer.BadParameter`` naming the option, and as early as possible, so a bad flag never costs a baseline run.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import typer

from haltrace.cli_common import console as _console
from haltrace.cli_common import load_model
from haltrace.cli_common import stdout_console as _stdout
from haltrace.evals.cli import evaluate_builtin, parse_evals, strip_answers

app = typer.Typer(help="Steer a model with a registered method and measure it.", no_args_is_help=True)

#: the organism's built-in sets run by default (``colour_control``, a check that the model reads colours at all,
#: is opt-in)
DEFAULT_EVALS = "pope,chair,counterfactual,refusal"
DEFAULT_RESULTS = "out/results/organism.md"  # never the shipped artifacts/results table unless asked for
#: |alpha| * |vector| / |residual| above this is far outside every implemented method's paper (they steer at
#: ratios up to ~10 at most); it is warned about, not refused
NORM_RATIO_WARN = 100.0


def check_output(path: Path | None, option: str) -> None:
    """Refuse an output path that cannot be written before any work starts (a read-only file system, a
    file where a folder is needed, no permission)."""
    from haltrace.errors import InputError, check_writable

    if path is not None:
        try:
            check_writable(path)
        except InputError as exc:
            raise typer.BadParameter(str(exc), param_hint=option) from None


def warn_strength(fitted: Any, model: Any) -> None:
    """Warn (never refuse) when a fitted intervention's strength will destroy the output: a non-finite vector,
    or alpha * |vector| far above the residual norm at its layer.

    Only interventions with both a ``vector`` and an ``alpha`` are checked (additive edits); the size compared is
    ``|alpha| * ||vector||_2`` against :func:`_residual_norm`, and the warning fires above
    :data:`NORM_RATIO_WARN`. Warnings go through :mod:`warnings`, so the run still produces its numbers.
    """
    import warnings

    for iv in getattr(fitted, "interventions", []) or []:
        vector, alpha = getattr(iv, "vector", None), getattr(iv, "alpha", None)
        if vector is None or alpha is None:
            continue
        try:
            size = abs(float(alpha)) * float(vector.float().norm())
        except (TypeError, ValueError, RuntimeError):  # a non-scalar alpha (a list, a tensor): no single size to judge
            continue
        if not math.isfinite(size):
            warnings.warn(f"{fitted.method}: alpha * |vector| is not finite ({alpha}); every logit will be NaN",
                          stacklevel=2)
            continue
        reference = _residual_norm(model, getattr(iv, "hook", ""))
        if reference and size / reference > NORM_RATIO_WARN:
            warnings.warn(f"{fitted.method}: alpha={alpha:g} adds a vector {size / reference:.3g}x the residual "
                          f"norm at {iv.hook} (papers steer at <= ~10x); expect every answer to be noise",
                          stacklevel=2)


def _residual_norm(model: Any, hook: str) -> float | None:
    """Typical residual norm at ``hook``: from the model's hidden size, since a unit-variance residual of width d
    has norm sqrt(d); precise enough for a 100x warning threshold.

    ``hook`` is currently unused (the estimate is the same at every layer and is not cached); ``None`` when
    the model has no HF config with a ``hidden_size`` (the check is then skipped). A VLM's ``text_config`` is
    read first, since steering acts on the language model's residual stream.
    """
    hidden = getattr(getattr(model, "hf", None), "config", None)
    d = getattr(getattr(hidden, "text_config", hidden), "hidden_size", None) if hidden is not None else None
    return math.sqrt(d) if d else None


def _parse_eval_specs(text: str) -> tuple[str, list[str], Path | None]:
    """``--eval`` -> (organism evaluation names, POPE files, CHAIR image folder). ``pope=FILE`` and
    ``chair=DIR`` entries are benchmark files run through the generation runner; bare names are the organism's
    built-in sets.

    The names come back comma-joined (``""`` when none), already checked by ``parse_evals``; ``pope=`` may repeat,
    a second ``chair=`` replaces the first. Missing files are refused here, before the model loads.

    >>> _parse_eval_specs("pope, counterfactual")
    ('pope,counterfactual', [], None)
    """
    names, pope, chair = [], [], None
    for entry in (e.strip() for e in text.split(",") if e.strip()):
        key, sep, value = entry.partition("=")
        if not sep:
            names.append(entry)
        elif key == "pope":
            if not Path(value).is_file():
                raise typer.BadParameter(f"POPE question file {value} not found", param_hint="--eval")
            pope.append(value)
        elif key == "chair":
            if not Path(value).is_dir():
                raise typer.BadParameter(f"CHAIR image folder {value} is not a folder", param_hint="--eval")
            chair = Path(value)
        else:
            raise typer.BadParameter(f"--eval {entry!r}: files are given as pope=FILE or chair=IMAGE_DIR",
                                     param_hint="--eval")
    if names:
        parse_evals(",".join(names))  # only to refuse unknown names now; the caller parses the string again
    return ",".join(names), pope, chair


def _parse_value(text: str) -> Any:
    """An ``--opt`` value: JSON when it parses (numbers, booleans, lists, null), else the string itself, so
    ``positions=last`` needs no quotes.

    >>> _parse_value("4"), _parse_value("true"), _parse_value("[1,2]"), _parse_value("last")
    (4, True, [1, 2], 'last')
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _parse_opts(opts: list[str], alpha: float | None, layer: int | None) -> dict[str, Any]:
    """The fit keyword arguments from ``--opt key=value`` (repeatable) plus ``--alpha``/``--layer``, which
    win over an ``--opt alpha=``/``layer=``. Keys keep any ``method.`` scope (split later by :func:`_scoped`).

    >>> _parse_opts(["positions=last", "alpha=2"], 4.0, None)
    {'positions': 'last', 'alpha': 4.0}
    """
    kwargs: dict[str, Any] = {}
    for opt in opts:
        key, sep, value = opt.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"{opt!r} is not key=value (e.g. --opt positions=last)", param_hint="--opt")
        kwargs[key.strip()] = _parse_value(value)
    if alpha is not None:
        kwargs["alpha"] = alpha
    if layer is not None:
        kwargs["layer"] = layer
    return kwargs


def _load_fit_data(path: Path, images: Path | None) -> list:
    """The ``--fit-data`` items (JSONL, or a Visual CounterFact table for PvP), image names resolved against
    ``images``; a malformed file is a ``--fit-data`` usage error. Loaded before the model, so it fails fast."""
    from haltrace.data.jsonl import DataFormatError
    from haltrace.data.visual_counterfact import load_fit_file

    try:
        return load_fit_file(path, images=images)
    except DataFormatError as exc:
        raise typer.BadParameter(str(exc), param_hint="--fit-data") from None


def _evaluate_all(model: Any, evals: list[str], files: dict, console, label: str, fitted: Any,
                  answers: Path | None) -> dict:
    """The organism's built-in sets (``evals``) and/or benchmark files through the runner (``files``).

    ``files`` holds :func:`haltrace.evals.cli.run_benchmarks`' keyword arguments (empty: built-in sets only);
    ``answers`` is the folder its generated answers go to (separate ``before``/``after`` folders, so the two
    runs never resume from each other's files). ``fitted`` is ``None`` for the baseline. Returns one report:
    the built-in keys of :func:`haltrace.evals.suite.evaluate` plus ``pope`` (per file stem) / ``chair``.
    """
    report = evaluate_builtin(model, evals, console, label, fitted) if evals else {}
    if files:
        from haltrace.evals.cli import run_benchmarks

        try:
            report.update(run_benchmarks(model, fitted=fitted, out=answers, console=console, label=label,
                                         **files))
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--eval") from None
    return report


def _fmt(value: float | None, rel: bool = False) -> str:
    """A table cell: a dash for a missing value, a signed percentage for a relative change, three decimals for
    rates, one for larger numbers (counts, lengths).

    >>> _fmt(None), _fmt(0.25, rel=True), _fmt(0.123456), _fmt(42.0)
    ('–', '+25.0%', '0.123', '42.0')
    """
    if value is None:
        return "–"
    return f"{value:+.1%}" if rel else f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def _print_comparison(console, rows: list[dict], title: str) -> None:
    """Print :func:`haltrace.steering.results.compare`'s rows (``metric, before, after, change, relative``) as
    a rich table; metrics that changed are bold."""
    from rich.table import Table

    table = Table(title=title)
    for col, justify in (("metric", "left"), ("before", "right"), ("after", "right"), ("change", "right"),
                         ("relative", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for row in rows:
        change = row["change"]
        style = "" if abs(change) < 1e-9 else "bold"  # a tolerance: float noise is not a change
        table.add_row(row["metric"], _fmt(row["before"]), _fmt(row["after"]), f"{change:+.3f}",
                      _fmt(row["relative"], rel=True), style=style)
    console.print(table)


@app.command("steer")
def steer_cmd(
    method: str | None = typer.Option(None, "--method", "-m", help="Registered method name, or 'all' for the "
                                                                   "results table of every registered method."),
    model: str | None = typer.Option(None, "--model", help="Organism name or folder (default shapes-llava, or the "
                                                           "model recorded with --from; the built-in evaluations "
                                                           "need a ShapesWorld organism)."),
    evals: str = typer.Option(DEFAULT_EVALS, "--eval", help="Comma-separated: pope, chair, counterfactual, "
                                                            "refusal, colour_control."),
    out: Path | None = typer.Option(None, "--out", help="Folder for intervention.safetensors + "
                                                        "intervention.json (+ report.json); with --method all, "
                                                        "one subfolder per method."),
    from_dir: Path | None = typer.Option(None, "--from", help="Evaluate an intervention saved with --out instead "
                                                              "of fitting one (no --method needed)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
    alpha: float | None = typer.Option(None, "--alpha", help="Passed to the method's fit as alpha=."),
    layer: int | None = typer.Option(None, "--layer", help="Passed to the method's fit as layer= "
                                                           "(resid_post.<layer> = output of block layer)."),
    opt: list[str] = typer.Option([], "--opt", help="Extra fit option key=value (repeatable); with --method all, "
                                                    "scope it to one method: --opt pvp.alpha=4."),
    results: Path | None = typer.Option(None, "--results", help=f"With --method all: the Markdown table to "
                                                                f"write (default {DEFAULT_RESULTS}); a .json "
                                                                "twin is written next to it."),
    fit_data: Path | None = typer.Option(None, "--fit-data", help="JSONL fit items for the method "
                                         "(docs/data-formats.md), or a Visual CounterFact .parquet/.csv for "
                                         "PvP; default: the model's data source (organisms)."),
    images: Path | None = typer.Option(None, "--images", help="Folder that image names in --fit-data and in "
                                       "pope= files are relative to."),
    coco_annotations: Path | None = typer.Option(None, "--coco-annotations", help="COCO annotations folder: "
                                                 "CHAIR ground truth for --eval chair=IMAGE_DIR."),
    caption_prompt: str = typer.Option("Please describe this image in detail.", "--caption-prompt",
                                       help="CHAIR captioning question for chair=IMAGE_DIR."),
    prompt_template: str | None = typer.Option(None, "--prompt-template", help="Instead of the chat template; "
                                               "{question} is replaced."),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", help="Generation length on benchmark "
                                              "files (default 32 for POPE, 512 for CHAIR)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Prompts per generate() call on benchmark files."),
    n: int | None = typer.Option(None, "--n", help="With chair=IMAGE_DIR: caption N images drawn with seed 0."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Regenerate answer files instead of resuming."),
    preset: str | None = typer.Option(None, "--preset", help="Fit preset for the method (with --method all: for "
                                      "every method): 'paper' = the published settings, the deviations recorded "
                                      "in the fit's provenance. Default: haltrace's settings (tuned on fit data)."),
) -> None:
    """Fit a steering method (or load one with --from), evaluate before and after, print the change, save it."""
    from haltrace.steering.registry import get_method, list_methods

    organism_evals, pope_files, chair_dir = _parse_eval_specs(evals)
    eval_names = parse_evals(organism_evals) if organism_evals else []
    if chair_dir is not None and coco_annotations is None:
        raise typer.BadParameter("--eval chair=IMAGE_DIR needs --coco-annotations DIR", param_hint="--eval")
    kwargs = _parse_opts(opt, alpha, layer)
    if preset is not None and method != "all":
        kwargs["preset"] = preset
    for name, value in (("--alpha", alpha), ("--layer", layer)):
        if value is not None and not math.isfinite(value):
            raise typer.BadParameter(f"{value} is not a finite number", param_hint=name)
    check_output(out, "--out")
    check_output(results, "--results")
    console = _console(as_json)  # progress on stderr, silent with --json: stdout stays one JSON object
    fit_items = _load_fit_data(fit_data, images) if fit_data is not None else None
    if from_dir is not None:  # a saved fit names its own method and (by default) its model
        method, model, fitted = _load_saved(from_dir, method, model, kwargs)
    elif method is None:
        raise typer.BadParameter("pass --method NAME (or 'all'), or --from DIR for a saved intervention; "
                                 f"registered methods: {', '.join(list_methods())}", param_hint="--method")
    model = model or "shapes-llava"
    if method == "all":
        if pope_files or chair_dir is not None or fit_items is not None:
            raise typer.BadParameter("--method all runs the organism's results table; fit and evaluate one "
                                     "method at a time on your files (--method X --fit-data ... --eval pope=...)",
                                     param_hint="--method")
        scoped = _scoped(kwargs)
        if preset is not None:  # every registered method takes preset= (unknown names are refused by each fit)
            scoped = {name: {"preset": preset, **scoped.get(name, {})} for name in list_methods()}
        _steer_all(model, eval_names, scoped, out, results or Path(DEFAULT_RESULTS), as_json, console,
                   section=f"{Path(model).name}, " + (f"preset {preset}" if preset else "haltrace settings"))
        return
    if fit_items is not None and from_dir is not None:
        raise typer.BadParameter("--from evaluates a saved fit; --fit-data would be ignored", param_hint="--fit-data")
    if results is not None:
        raise typer.BadParameter("--results goes with --method all; for one method use --out/--json",
                                 param_hint="--results")
    if from_dir is None:
        try:
            impl = get_method(method)
        except ValueError as exc:  # lists the registry
            raise typer.BadParameter(str(exc), param_hint="--method") from None
    hf_model = load_model(model, console)
    if from_dir is None:  # every option checked before the baseline evaluation runs
        try:
            impl.check_options(hf_model, kwargs)
        except ValueError as exc:  # the message names the option
            raise typer.BadParameter(str(exc)) from None
    if from_dir is not None:  # install and remove once: a fit for another model fails now, not after the baseline
        try:
            with fitted.apply(hf_model):
                pass
        except ValueError as exc:  # names both sizes / the valid layers
            raise typer.BadParameter(f"{from_dir} does not fit {model}: {exc}", param_hint="--from") from None
    files: dict[str, Any] = {}
    if pope_files or chair_dir is not None:
        from haltrace.evals.cli import settings_from

        # generated answers are files a rerun resumes from (unless --overwrite), so they need a stable home:
        # next to the saved fit with --out, else per method under out/steer
        answers = (Path(out) if out is not None else Path("out/steer") / method) / "answers"
        files = {"pope": pope_files, "images": images, "chair_images": chair_dir, "coco_annotations": coco_annotations,
                 "n": n, "seed": 0, "caption_prompt": caption_prompt, "overwrite": overwrite,
                 "pope_settings": settings_from(max_new_tokens or 32, 1, batch_size, prompt_template),
                 "chair_settings": settings_from(max_new_tokens or 512, 1, batch_size, prompt_template)}
    before = _evaluate_all(hf_model, eval_names, files, console, "baseline", None,
                           answers / "before" if files else None)
    started = time.perf_counter()
    if from_dir is None:
        with console.status(f"fitting {method} ..."):
            try:
                fitted = impl.fit(hf_model, fit_items, **kwargs)
            except TypeError as exc:  # usually an option the method does not take
                raise typer.BadParameter(f"{method}.fit rejected the options {sorted(kwargs)}: {exc}",
                                         param_hint="--opt") from None
            except ValueError as exc:  # bad or missing fit data, a family the method refuses, a bad option
                # an option's own error names the option; anything else is about the data
                hint = "--opt/--preset" if any(f"{k}" in str(exc).lower() for k in kwargs) else "--fit-data"
                raise typer.BadParameter(str(exc), param_hint=hint) from None
    fit_seconds = time.perf_counter() - started  # ~0 for a --from fit (nothing fitted)
    warn_strength(fitted, hf_model)  # only now: the vector's norm is known after the fit
    # evaluations the paper runs under other fit options (VISTA: lambda 0.17 on captions, 0.01 on POPE) get a
    # fit of their own, unless the user set those options; a loaded fit is evaluated as it is
    per_eval = {} if from_dir is not None else {
        e: opts for e, opts in getattr(impl, "eval_fit_options", {}).items()
        if (e in eval_names or (e == "chair" and files.get("chair_images") is not None)) and not set(opts) & set(kwargs)}
    main_files = {**files, "chair_images": None} if "chair" in per_eval and files else files
    try:
        after = _evaluate_all(hf_model, [e for e in eval_names if e not in per_eval], main_files, console, method,
                              fitted, answers / "after" if main_files else None)
        for e, opts in per_eval.items():
            with console.status(f"fitting {method} with {opts} for {e} ..."):
                task_fit = impl.fit(hf_model, fit_items, **kwargs, **opts)
            e_files = {**files, "pope": []} if e == "chair" and files.get("chair_images") is not None else {}
            after.update(_evaluate_all(hf_model, [e] if e in eval_names else [], e_files, console,
                                       f"{method} {opts}", task_fit, answers / f"after-{e}" if e_files else None))
    except ValueError as exc:  # e.g. a saved vector of another model's hidden size: names both sizes
        raise typer.BadParameter(str(exc), param_hint="--from" if from_dir else "--model") from None

    from haltrace.evals.counterfactual import counterfactual_flips
    from haltrace.steering.results import _jsonable, compare, save_fitted

    # flips compare per-item answers, which evaluate_builtin keeps; strip_answers drops them from the payload
    flips = (counterfactual_flips(before["counterfactual"], after["counterfactual"])
             if "counterfactual" in eval_names else None)
    rows = compare(before, after, flips)
    payload = {"method": method, "model": model, "evals": eval_names, "options": kwargs,
               "fit_seconds": fit_seconds, "comparison": rows, "flips": flips,
               "before": strip_answers(before), "after": strip_answers(after),
               # provenance may hold tensors: _jsonable replaces them by references into a dict thrown away here
               "provenance": _jsonable(dict(fitted.provenance), {}, "provenance"),
               "registered_methods": list_methods()}
    if per_eval:
        payload["per_eval_fit_options"] = per_eval  # --out saves the main fit; these evaluations used their own
    if from_dir is not None:
        payload["loaded_from"] = str(from_dir)
    if out is not None:
        saved = save_fitted(fitted, out, extra={"model": model, "options": kwargs})
        from haltrace.trace.store import atomic_write_text

        report_path = Path(out) / "report.json"
        atomic_write_text(report_path, json.dumps(payload, indent=1, default=str) + "\n")
        payload["saved"] = {k: str(v) for k, v in saved.items()} | {"report": str(report_path)}
    if as_json:
        typer.echo(json.dumps(payload, default=str))
        return
    out_console = _stdout()  # tables go to stdout
    how = f"loaded from {from_dir}" if from_dir is not None else f"fit {fit_seconds:.1f} s"
    _print_comparison(out_console, rows, f"{method} on {model} ({how})")
    for e, opts in per_eval.items():
        out_console.print(f"{e} was evaluated under {method}'s fit with {opts} (the paper's per-task setting)")
    if out is not None:
        out_console.print(f"saved {payload['saved']['safetensors']} and {payload['saved']['json']}")


def _load_saved(folder: Path, method: str | None, model: str | None, kwargs: dict) -> tuple[str, str, Any]:
    """(method, model, fitted) of a ``--out`` folder; the model defaults to the one recorded in it.

    Refuses fit options (they would be silently ignored), an unreadable folder, and a ``--method`` other than the
    saved one; ``shapes-llava`` is the last fallback for folders written without a recorded model.
    """
    from haltrace.steering.results import load_fitted

    if kwargs:
        raise typer.BadParameter(f"--from evaluates a saved fit as it is; fit options {sorted(kwargs)} would be "
                                 "ignored (drop them, or refit with --method)", param_hint="--from")
    try:
        fitted = load_fitted(folder)
        recorded = json.loads((folder / "intervention.json").read_text()).get("model")
    # ValueError covers FitFileError: a damaged file, an unknown intervention type, an old custom-hook fit
    except (OSError, ValueError, KeyError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--from") from None
    if method not in (None, fitted.method):
        raise typer.BadParameter(f"{folder} holds a {fitted.method} fit, not {method}; drop --method",
                                 param_hint="--method")
    return fitted.method, model or recorded or "shapes-llava", fitted


def _scoped(kwargs: dict) -> dict[str, dict]:
    """``{method: fit kwargs}`` from ``--opt METHOD.key=value``; unscoped options are refused under
    ``--method all`` because the methods' options differ in name and meaning (an alpha is not an alpha).

    Only the part before the first dot is the method, so ``vti.alpha_text`` is VTI's ``alpha_text``. Methods
    with no options are left out of the result (they fit with their defaults).
    """
    from haltrace.steering.registry import list_methods

    names = list_methods()
    per: dict[str, dict] = {name: {} for name in names}
    loose = []
    for key, value in kwargs.items():
        name, sep, option = key.partition(".")
        if not sep:
            loose.append(key)
        elif name not in per or not option:
            raise typer.BadParameter(f"--opt {key}=... names no registered method; registered methods: "
                                     f"{', '.join(names)}", param_hint="--opt")
        else:
            per[name][option] = value
    if loose:
        raise typer.BadParameter(f"with --method all, options {loose} would go to every method; scope each to "
                                 "one method, e.g. --opt pvp.alpha=4 (--alpha/--layer become --opt NAME.alpha=, "
                                 "--opt NAME.layer=)", param_hint="--opt")
    return {name: kw for name, kw in per.items() if kw}


def _steer_all(model: str, evals: list[str], kwargs: dict, out: Path | None, results: Path, as_json: bool,
               console, section: str | None = None) -> None:
    """``--method all``: the baseline and every registered method on the organism's built-in sets
    (:func:`haltrace.evals.results_table.run_methods`), written as the Markdown results table ``results`` with
    its ``.json`` twin, then printed (or echoed as JSON). ``kwargs`` is :func:`_scoped`'s per-method options;
    with ``out``, each method's fit is saved to ``out/METHOD``. A method that fails is a row with its error,
    not the end of the run (its fit is then not saved).
    """
    from haltrace.evals.results_table import results_json, run_methods, write_results
    from haltrace.steering.results import save_fitted

    hf_model = load_model(model, console)
    from haltrace.steering.registry import get_method

    for name, kw in kwargs.items():  # every method's options checked before the baseline runs
        try:
            get_method(name).check_options(hf_model, kw)
        except ValueError as exc:
            raise typer.BadParameter(f"{name}: {exc}") from None
    with console.status("baseline ...") as status:
        try:
            run = run_methods(hf_model, evals, on_step=lambda name: status.update(f"{name}: fitting and "
                                                                                  "evaluating ..."),
                              fit_kwargs=kwargs or None)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--model") from None
    # the table records the command that made it, so it can be regenerated (fallback: called without argv)
    command = "haltrace " + " ".join(sys.argv[1:]) if sys.argv[1:] else "haltrace steer --method all"
    paths = write_results(results, run, command=command, section=section)
    if out is not None:
        for row in run["rows"]:
            if "fitted" in row:
                save_fitted(row["fitted"], Path(out) / row["method"], extra={"model": model})
    if as_json:
        typer.echo(json.dumps(results_json(run) | {"written": {k: str(v) for k, v in paths.items()}}))
        return
    out_console = _stdout()
    out_console.print(paths["markdown"].read_text())
    out_console.print(f"wrote {paths['markdown']} and {paths['json']}")
