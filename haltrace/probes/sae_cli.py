"""``haltrace sae``: train sparse autoencoders on activation stores and find entity-recognition latents.

Examples::

    haltrace sae train --store acts/entity --store acts/pope --hook resid_post.2 --d-sae 1024 --out saes/l2
    haltrace sae train --store acts/entity --hook resid_post.2 --d-sae 1024 --arch relu --l1 3 --out saes/r --json
    haltrace sae latents --sae saes/l2 --task entity --top 5 --vectors vectors/ --refusal
    haltrace sae latents --sae saes/l2 --store acts/entity --generic-store acts/image --heldout-fraction 0.5 --json

``latents`` drops latents that fire on >= 2 % of generic (non-entity) tokens (``--max-generic-freq``), ranks the
rest on half of the entities and scores them again on the other half (``--heldout-fraction``, ``--seed``); with
``--refusal`` it steers on held-out entities against random directions and random score-0 latents.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import typer

from haltrace.cli_common import fail as _fail

app = typer.Typer(help="Train SAEs on activation stores; rank entity-recognition latents and steer with them.",
                  no_args_is_help=True)


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


# ------------------------------------------------------------------------------------ the organism's data
# This CLI module is the top layer, so it may read the organism; haltrace.probes.sae_latents takes the rows
# and stores built here as arguments and never imports the organism.
ENTITY_GROUPS = ("known", "unknown_train", "unknown_heldout")


def organism_entity_rows(world: Any, groups: Sequence[str] = ENTITY_GROUPS) -> list[dict[str, Any]]:
    """One dict per entity question of the organism: ``prompt``, ``group``, ``known``, ``name``, ``etype``, ``key``,
    ``target`` (the rows :func:`haltrace.probes.sae_latents.score_entity_latents` takes). ``groups`` picks
    among known / unknown_train (names taught with the answer "unknown") / unknown_heldout (never seen)."""
    from haltrace.organism.tasks import entity_sets

    sets = entity_sets(world)
    bad = [g for g in groups if g not in sets]
    if bad:
        raise ValueError(f"unknown entity groups {bad}; choose from {list(sets)}")
    return [{"prompt": ex.prompt, "group": g, "known": g == "known", "target": ex.target, **ex.meta}
            for g in groups for ex in sets[g]]


def harvest_organism_sae_data(model: Any, world: Any, hook: str, root: str | Path, *,
                              progress: bool = False) -> list[Any]:
    """Stores to train an organism SAE on, every token position of: the organism's entity questions (text) and
    ~1,000 image questions (POPE random split: 300 images x 2 questions; 200 counterfactual-colour and 200
    caption prompts). Returns ``[entity_store, image_store]`` under ``root/entity`` and ``root/image``; the
    image store also serves as the generic (non-entity) tokens of the latent filter.

    Image tokens precede the question, so each image is used by few prompts: more images, fewer repeats.

    >>> stores = harvest_organism_sae_data(model, world, "resid_post.2", "acts/")   # doctest: +SKIP
    """
    from PIL import Image

    from haltrace.organism import tasks
    from haltrace.probes.sae_latents import entity_dataset
    from haltrace.trace.harvest import harvest

    root = Path(root)
    entity = harvest(model, entity_dataset(organism_entity_rows(world)), [hook], positions="all",
                     out=root / "entity", progress=progress)
    examples = (tasks.pope_sets(world)["random"] + tasks.counterfactual_colour_set(world)
                + tasks.caption_set(world))
    images = [{"prompt": ex.full_prompt, "image": Image.fromarray(ex.image)} for ex in examples]
    image = harvest(model, images, [hook], positions="all", out=root / "image", batch_size=64, progress=progress)
    return [entity, image]


def _organism_world(model_name: str):
    from haltrace.organism.paths import organism_world

    world = organism_world(model_name)
    if world is None:
        _fail(f"--task entity needs a ShapesWorld organism (a folder with world.json); {model_name!r} is not one")
    return world


def _default_generic_stores(sae: Any, entity_store: Path, hook: str) -> list[Path]:
    """The SAE's own training stores (its metadata), minus the entity store, that hold ``hook``."""
    from haltrace.trace.store import ActivationStore, StoreError

    out = []
    for folder in sae.cfg.metadata.get("haltrace_stores") or []:
        path = Path(folder)
        if not path.is_dir() or path.resolve() == Path(entity_store).resolve():
            continue
        try:
            if hook in ActivationStore.open(path).hooks:
                out.append(path)
        except (StoreError, ValueError, OSError):
            continue
    return out


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
    generic_store: list[Path] | None = typer.Option(  # noqa: B008
        None, "--generic-store", help="Store of non-entity prompts for the generic-token filter (repeat for "
                                      "several; default: the SAE's other training stores, else the tokens "
                                      "before each entity)."),
    max_generic_freq: float = typer.Option(0.02, "--max-generic-freq",
                                           help="Drop latents firing on this fraction of generic tokens or more "
                                                "(the paper's 0.02)."),
    no_generic_filter: bool = typer.Option(False, "--no-generic-filter", help="Rank every latent (no filter)."),
    heldout_fraction: float = typer.Option(0.5, "--heldout-fraction",
                                           help="Entities held out from ranking (scored again, and steered)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the entity split and of the random baselines."),
    vectors: Path | None = typer.Option(  # noqa: B008
        None, "--vectors", help="Write the top known/unknown latents as SteeringVectors into this folder."),
    refusal: bool = typer.Option(False, "--refusal", help="Measure refusal rate vs steering coefficient."),
    multiples: str = typer.Option("0,0.5,1,2,3,4", "--coefs", help="Steering coefficients, comma-separated, "
                                                                   "as multiples of --coef-unit."),
    unit: str = typer.Option("norm", "--coef-unit", help="norm (mean residual norm at the entity token) or "
                                                         "scale (each latent's typical activation)."),
    n_random: int = typer.Option(5, "--random", help="Random Gaussian directions for the refusal baseline."),
    n_random_latents: int = typer.Option(5, "--random-latents",
                                         help="Random score-0 latents for the refusal baseline (the paper's)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
) -> None:
    """Rank SAE latents by Ferrando et al.'s separation score between known and unknown entities."""
    import haltrace
    from haltrace.errors import InputError
    from haltrace.probes.sae import SAEError, load_sae, sae_hook
    from haltrace.probes.sae_latents import entity_refusal_experiment, latent_vector, score_entity_latents
    from haltrace.trace.store import StoreError

    if task != "entity":
        raise typer.BadParameter(f"unknown task {task!r}; only 'entity' exists", param_hint="--task")
    try:
        coefs = [float(x) for x in multiples.split(",")]
    except ValueError:
        _fail(f"--coefs {multiples!r}: give numbers separated by commas, e.g. 0,0.5,1,2")
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
        from haltrace.errors import check_writable

        try:
            check_writable(vectors, "--vectors")
        except InputError as exc:
            _fail(str(exc))
    for path in generic_store or []:
        if not path.is_dir():
            _fail(f"--generic-store {path}: no such store folder; harvest one (positions='all') or leave the "
                  "option out")
    model = haltrace.load(model_name)
    try:
        generic = list(generic_store or []) or _default_generic_stores(sae, store, sae_hook(sae))
        result = score_entity_latents(sae, model, organism_entity_rows(world), store=store, unknown=unknown,
                                      top=top, generic_stores=generic,
                                      max_generic_freq=None if no_generic_filter else max_generic_freq,
                                      heldout_fraction=heldout_fraction, seed=seed, progress=not as_json)
        experiment = entity_refusal_experiment(
            sae, model, result, multiples=coefs, unit=unit, n_random=n_random, n_random_latents=n_random_latents,
            refusal_word=world_refusal_word(), seed=seed) if refusal else None
    except (SAEError, StoreError, InputError, ValueError) as err:
        _fail(str(err))
    written = {}
    if vectors is not None:
        for which in ("known", "unknown"):
            if result[which]:
                best = result[which][0]
                vec = latent_vector(sae, best["latent"], scale=best["scale"], model=model,
                                    provenance={"task": "entity", "kind": which, "score": best["score"],
                                                "score_heldout": best.get("score_heldout"),
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


def _pm(mean: list[float] | None, std: list[float] | None, i: int) -> str:
    return "-" if mean is None or std is None else f"{100 * mean[i]:.1f}% ± {100 * std[i]:.1f}"


def _print_latents(payload: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    split, filt = payload["split"], payload["generic_filter"]
    for which in ("known", "unknown"):
        table = Table(title=f"top {which}-entity latents at {payload['hook']} (score = min over "
                            f"{', '.join(payload['types'])}; {payload['n_known']} known vs {payload['n_unknown']} "
                            f"{payload['unknown_group']} questions in the selection split)")
        for col in ("latent", "score (in-sample)", "score (held-out)", "freq known", "freq unknown",
                    "generic freq", "mean act known", "mean act unknown", "scale"):
            table.add_column(col, justify="right")
        for row in payload[which]:
            fk = " ".join(f"{v:.2f}" for v in row["freq_known"].values())
            fu = " ".join(f"{v:.2f}" for v in row["freq_unknown"].values())
            held = row.get("score_heldout")
            gen = row.get("generic_freq")
            table.add_row(str(row["latent"]), f"{row['score']:.3f}", "-" if held is None else f"{held:.3f}", fk, fu,
                          "-" if gen is None else f"{gen:.3f}", f"{row['mean_act_known']:.3f}",
                          f"{row['mean_act_unknown']:.3f}", f"{row.get('scale', float('nan')):.3f}")
        table.caption = (f"in-sample = the {split['selection']['entities']} selection entities the latents were "
                         f"ranked on; held-out = {split['heldout']['entities']} other entities (seed "
                         f"{split['seed']}). "
                         + ("Generic-token filter off." if filt["max_freq"] is None else
                            f"Generic-token filter (>= {filt['max_freq']}): dropped {filt['dropped']} of "
                            f"{filt['d_sae']} latents ({filt['dropped_from_top'][which]} of the unfiltered top "
                            f"{len(payload[which])}), measured on {filt['n_tokens']} tokens: {filt['source']}"))
        console.print(table)
    for which, path in payload["vectors"].items():
        console.print(f"{which} latent direction -> {path}")
    if payload.get("refusal"):
        for name, exp in payload["refusal"].items():
            if not isinstance(exp, dict):
                continue
            table = Table(title=f"refusal rate, {name.replace('_', ' ')} (latent {exp['latent']}; {exp['target']}, "
                                f"n={exp['n']})")
            for col in ("coef", "latent", f"latent, in-sample (n={exp['n_in_sample']})", "random directions",
                        f"random latents {exp['random_latents']}"):
                table.add_column(col, justify="right")
            for i, (c, r) in enumerate(zip(exp["coefs"], exp["refusal"], strict=True)):
                inside = exp["refusal_in_sample"]
                table.add_row(f"{c:.2f}", f"{100 * r:.1f}%", "-" if inside is None else f"{100 * inside[i]:.1f}%",
                              _pm(exp["random_mean"], exp["random_std"], i),
                              _pm(exp["random_latents_mean"], exp["random_latents_std"], i))
            console.print(table)
