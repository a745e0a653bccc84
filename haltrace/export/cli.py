"""``haltrace export``: write a steering vector as a llama.cpp control vector (GGUF) or in haltrace's own format.

Examples::

    haltrace export vectors/entity.safetensors --format gguf --out entity.gguf --model-hint llava-1.5-7b
    haltrace export runs/caa --format gguf --out caa.gguf            # a `haltrace steer --out` folder
    haltrace export runs/pvp --format safetensors --out vectors/pvp --json

Inputs that llama.cpp cannot express (projections, position masks, phases, head edits, gated hooks,
decoding strategies) are refused with the reason.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from haltrace.export.formats import FORMATS, ExportResult

app = typer.Typer(help="Export steering vectors.", no_args_is_help=True)


def _print_summary(result: ExportResult, source: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"exported {result.method} ({result.format})")
    table.add_column("field")
    table.add_column("value")
    rows = [("source", str(source)), ("format", result.format), ("model", result.model or "(unknown)"),
            ("hidden size", str(result.hidden_size)),
            ("model layers", "(unknown)" if result.n_layers is None else str(result.n_layers)),
            ("alpha", f"{result.alpha:g}" + (" (baked into the tensors)" if result.format == "gguf" else ""))]
    if result.model_hint is not None:
        rows.append(("model hint", result.model_hint))
    rows += [("layers", ", ".join(f"{hook} -> {name}" for hook, name in result.layers.items())),
             ("out", ", ".join(str(f) for f in result.files))]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
    for note in result.notes:
        console.print(f"note: {note}")


@app.command("export")
def export_cmd(
    vector: Path = typer.Argument(..., metavar="VECTOR",
                                  help="A SteeringVector (NAME.safetensors), a `haltrace steer --out` folder, or a "
                                       ".gguf control vector."),
    fmt: str = typer.Option("gguf", "--format", "-f", help=f"Output format: {' or '.join(FORMATS)}."),
    out: Path = typer.Option(..., "--out", "-o", help="Output file (gguf) or NAME (writes NAME.safetensors + "
                                                      "NAME.json)."),
    model_hint: str | None = typer.Option(None, "--model-hint", help="controlvector.model_hint (gguf only); "
                                                                     "default: the vector's model name."),
    n_layers: int | None = typer.Option(None, "--n-layers", help="The model's number of decoder blocks, when the "
                                                                 "input does not record it."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """Export a steering vector; resid_post.L becomes llama.cpp's direction.L (added after block L)."""
    from haltrace.export.formats import export

    if fmt not in FORMATS:
        raise typer.BadParameter(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}", param_hint="--format")
    if model_hint is not None and fmt != "gguf":
        raise typer.BadParameter("--model-hint only applies to --format gguf", param_hint="--model-hint")
    if not vector.exists():
        raise typer.BadParameter(f"{vector} does not exist", param_hint="VECTOR")
    from haltrace.errors import InputError, check_writable

    try:
        check_writable(out, "--out")
    except InputError as exc:
        raise typer.BadParameter(str(exc), param_hint="--out") from None
    try:
        result = export(vector, out, format=fmt, model_hint=model_hint, n_layers=n_layers)
    except ImportError as exc:  # the optional gguf package
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(1) from None
    except (ValueError, OSError) as exc:  # ExportError / VectorError are ValueErrors: bad input, said plainly
        raise typer.BadParameter(str(exc), param_hint="VECTOR") from None
    if as_json:
        typer.echo(json.dumps(result.to_json() | {"source": str(vector)}))
        return
    _print_summary(result, vector)
