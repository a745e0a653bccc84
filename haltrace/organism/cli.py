"""``haltrace organism``: train and evaluate the ShapesWorld model organism, and write its held-out sets.

Examples::

    haltrace organism eval                      # the shipped shapes-llava, as a table
    haltrace organism eval --json               # one JSON object
    haltrace organism eval --write-sets sets/   # held-out sets in POPE / CHAIR file formats
    haltrace organism train --out /tmp/o --preset tiny --seed 0
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(help="Train and evaluate the ShapesWorld model organism; write its held-out sets.", no_args_is_help=True)


def _resolve(model: str) -> Path:
    from haltrace.organism.paths import organism_folder

    path = organism_folder(model)
    if path is None:
        raise typer.BadParameter(
            f"{model!r} is neither a shipped organism name (shapes-llava) nor an organism folder "
            f"(a folder with world.json, as written by `haltrace organism train`)", param_hint="MODEL")
    return path


@app.command()
def train(
    out: Path = typer.Option(..., "--out", help="Folder to write the trained organism to."),
    preset: str = typer.Option("default", help="default (the shipped size, <= 10 min on 2 cores) or tiny "
                                               "(a smoke test, about a minute)."),
    seed: int = typer.Option(0, help="Seed: the same seed gives identical weights."),
    steps: int | None = typer.Option(None, help="Training steps (default: the preset's)."),
    evaluate: bool = typer.Option(True, "--eval/--no-eval",
                                  help="Measure the phenomena afterwards and record them in the model card."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
) -> None:
    """Train an organism from scratch and save it with save_pretrained, plus its world and model card."""
    from haltrace.organism.card import print_phenomena_table, write_model_card
    from haltrace.organism.train import PRESETS, train_organism

    if preset not in PRESETS:
        raise typer.BadParameter(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}",
                                 param_hint="--preset")
    result = train_organism(out, preset=preset, seed=seed, steps=steps, progress=not as_json)
    report = None
    if evaluate:
        from haltrace.organism.phenomena import measure_phenomena

        report = measure_phenomena(out)
        (Path(out) / "phenomena.json").write_text(json.dumps(report, indent=1))
    write_model_card(out, report)
    summary = {"out": str(out), "preset": preset, "seed": seed, "steps": result.steps,
               "seconds": round(result.seconds, 1), "n_parameters": result.n_parameters,
               "loss_first": result.loss_first, "loss_last": result.loss_last}
    if as_json:
        typer.echo(json.dumps({"training": summary, "phenomena": report}))
        return
    typer.echo(f"trained {result.n_parameters:,} parameters in {result.seconds:.0f} s; "
               f"loss {result.loss_first:.3f} -> {result.loss_last:.3f}; saved to {out}")
    if report is not None:
        print_phenomena_table(report)


@app.command("eval")
def evaluate_cmd(
    model: str = typer.Argument("shapes-llava", help="Organism name or folder."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (rates in [0, 1])."),
    write_sets: Path | None = typer.Option(None, "--write-sets",
                                           help="Also write the held-out sets (POPE JSONL, CHAIR object lists, "
                                                "PNG images) to this folder."),
) -> None:
    """Measure the organism's phenomena on its held-out sets."""
    from haltrace.organism.card import print_phenomena_table
    from haltrace.organism.phenomena import measure_phenomena
    from haltrace.organism.train import load_world

    path = _resolve(model)
    if write_sets is not None:
        from haltrace.errors import InputError, check_writable
        from haltrace.organism.export_sets import write_eval_sets

        try:
            check_writable(write_sets, "--write-sets")
        except InputError as exc:
            raise typer.BadParameter(str(exc), param_hint="--write-sets") from None

        write_eval_sets(load_world(path), write_sets)
    report = measure_phenomena(path)
    if as_json:
        typer.echo(json.dumps(report))
        return
    print_phenomena_table(report, title=f"{model}: measured phenomena")
    if write_sets is not None:
        typer.echo(f"held-out sets written to {write_sets}")
