"""``haltrace sae``: train sparse autoencoders on activation stores and find entity-recognition latents.

Examples::

    haltrace sae train --store acts/entity --store acts/pope --hook resid_post.2 --d-sae 1024 --out saes/l2
    haltrace sae train --store acts/entity --hook resid_post.2 --d-sae 1024 --arch relu --l1 3 --out saes/r --json
    haltrace sae latents --sae saes/l2 --task entity --top 5 --vectors vectors/ --refusal
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(help="Train SAEs on activation stores; rank entity-recognition latents and steer with them.",
                  no_args_is_help=True)


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


@app.command()
def train(
    store: list[Path] = typer.Option(..., "--store", help="Activation store folder (repeat for several)."),  # noqa: B008
    hook: str = typer.Option(..., "--hook", help="Hook to train on, e.g. resid_post.2 (must be in every store)."),
    d_sae: int = typer.Option(..., "--d-sae", help="Number of latents."),
    out: Path = typer.Option(..., "--out", help="Folder to save the SAE to (SAELens format)."),  # noqa: B008
    arch: str = typer.Option("topk", "--arch", help="topk (k active latents per row) or relu (L1-penalised)."),
    k: int = typer.Option(16, "--k", help="Active latents per row for --arch topk."),
    l1: float = typer.Option(5.0, "--l1", help="L1 coefficient for --arch relu (inputs scaled to norm sqrt(d))."),
    lr: float = typer.Option(1e-3, "--lr", help="Adam learning rate."),
    batch_size: int = typer.Option(256, "--batch-size", help="Rows per training step."),
    steps: int | None = typer.Option(None, "--steps", help="Training steps (default: 10 epochs, 300..3000)."),
    samples: int | None = typer.Option(None, "--samples", help="Training rows in total (instead of --steps)."),
    heldout_every: int = typer.Option(10, "--heldout-every", help="Hold out every n-th example for metrics."),
    seed: int = typer.Option(0, "--seed"),
    threads: int | None = typer.Option(None, "--threads", help="torch CPU threads while training."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out folder."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """Train an SAE on one hook of activation stores and report L0, explained variance and dead latents."""
    from haltrace.errors import InputError, check_writable
    from haltrace.probes.sae import SAEError, train_sae
    from haltrace.trace.store import StoreError

    try:
        check_writable(out, "--out")
    except InputError as err:
        _fail(str(err))
    try:
        _, report = train_sae([str(s) for s in store], hook, d_sae, arch=arch, k=k, l1_coefficient=l1, lr=lr,
                              batch_size=batch_size, steps=steps, samples=samples, heldout_every=heldout_every,
                              seed=seed, out=out, overwrite=overwrite, progress=not as_json, num_threads=threads)
    except (SAEError, StoreError) as err:
        _fail(str(err))
    if as_json:
        typer.echo(json.dumps(report.to_dict()))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"SAE on {hook} ({report.sae_hook_name}) -> {out}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in (("architecture", f"{arch}" + (f" k={k}" if arch == "topk" else f" l1={l1}")),
                        ("d_in x d_sae", f"{report.d_in} x {report.d_sae}"),
                        ("steps x batch", f"{report.steps} x {report.batch_size} ({report.epochs:.1f} epochs)"),
                        ("training rows / held-out rows", f"{report.train_rows} / {report.heldout_rows}"),
                        ("training time", f"{report.seconds:.1f} s"),
                        ("L0 (held-out)", f"{report.l0:.2f}"),
                        ("explained variance (held-out)", f"{report.explained_variance:.4f}"),
                        ("dead latents (held-out)", f"{report.dead_latents} ({100 * report.dead_fraction:.1f}%)")):
        table.add_row(name, value)
    Console().print(table)


def _organism_world(model_name: str):
    from haltrace.organism.paths import resolve_organism
    from haltrace.organism.train import load_world

    path = resolve_organism(model_name) or Path(model_name)
    if not (Path(path) / "world.json").is_file():
        _fail(f"--task entity needs a ShapesWorld organism (a folder with world.json); {model_name!r} is not one")
    return load_world(path)


@app.command()
def latents(
    sae_path: str = typer.Option(..., "--sae", help="SAE folder, or a SAELens release name with --sae-id."),
    sae_id: str | None = typer.Option(None, "--sae-id", help="SAE id inside a SAELens release."),
    task: str = typer.Option("entity", "--task", help="Only 'entity' (known vs unknown entities) for now."),
    model_name: str | None = typer.Option(None, "--model", help="Model (default: the SAE metadata's model)."),
    store: Path | None = typer.Option(  # noqa: B008
        None, "--store", help="Entity activation store to create or reuse (default: <SAE folder>-entity-store)."),
    unknown: str = typer.Option("unknown_train", "--unknown",
                                help="Unknown entities to contrast with: unknown_train, unknown_heldout or both."),
    top: int = typer.Option(10, "--top", help="How many latents to list per kind."),
    vectors: Path | None = typer.Option(  # noqa: B008
        None, "--vectors", help="Write the top known/unknown latents as SteeringVectors into this folder."),
    refusal: bool = typer.Option(False, "--refusal", help="Measure refusal rate vs steering coefficient."),
    multiples: str = typer.Option("0,0.5,1,2,3,4", "--coefs", help="Steering coefficients, comma-separated, "
                                                                   "as multiples of --coef-unit."),
    unit: str = typer.Option("norm", "--coef-unit", help="norm (mean residual norm at the entity token) or "
                                                         "scale (each latent's typical activation)."),
    n_random: int = typer.Option(5, "--random", help="Random directions for the refusal baseline."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
) -> None:
    """Rank SAE latents by Ferrando et al.'s separation score between known and unknown entities."""
    import haltrace
    from haltrace.probes.sae import SAEError, load_sae
    from haltrace.probes.sae_latents import entity_refusal_experiment, latent_vector, score_entity_latents

    if task != "entity":
        raise typer.BadParameter(f"unknown task {task!r}; only 'entity' exists", param_hint="--task")
    try:
        sae = load_sae(sae_path, sae_id)
    except SAEError as err:
        _fail(str(err))
    model_name = model_name or sae.cfg.metadata.get("model_name")
    if not model_name:
        _fail("the SAE metadata names no model; pass --model")
    if store is None:
        if sae_id is not None:
            _fail("pass --store for a SAELens release SAE (there is no SAE folder to put the store next to)")
        folder = Path(sae_path)
        store = folder.parent / f"{folder.name}-entity-store"
    world = _organism_world(model_name)
    if vectors is not None:
        from haltrace.errors import InputError, check_writable

        try:
            check_writable(vectors, "--vectors")
        except InputError as exc:
            _fail(str(exc))
    model = haltrace.load(model_name)
    try:
        result = score_entity_latents(sae, model, world, store=store, unknown=unknown, top=top,
                                      progress=not as_json)
        experiment = entity_refusal_experiment(
            sae, model, result, multiples=[float(x) for x in multiples.split(",")], unit=unit, n_random=n_random,
            refusal_word=world_refusal_word()) if refusal else None
    except (SAEError, ValueError) as err:
        _fail(str(err))
    written = {}
    if vectors is not None:
        for which in ("known", "unknown"):
            if result[which]:
                best = result[which][0]
                vec = latent_vector(sae, best["latent"], scale=best["scale"], model=model,
                                    provenance={"task": "entity", "kind": which, "score": best["score"],
                                                "sae": str(sae_path), "positions_used": "entity_last_to_end"})
                written[which] = str(vec.save(vectors / f"sae-{which}-latent-{best['latent']}"))
    payload = {k: v for k, v in result.items() if not k.startswith("_")}
    payload.update(model=model_name, vectors=written, refusal=experiment)
    if as_json:
        typer.echo(json.dumps(payload))
        return
    _print_latents(payload)


