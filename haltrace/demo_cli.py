"""``haltrace demo``: the whole pipeline on the organism (see :mod:`haltrace.demo`).

Example::

    haltrace demo --out out/demo
    haltrace demo --methods all --json
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from haltrace.demo import DEFAULT_METHODS, PROBE_TASKS, jsonable, run_demo

app = typer.Typer(add_completion=False)


@app.command("demo")
def demo_cmd(
    out: Path = typer.Option(Path("out/demo"), "--out", help="Folder for report.html, summary.json and artifacts."),
    model: str = typer.Option("shapes-llava", "--model", help="An organism name or folder (its held-out sets are "
                                                              "the evaluation data)."),
    methods: str = typer.Option(",".join(DEFAULT_METHODS), "--methods",
                                help="Comma-separated steering methods, or 'all' for the whole registry."),
    n_lens: int = typer.Option(200, "--n-lens", help="Counterfactual items for the lens and attention stage."),
    probes: str = typer.Option(",".join(PROBE_TASKS), "--probes",
                               help="Comma-separated probe tasks (entity-last is required: its direction is exported)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object."),
) -> None:
    """The whole pipeline on the organism: trace -> probe -> steer -> evaluate -> export, one HTML report."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from haltrace.steering.registry import list_methods
    from haltrace.viz.demo_report import summary_rows

    chosen = list_methods() if methods.strip() == "all" else [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in list_methods()]
    if unknown:
        raise typer.BadParameter(f"unknown method(s) {unknown}; registered: {', '.join(list_methods())}",
                                 param_hint="--methods")
    tasks = [t.strip() for t in probes.split(",") if t.strip()]
    from haltrace.probes.datasets import TASKS

    bad = [t for t in tasks if t not in TASKS]
    if bad or "entity-last" not in tasks:
        raise typer.BadParameter(f"unknown task(s) {bad}; choose from {', '.join(TASKS)}" if bad else
                                 "must include entity-last (the export stage ships its direction)",
                                 param_hint="--probes")
    if n_lens < 1:
        raise typer.BadParameter("must be >= 1", param_hint="--n-lens")
    err = Console(stderr=True)
    stage_names = ["phenomena", "trace", "probe", "steer", "export", "explain"]
    with Progress(TextColumn("[bold]demo[/] {task.description}"), BarColumn(), TextColumn("{task.completed}/6"),
                  TimeElapsedColumn(), console=err) as bar:
        job = bar.add_task("loading", total=len(stage_names))

        def on_stage(name: str) -> None:
            bar.update(job, completed=stage_names.index(name), description=name)

        try:
            summary = run_demo(out, model=model, methods=chosen, n_lens=n_lens, probe_tasks=tasks, on_stage=on_stage,
                               show_tables=not as_json)
        except FileNotFoundError as exc:
            err.print(f"[red]error:[/] {exc}")
            raise typer.Exit(2) from None
        bar.update(job, completed=len(stage_names), description="done")
    if as_json:
        typer.echo(json.dumps(jsonable(summary), allow_nan=False))
        return
    table = Table(title=f"haltrace demo: {summary['folder']}", show_lines=True)
    for col in ("stage", "measured", "seconds"):
        table.add_column(col, overflow="fold")
    for row in summary_rows(summary):
        table.add_row(*row)
    Console().print(table)
    Console().print(f"report: {summary['report']}  summary: {Path(summary['out']) / 'summary.json'}")
