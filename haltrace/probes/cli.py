"""``haltrace probe``: per-layer linear probes on a built-in organism task or your labelled JSONL file.

Examples::

    haltrace probe --model shapes-llava --task entity --hook resid_post --layers all --out runs/entity
    haltrace probe --model gpt2 --data hallu.jsonl --layers 4-8 --out runs/gpt2 --json

The command group is a one-command typer app, so it can be merged at top level (``haltrace probe``) or
invoked directly (tests call ``CliRunner().invoke(app, [...])`` without the command name).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import typer

from haltrace.cli_common import fail as _fail

app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False,
                  help="Per-layer linear probes (logistic + mass-mean) against confound baselines.")


def _summary(manifest: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(title=f"{manifest['task']} probe on {manifest['model']} ({manifest['hook']}.i)")
    for col in ("layer", "probe AUROC", "probe acc.", "C", "mass-mean AUROC"):
        table.add_column(col, justify="right")
    for x in manifest["layers"]:
        m = manifest["metrics"][str(x)]
        style = "bold green" if x == manifest["best_layer"] else None
        table.add_row(str(x), f"{m['logreg']['auroc']:.3f}", f"{m['logreg']['accuracy']:.3f}",
                      f"{m['logreg']['C']:g}", f"{m['mass_mean']['auroc']:.3f}", style=style)
    base = manifest["baselines"]
    table.caption = (f"bag-of-tokens baseline AUROC {base['bag_of_tokens']['auroc']:.3f}, shuffled-label control "
                     f"{base['shuffled_labels']['auroc']:.3f}, majority accuracy "
                     f"{base['majority']['accuracy']:.3f}; n={manifest['n']} {manifest['counts']}, "
                     f"{manifest['n_groups']} groups; {manifest['timings']['total_s']:.1f} s"
                     + (f"; logistic probe at REDUCED RANK {manifest['rank']} (width > --max-dim "
                        f"{manifest['max_dim']}; --exact fits all features)" if manifest.get("reduced_rank") else ""))
    return table


@app.command("probe")
def probe(
    out: Path = typer.Option(..., "--out", help="Output folder (store/, probes.*, vectors/, report.html)."),
    model: str = typer.Option("shapes-llava", "--model", help="Organism name, hub id or local path."),
    task: str = typer.Option(None, "--task", help="Built-in organism task: hallucination, pope, entity, "
                                                  "entity-last, prior-vs-pixel."),
    data: Path = typer.Option(None, "--data", help="Labelled JSONL file instead of a built-in task."),
    hook: str = typer.Option("resid_post", "--hook", help="resid_pre, resid_post, attn_out or mlp_out."),
    layers: str = typer.Option("all", "--layers", help="'all', 'i', 'i,j' or 'i-j' (negative from the end)."),
    folds: int = typer.Option(5, "--folds", help="Outer group folds for held-out metrics."),
    inner_folds: int = typer.Option(3, "--inner-folds", help="Inner group folds that choose C."),
    batch_size: int = typer.Option(64, "--batch-size", help="Examples per forward pass while harvesting."),
    max_dim: int = typer.Option(128, "--max-dim", help="Widths above this are fitted at reduced rank max-dim per "
                                                       "fold (speed; recorded as reduced_rank in probes.json)."),
    exact: bool = typer.Option(False, "--exact", help="scikit-learn LogisticRegression on all features instead "
                                                      "of the batched solver (slow on wide layers: spot checks)."),
    device: str = typer.Option(None, "--device", help="cpu, cuda, ... (default: cuda if available)."),
    seed: int = typer.Option(0, "--seed"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Rebuild OUT/store even if it holds another store."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON on stdout."),
) -> None:
    """Harvest activations, fit per-layer probes with group-aware nested CV, and report them against baselines."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from haltrace.probes.datasets import TASKS, build_task, load_jsonl, resolve_generated
    from haltrace.steering.vector import VectorError
    from haltrace.trace.store import StoreError

    started = time.perf_counter()
    if (task is None) == (data is None):
        _fail("give exactly one of --task (" + ", ".join(TASKS) + ") or --data FILE.jsonl")
    err_console = Console(stderr=True)
    from haltrace.errors import check_writable

    try:
        check_writable(out, "--out")
        pset = load_jsonl(data) if data is not None else None  # bad files fail before the model loads
        if task is not None and task not in TASKS:
            build_task(task, None)  # raises the error listing tasks
        import haltrace

        with err_console.status(f"loading {model}"):
            loaded = haltrace.load(model, device=device)
        with err_console.status(f"building the {task or data} probe set"):
            pset = build_task(task, loaded) if pset is None else resolve_generated(pset, loaded)
        setup_s = time.perf_counter() - started
        from haltrace.probes.artifacts import parse_layers, run_probe

        n_layers = len(parse_layers(layers, loaded.n_layers))
        bar = Progress(TextColumn("probe layers"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       console=err_console, disable=as_json and not sys.stderr.isatty())
        with bar:
            job = bar.add_task("probe", total=n_layers)
            manifest = run_probe(loaded, pset, out=out, hook=hook, layers=layers, n_folds=folds,
                                 inner_folds=inner_folds, max_dim=max_dim, batch_size=batch_size, seed=seed,
                                 overwrite=overwrite, progress=not as_json, exact=exact,
                                 on_layer=lambda k: bar.advance(job, k))
    except StoreError as err:
        _fail(f"{err}\n(the store lives in {out / 'store'}; pass --overwrite to rebuild it, or choose another --out)")
    except (ValueError, FileNotFoundError, VectorError) as err:
        _fail(str(err))
    manifest["timings"].update(setup_s=setup_s, total_s=time.perf_counter() - started)
    from haltrace.trace.store import atomic_write_text

    atomic_write_text(out / "probes.json", json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    (out / "probes.json").chmod(0o644)
    if as_json:
        typer.echo(json.dumps(manifest, indent=1, sort_keys=True))
    else:
        Console().print(_summary(manifest))
        Console().print(f"report: {out / 'report.html'}  probes: {out / 'probes.safetensors'}  "
                        f"vectors: {out / 'vectors'}")