def world_refusal_word() -> str:
    from haltrace.organism.world import REFUSAL_WORD

    return REFUSAL_WORD


def _print_latents(payload: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for which in ("known", "unknown"):
        table = Table(title=f"top {which}-entity latents at {payload['hook']} (score = min over "
                            f"{', '.join(payload['types'])}; {payload['n_known']} known vs {payload['n_unknown']} "
                            f"{payload['unknown_group']})")
        for col in ("latent", "score", "freq known", "freq unknown", "mean act known", "mean act unknown",
                    "scale"):
            table.add_column(col, justify="right")
        for row in payload[which]:
            fk = " ".join(f"{v:.2f}" for v in row["freq_known"].values())
            fu = " ".join(f"{v:.2f}" for v in row["freq_unknown"].values())
            table.add_row(str(row["latent"]), f"{row['score']:.3f}", fk, fu, f"{row['mean_act_known']:.3f}",
                          f"{row['mean_act_unknown']:.3f}", f"{row.get('scale', float('nan')):.3f}")
        console.print(table)
    for which, path in payload["vectors"].items():
        console.print(f"{which} latent direction -> {path}")
    if payload.get("refusal"):
        for name, exp in payload["refusal"].items():
            if not isinstance(exp, dict):
                continue
            table = Table(title=f"refusal rate, {name.replace('_', ' ')} (latent {exp['latent']}, n={exp['n']})")
            for col in ("coef", "latent", "random (mean ± std)"):
                table.add_column(col, justify="right")
            for c, r, m, s in zip(exp["coefs"], exp["refusal"], exp["random_mean"], exp["random_std"], strict=True):
                table.add_row(f"{c:.2f}", f"{100 * r:.1f}%", f"{100 * m:.1f}% ± {100 * s:.1f}")
            console.print(table)
