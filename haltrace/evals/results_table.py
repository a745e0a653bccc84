"""The all-methods results table on the organism: fit every registered method, evaluate before and under each,
and write one Markdown table plus its JSON twin.

It lives in the evals layer because it runs the evaluations (:func:`haltrace.evals.suite.evaluate`) on top of
the steering methods; the before/after comparison and saved interventions stay in :mod:`haltrace.steering.results`.

>>> import haltrace
>>> from haltrace.evals.results_table import run_methods, write_results
>>> model = haltrace.load("shapes-llava")                                       # doctest: +SKIP
>>> run = run_methods(model, ["pope", "chair", "counterfactual", "refusal"])    # doctest: +SKIP
>>> write_results("artifacts/results/organism.md", run, command="haltrace steer --method all")  # doctest: +SKIP
"""

from __future__ import annotations

import datetime as _dt
import json
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from haltrace.steering.results import FLIP_KEYS, _jsonable, flatten_metrics

# (flat key, label, rate?) -- the headline metrics of the results table, in column order
HEADLINE: list[tuple[str, str, bool]] = [
    ("pope.adversarial.false_yes_rate", "POPE adv false-yes", True),
    ("pope.adversarial.recall", "POPE adv recall", True),
    ("chair.chair_i", "CHAIR_i", True),
    ("chair.mean_length", "caption length", False),
    ("counterfactual.pixel_rate", "CF pixel rate", True),
    ("counterfactual.most_prior_to_pixel", "CF flip prior->pixel, most-X prompt (PvP headline)", True),
    ("counterfactual.prior_to_pixel", "CF flip prior->pixel, this-X prompt", True),
    ("counterfactual.pixel_to_prior", "CF flip pixel->prior", True),
    ("counterfactual.most.other_rate", "CF broken answers, most-X", True),
    ("counterfactual.other_rate", "CF broken answers, this-X", True),
    ("refusal.refusal_unknown", "refusal (unknown)", True),
    ("refusal.refusal_known", "refusal (known)", True),
]


def evaluate_method(model: Any, name: str, evals: Sequence[str], before: Mapping[str, Any], *,
                    fit_kwargs: Mapping[str, Any] | None = None, world: Any = None) -> dict[str, Any]:
    """Fit method ``name`` and evaluate under it; failures are captured as ``{"error": ...}``, not raised."""
    from haltrace.evals.counterfactual import counterfactual_flips
    from haltrace.evals.suite import evaluate
    from haltrace.steering.registry import get_method

    row: dict[str, Any] = {"method": name}
    started = time.perf_counter()
    method = get_method(name)
    kwargs = dict(fit_kwargs or {})
    # evaluations the paper runs under other fit options (VISTA's caption lambda on CHAIR), unless the user set them
    per_eval = {e: opts for e, opts in method.eval_fit_options.items()
                if e in evals and not set(opts) & set(kwargs)}
    try:
        row["stage"] = "fit"
        fitted = method.fit(model, **kwargs)
        row["fit_seconds"] = time.perf_counter() - started
        row["fitted"] = fitted
        row["stage"] = "evaluate"
        rest = [e for e in evals if e not in per_eval]
        after = evaluate(model, rest, fitted=fitted, world=world, keep_answers=True) if rest else {}
        for e, opts in per_eval.items():
            after |= evaluate(model, [e], fitted=method.fit(model, **kwargs, **opts), world=world,
                              keep_answers=True)
        if per_eval:
            row["per_eval_fit_options"] = per_eval
    except Exception as exc:  # a broken method is reported in the table, never hidden
        row["error"] = f"{type(exc).__name__}: {exc}"
        row["traceback"] = traceback.format_exc(limit=4)
        return row
    row["after"] = after
    row["seconds"] = time.perf_counter() - started
    if "counterfactual" in after and "labels" in before.get("counterfactual", {}):
        row["flips"] = counterfactual_flips(before["counterfactual"], after["counterfactual"])
    return row


