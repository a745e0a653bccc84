"""``haltrace organism``: train and evaluate the ShapesWorld model organism, and write its held-out sets.

Examples::

    haltrace organism list                      # the zoo: mechanism, size, recipe of each shipped organism
    haltrace organism eval                      # the shipped shapes-llava, as a table
    haltrace organism eval shapes-llava-staged --json   # one JSON object, mechanism checks included
    haltrace organism eval --write-sets sets/   # held-out sets in POPE / CHAIR file formats
    haltrace organism train --out /tmp/o --preset tiny --seed 0
    haltrace organism train --out /tmp/o --recipe staged          # LLaVA-style stage-wise training
    haltrace organism train --out /tmp/o --like shapes-qwen2vl    # rerun a shipped organism's recipe
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(help="Train and evaluate the ShapesWorld model organism; write its held-out sets.", no_args_is_help=True)


def _resolve(model: str) -> Path:
    from haltrace.organism.paths import ORGANISMS, organism_folder

    path = organism_folder(model)
    if path is None:
        raise typer.BadParameter(
            f"{model!r} is neither a shipped organism name ({', '.join(ORGANISMS)}) nor an organism folder "
            f"(a folder with world.json, as written by `haltrace organism train`)", param_hint="MODEL")
    return path


@app.command("list")
def list_cmd(as_json: bool = typer.Option(False, "--json", help="Print one JSON list instead of a table.")) -> None:
    """The organism zoo: one line per shipped organism (mechanism, size, recipe)."""
    from haltrace.organism.zoo import ZOO, describe

    rows = [describe(entry) for entry in ZOO]
    if as_json:
        typer.echo(json.dumps(rows))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="haltrace organism zoo (artifacts/organisms; --json for the details)")
    for col in ("name", "recipe", "size", "where the hallucination lives"):
        table.add_column(col, no_wrap=col != "where the hallucination lives")
    for r in rows:
        size = "missing" if r.get("missing") else f"{r['size_mb']:.1f} MB"
        table.add_row(r["name"], f"{r['recipe']}, {r['arch']}", size, r["mechanism"])
    Console().print(table)


@app.command()
def train(
    out: Path = typer.Option(..., "--out", help="Folder to write the trained organism to."),
    recipe: str = typer.Option("joint", help="joint (every weight on the whole task mix; shapes-llava) or staged "
                                             "(LM first, then vision tower + projector with the LM frozen; "
                                             "shapes-llava-staged)."),
    arch: str = typer.Option("llava", help="llava (CLIP + Llama) or qwen2_vl (Qwen2-VL); staged is llava only."),
    like: str | None = typer.Option(None, "--like", help="Rerun the recipe of a shipped organism (its recipe, "
                                                          "architecture and seed; overrides the other options)."),
    preset: str = typer.Option("default", help="default (the shipped size, <= 15 min on 2 cores) or tiny "
                                               "(a smoke test, about a minute; joint recipe only)."),
    seed: int = typer.Option(0, help="Seed: the same seed gives identical weights."),
    steps: int | None = typer.Option(None, help="Training steps (default: the preset's; joint recipe only)."),
    evaluate: bool = typer.Option(True, "--eval/--no-eval",
                                  help="Measure the phenomena and the mechanism afterwards and record them in the "
                                       "model card."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
) -> None:
    """Train an organism from scratch and save it with save_pretrained, plus its world and model card."""
    from haltrace.organism.card import print_phenomena_table, write_model_card
    from haltrace.organism.processing import ARCHES
    from haltrace.organism.train import PRESETS, train_organism

    if like is not None:
        from haltrace.organism.zoo import ZOO, zoo_entry

        try:
            entry = zoo_entry(like)
        except KeyError:
            raise typer.BadParameter(f"no shipped organism called {like!r}; choose one of "
                                     f"{', '.join(o.name for o in ZOO)}", param_hint="--like") from None
        result = entry.train(out, progress=not as_json)
        recipe, arch, seed = entry.recipe, entry.arch, entry.seed
    else:
        if recipe not in ("joint", "staged"):
            raise typer.BadParameter(f"unknown recipe {recipe!r}; choose joint or staged", param_hint="--recipe")
        if arch not in ARCHES:
            raise typer.BadParameter(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHES)}",
                                     param_hint="--arch")
        if preset not in PRESETS:
            raise typer.BadParameter(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}",
                                     param_hint="--preset")
        if recipe == "staged":
            if arch != "llava" or preset != "default" or steps is not None:
                raise typer.BadParameter("the staged recipe trains the default-size LLaVA organism; drop --arch, "
                                         "--preset and --steps (its stages: haltrace.organism.staged.StagedConfig)",
                                         param_hint="--recipe")
            from haltrace.organism.staged import train_staged

            result = train_staged(out, seed=seed, progress=not as_json)
        else:
            result = train_organism(out, preset=preset, seed=seed, steps=steps, progress=not as_json, arch=arch)
    report = None
    if evaluate:
        report = _measure(Path(out))
        (Path(out) / "phenomena.json").write_text(json.dumps(report, indent=1))
    write_model_card(out, report)
    summary = {"out": str(out), "recipe": recipe, "arch": arch, "preset": result.preset, "seed": seed,
               "steps": result.steps, "seconds": round(result.seconds, 1), "n_parameters": result.n_parameters,
               "loss_first": result.loss_first, "loss_last": result.loss_last}
    if as_json:
        typer.echo(json.dumps({"training": summary, "phenomena": report}))
        return
    typer.echo(f"trained {result.n_parameters:,} parameters in {result.seconds:.0f} s; "
               f"loss {result.loss_first:.3f} -> {result.loss_last:.3f}; saved to {out}")
    if report is not None:
        print_phenomena_table(report)


def _measure(path: Path, mechanism: bool = True) -> dict:
    """The phenomena report of an organism folder, with its ``mechanism`` checks unless told otherwise."""
    from haltrace.organism.phenomena import measure_phenomena

    report = measure_phenomena(path)
    if mechanism:
        import haltrace
        from haltrace.organism.mechanism import measure_mechanism

        report["mechanism"] = measure_mechanism(haltrace.load(str(path), attn_implementation="eager"))
    return report


@app.command("eval")
def evaluate_cmd(
    model: str = typer.Argument("shapes-llava", help="Organism name or folder."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (rates in [0, 1])."),
    write_sets: Path | None = typer.Option(None, "--write-sets",
                                           help="Also write the held-out sets (POPE JSONL, CHAIR object lists, "
                                                "PNG images) to this folder."),
    mechanism: bool = typer.Option(True, "--mechanism/--no-mechanism",
                                   help="Also locate the hallucination: oracle erasure, present-object removal, "
                                        "internal confidence over the image tokens, attention to the image by "
                                        "answer (about a minute)."),
) -> None:
    """Measure the organism's phenomena (and where its hallucination lives) on its held-out sets."""
    from haltrace.organism.card import print_phenomena_table
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
    report = _measure(path, mechanism)
    if as_json:
        typer.echo(json.dumps(report))
        return
    print_phenomena_table(report, title=f"{model}: measured phenomena")
    if write_sets is not None:
        typer.echo(f"held-out sets written to {write_sets}")