def run_methods(model: Any, evals: Sequence[str], methods: Sequence[str] | None = None, *,
                fit_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
                on_step: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Baseline + every method (default: the whole registry) on ``model``; one dict for :func:`write_results`."""
    from haltrace.evals.suite import evaluate, organism_world
    from haltrace.steering.registry import list_methods

    world = organism_world(model)
    (on_step or (lambda _s: None))("baseline")
    before = evaluate(model, evals, world=world, keep_answers=True)
    rows = []
    for name in methods if methods is not None else list_methods():
        (on_step or (lambda _s: None))(name)
        rows.append(evaluate_method(model, name, evals, before, fit_kwargs=(fit_kwargs or {}).get(name),
                                    world=world))
    return {"model": model.name_or_path, "evals": list(evals), "before": before, "rows": rows,
            "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def headline(report: Mapping[str, Any], flips: Mapping[str, Any] | None = None) -> dict[str, float | None]:
    """The :data:`HEADLINE` metrics of one report (None where not measured)."""
    flat = flatten_metrics(report)
    for key in FLIP_KEYS:
        if flips is not None:
            flat[f"counterfactual.{key}"] = flips.get(key)  # type: ignore[assignment]
    return {key: flat.get(key) for key, _, _ in HEADLINE}


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def results_markdown(run: Mapping[str, Any], *, command: str = "") -> str:
    """The results table as Markdown: one row per method, ``before → after`` for each headline metric."""
    base = headline(run["before"])
    lines = [
        f"# Steering results on {Path(str(run['model'])).name}", "",
        f"- command: `{command}`" if command else "- command: (API)",
        f"- date: {run['date']}", f"- organism: `{run['model']}`", f"- evaluations: {', '.join(run['evals'])}",
        f"- torch {run['torch']}, {run['threads']} threads; greedy decoding, held-out organism sets", "",
        "Cells are `before → after`. Flip rates are after-only (before is 0 by definition): of the items the "
        "baseline answered with the prior colour, the share now answered with the pixel colour, and the reverse.",
        "Lower is better for false-yes, CHAIR_i, pixel→prior flips and refusal on known names; higher is better "
        "for recall, pixel rate, prior→pixel flips and refusal on unknown names.",
        *[f"- {row['method']}: " + "; ".join(f"{e} evaluated under its fit with {opts}" for e, opts in
                                             row["per_eval_fit_options"].items()) + " (the paper's per-task setting)"
          for row in run["rows"] if row.get("per_eval_fit_options")], "",
        "| method | " + " | ".join(label for _, label, _ in HEADLINE) + " | fit+eval s |",
        "|---" * (len(HEADLINE) + 2) + "|",
        "| (baseline) | " + " | ".join(_fmt(base[k]) for k, _, _ in HEADLINE) + " | |",
    ]
    failed = []
    for row in run["rows"]:
        if "error" in row:
            failed.append(row)
            failed_cell = "fit failed" if row.get("stage") == "fit" else "failed under evaluation"
            lines.append(f"| {row['method']} | " + " | ".join(failed_cell if i == 0 else "" for i in
                                                                range(len(HEADLINE))) + " | |")
            continue
        after = headline(row["after"], row.get("flips") or {})
        cells = []
        for key, _, _ in HEADLINE:
            if key.startswith("counterfactual.") and key.endswith(("to_pixel", "to_prior")):
                cells.append(_fmt(after[key]))
            else:
                cells.append(f"{_fmt(base[key])} → {_fmt(after[key])}")
        lines.append(f"| {row['method']} | " + " | ".join(cells) + f" | {row.get('seconds', 0):.1f} |")
    if failed:
        lines += ["", "## Methods that failed", ""]
        lines += [f"- **{row['method']}** ({row.get('stage', 'fit')}): {row['error']}" for row in failed]
    if not run["rows"]:
        lines += ["", "No steering methods are registered yet."]
    lines += ["", "## Provenance", ""]
    for row in run["rows"]:
        if "fitted" in row:
            prov = json.dumps(_jsonable(dict(row["fitted"].provenance), {}, "p"), sort_keys=True)
            lines.append(f"- **{row['method']}**: `{prov[:600]}`")
    return "\n".join(lines) + "\n"


def results_json(run: Mapping[str, Any]) -> dict[str, Any]:
    """JSON-ready copy of a run: headline + all flat metrics per method, errors, no tensors."""
    rows = []
    for row in run["rows"]:
        item: dict[str, Any] = {"method": row["method"]}
        if "error" in row:
            item.update(error=row["error"], stage=row.get("stage"))
        else:
            item.update(headline=headline(row["after"], row.get("flips") or {}),
                        metrics=flatten_metrics(row["after"]), flips=row.get("flips"),
                        seconds=row.get("seconds"), provenance=_jsonable(dict(row["fitted"].provenance), {}, "p"))
            if row.get("per_eval_fit_options"):
                item["per_eval_fit_options"] = row["per_eval_fit_options"]
        rows.append(item)
    return {"model": str(run["model"]), "date": run["date"], "evals": run["evals"],
            "baseline": {"headline": headline(run["before"]), "metrics": flatten_metrics(run["before"])},
            "methods": rows, "torch": run["torch"], "threads": run["threads"]}


_SECTION = "<!-- haltrace-results section={} -->"
_SECTION_END = "<!-- /haltrace-results -->"


def write_results(path: str | Path, run: Mapping[str, Any], *, command: str = "",
                  section: str | None = None) -> dict[str, Path]:
    """Write the Markdown table to ``path`` and its JSON twin next to it (``.json``), both atomically.

    With ``section`` (e.g. ``"shapes-llava, preset paper"``) the file holds one section per name: this run's
    section is replaced (or added), the others are kept, so one file can hold the tuned and the paper-preset
    tables of several organisms side by side; the JSON twin keys each run by its section.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "r.md"
    >>> _merge_sections(p, "a", "# A\\nx"); _merge_sections(p, "b", "# B\\ny"); _merge_sections(p, "a", "# A\\nz")
    >>> [line for line in p.read_text().splitlines() if line.startswith("#")]
    ['# Steering results', '## A', '## B']
    """
    from haltrace.trace.store import atomic_write_text

    path = Path(path)
    md, js = path, path.with_suffix(".json")
    body = results_markdown(run, command=command)
    payload = results_json(run) | {"command": command}
    if section is None:
        atomic_write_text(md, body)
        atomic_write_text(js, json.dumps(payload, indent=1, allow_nan=False) + "\n")
    else:
        _merge_sections(md, section, body)
        old = json.loads(js.read_text()) if js.is_file() else {}
        sections = old.get("sections", {}) if isinstance(old, dict) else {}
        sections[section] = payload
        atomic_write_text(js, json.dumps({"sections": sections}, indent=1, allow_nan=False) + "\n")
        if len({s.split(",")[0] for s in sections}) > 1:  # several models: one comparison table on top
            _merge_sections(md, SIDE_BY_SIDE, side_by_side_markdown(sections), first=True)
    for p in (md, js):
        p.chmod(0o644)
    return {"markdown": md, "json": js}


SIDE_BY_SIDE = "all models side by side"
#: the comparison table's columns per model: (flat key, short label)
SIDE_COLUMNS: list[tuple[str, str]] = [
    ("pope.adversarial.false_yes_rate", "POPE adversarial false-yes rate (lower is better)"),
    ("pope.adversarial.recall", "POPE adversarial recall on present objects"),
    ("chair.chair_i", "CHAIR_i (lower is better)"),
    ("chair.recall", "caption recall (CHAIR)"),
    ("counterfactual.pixel_rate", "counterfactual colour: pixel answers (higher is better)"),
]


def side_by_side_markdown(sections: Mapping[str, Mapping[str, Any]]) -> str:
    """The models side by side: per headline metric (:data:`SIDE_COLUMNS`) one table, a row per method and a
    column per results section (model x settings), cells ``before → after``, copied from each section.

    >>> run = {"baseline": {"metrics": {"chair.chair_i": 0.4}}, "methods": [{"method": "m", "metrics": {"chair.chair_i": 0.3}}]}
    >>> "| m | 0.400 → 0.300 | 0.400 → 0.300 |" in side_by_side_markdown({"org-a, x": run, "org-b, y": run})
    True
    """
    names = list(sections)
    methods = sorted({row["method"] for s in sections.values() for row in s.get("methods", [])})
    lines = ["# All models side by side", "",
             "One table per headline metric, one column per results section below (model, then the settings its "
             "methods ran with); cells are `before → after` on that model's held-out sets, copied from the "
             "section's own table, which also lists its command, date and every method's provenance."]
    for key, label in SIDE_COLUMNS:
        lines += ["", f"**{label}** (`{key}`)", "", "| method | " + " | ".join(names) + " |",
                  "|" + "---|" * (len(names) + 1)]
        for method in methods:
            cells = [method]
            for n in names:
                sec = sections[n]
                row = next((r for r in sec.get("methods", []) if r["method"] == method), None)
                before = (sec.get("baseline") or {}).get("metrics", {}).get(key)
                after = None if row is None else (row.get("metrics") or {}).get(key)
                if row is None:
                    cells.append("–")
                elif row.get("error"):
                    cells.append("error")
                elif before is None or after is None:
                    cells.append("n/a")
                else:
                    cells.append(f"{before:.3f} → {after:.3f}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _merge_sections(path: Path, section: str, body: str, *, first: bool = False) -> None:
    """Replace (or append) ``section`` in a sectioned results file; its title becomes a second-level heading.
    ``first`` puts the section before the others."""
    import re

    from haltrace.trace.store import atomic_write_text

    text = path.read_text() if path.is_file() else ""
    blocks = dict(re.findall(re.escape(_SECTION).replace(r"\{\}", "(.+?)") + r"\n(.*?)\n" + re.escape(_SECTION_END),
                             text, flags=re.S))
    lines = body.strip("\n").splitlines()
    if lines and lines[0].startswith("# "):
        lines[0] = "#" + lines[0]
    blocks[section] = "\n".join(lines)
    if first:
        blocks = {section: blocks[section]} | {k: v for k, v in blocks.items() if k != section}
    out = ["# Steering results", ""]
    for name, block in blocks.items():
        out += [_SECTION.format(name), block, _SECTION_END, ""]
    atomic_write_text(path, "\n".join(out))
