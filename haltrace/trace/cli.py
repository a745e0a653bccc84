"""``haltrace trace`` and ``haltrace lens``: capture activations, attention to the image, and the logit lens.

Examples::

    haltrace trace --prompt "<image> what colour is the strawberry ? answer :" --image img.png \\
        --hooks "resid_post.*" --out acts/ --attention-to-image
    haltrace lens --prompt "<image> what colour is the strawberry ? answer :" --image img.png --targets red,blue
    haltrace lens --task counterfactual-color --n 100 --json --html prior_vs_pixel.html

``--model`` defaults to the shipped organism ``shapes-llava``; any hub id or local folder works too.
"""

# ruff: noqa: B008  (typer.Option in defaults is how typer declares options)
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from haltrace.cli_common import console as _console
from haltrace.cli_common import fail as _fail
from haltrace.cli_common import load_model

if TYPE_CHECKING:  # rich's console and tables load inside the commands: `haltrace --help` stays fast
    from rich.table import Table

app = typer.Typer(help="Trace activations and run the logit lens.", no_args_is_help=True)

TASKS = ("counterfactual-color",)
MODEL_HELP = "Organism name (shapes-llava), hub id or local model folder."


# --- helpers -----------------------------------------------------------------------------------------------

REMOTE_HELP = ("Run the forward on NDIF through nnsight: the model is built on the meta device from its config "
               "(no weights downloaded or loaded here); the server must host the checkpoint.")


def _check_prompt(prompt: str | None) -> None:
    if prompt is not None and not prompt.strip():
        _fail("--prompt is empty; give the text to run, e.g. --prompt \"<image> what colour is the shape ?\"")


def _check_out(path: Path | None, option: str) -> None:
    from haltrace.errors import InputError, check_writable

    if path is not None:
        try:
            check_writable(path, option)
        except InputError as exc:
            _fail(str(exc))


def _inputs(model: Any, prompt: str, image: Path | None) -> Any:
    images = None
    token = getattr(getattr(model, "processor", None), "image_token", None)
    if image is None and model.is_vlm and token and token in prompt:
        _fail(f"--prompt contains the image placeholder {token} but no --image was given; pass --image FILE, or "
              f"drop {token} for a text-only prompt")
    if image is not None:
        if not image.is_file():
            _fail(f"image file not found: {image}")
        if not model.is_vlm:
            _fail(f"{model.name_or_path} is a text-only model; drop --image")
        from PIL import Image

        try:
            images = [Image.open(image).convert("RGB")]
        except OSError as exc:
            _fail(f"cannot read image {image}: {exc}")
        token = getattr(model.processor, "image_token", None)
        if token and token not in prompt:  # the processor needs the placeholder to place the image tokens
            prompt = f"{token} {prompt}"
    try:
        return model.prepare([prompt], images=images)
    except ValueError as exc:
        _fail(str(exc))


def _split(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def _hook_names(model: Any, spec: str) -> list[str]:
    """Comma list; ``kind.*`` expands to every layer (``resid_post.*``)."""
    names: list[str] = []
    for part in _split(spec):
        if part.endswith(".*"):
            names += [f"{part[:-2]}.{i}" for i in range(model.n_layers)]
        else:
            names.append(part)
    if not names:
        _fail(f"no hooks given; valid hooks: {', '.join(model.valid_hooks())}")
    return names


def _positions(spec: str) -> Any:
    if spec in ("last", "all", "image"):
        return spec
    try:
        values = [int(p) for p in _split(spec)]
    except ValueError:
        _fail(f"--positions must be last, all, image, an int or a comma list of ints, got {spec!r}")
    return values


def _tokens(model: Any, inputs: Any) -> list[str]:
    return model.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0].tolist())


def _safetensors_write(path: Path, tensors: dict[str, Any], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    from haltrace.trace.store import atomic_write

    def write(tmp: str) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)

    atomic_write(path, write)


def _text_write(path: Path, text: str) -> None:
    from haltrace.trace.store import atomic_write

    def write(tmp: str) -> None:
        Path(tmp).write_text(text, encoding="utf-8")
        os.chmod(tmp, 0o644)

    atomic_write(path, write)


def _air_table(air: Any) -> Table:
    from rich.table import Table

    table = Table(title="attention to image tokens (last prompt token, row 0)")
    for col in ("layer", "mean over heads", "max head", "uniform baseline"):
        table.add_column(col, justify="right")
    ratio, baseline = air.ratio[0, -1], float(air.baseline[0, -1])
    for layer, row in zip(air.layers, ratio, strict=True):
        table.add_row(f"layer {layer}", f"{row.mean():.4f}", f"{row.max():.4f} (h{int(row.argmax())})",
                      f"{baseline:.4f}")
    return table


# --- trace -------------------------------------------------------------------------------------------------

@app.command()
def trace(
    prompt: str = typer.Option(..., "--prompt", help="Prompt text (VLMs: with the image placeholder, e.g. <image>)."),
    model: str = typer.Option("shapes-llava", "--model", help=MODEL_HELP),
    image: Path | None = typer.Option(None, "--image", help="Image file for a VLM."),
    hooks: str = typer.Option("resid_post.*", "--hooks",
                              help="Comma-separated hooks, e.g. resid_post.0,attn_out.1; kind.* = every layer."),
    positions: str = typer.Option("last", "--positions", help="last, all, image, or comma-separated ints."),
    out: Path | None = typer.Option(None, "--out", help="Folder for activations.safetensors + activations.json."),
    attention_to_image: bool = typer.Option(False, "--attention-to-image",
                                            help="Also print the per-layer attention of the last prompt token "
                                                 "on image tokens (loads the model with eager attention)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
    remote: bool = typer.Option(False, "--remote", help=REMOTE_HELP),
) -> None:
    """Capture activations for one prompt: summary table, optional safetensors dump and attention-to-image."""
    from rich.console import Console
    from rich.table import Table

    _check_prompt(prompt)
    _check_out(out, "--out")
    console = _console(as_json)
    m = load_model(model, console, eager=attention_to_image, remote=remote)
    inputs = _inputs(m, prompt, image)
    names = _hook_names(m, hooks)
    try:
        cap = m.capture(inputs, names, _positions(positions))
    except (ValueError, RuntimeError) as exc:  # unknown hook (lists the valid ones), bad position, no image
        _fail(str(exc))
    summary = {}
    for name, x in cap.items():
        flat = x.float().reshape(-1, x.shape[-1])
        norms = flat.norm(dim=-1)
        summary[name] = {"shape": list(x.shape), "dtype": str(x.dtype).replace("torch.", ""),
                         "norm_mean": float(norms.mean()), "norm_max": float(norms.max()),
                         "abs_max": float(flat.abs().max())}
    report: dict[str, Any] = {
        "model": model, "prompt": prompt, "image": str(image) if image else None, "tokens": _tokens(m, inputs),
        "positions": None if cap.positions is None else cap.positions.tolist(), "hooks": summary,
    }
    if attention_to_image:
        from haltrace.trace.attention import attention_to_image as air_fn

        try:
            air = air_fn(m, inputs)
        except ValueError as exc:
            _fail(str(exc))
        report["attention_to_image"] = {
            "layers": air.layers,
            "mean_over_heads": air.per_layer[0, -1].tolist(), "by_head": air.ratio[0, -1].tolist(),
            "uniform_baseline": float(air.baseline[0, -1])}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        meta = {k: v for k, v in report.items() if k != "hooks"} | {"shapes": {k: v["shape"] for k, v in
                                                                             summary.items()}}
        _safetensors_write(out / "activations.safetensors", dict(cap), {"haltrace": json.dumps(meta)})
        _text_write(out / "activations.json", json.dumps(meta, indent=1) + "\n")
        report["out"] = str(out)
    if as_json:
        typer.echo(json.dumps(report))
        return
    out_console = Console()
    table = Table(title=f"{m.name_or_path}: {len(report['tokens'])} tokens, positions {positions}")
    for col in ("hook", "shape", "dtype", "mean L2 norm", "max L2 norm", "max |x|"):
        table.add_column(col, justify="left" if col in ("hook", "dtype") else "right")
    for name, s in summary.items():
        table.add_row(name, str(tuple(s["shape"])), s["dtype"], f"{s['norm_mean']:.3f}", f"{s['norm_max']:.3f}",
                      f"{s['abs_max']:.3f}")
    out_console.print(table)
    if attention_to_image:
        out_console.print(_air_table(air))
    if out is not None:
        out_console.print(f"saved {len(summary)} tensors to {out / 'activations.safetensors'} (+ activations.json)")


# --- lens --------------------------------------------------------------------------------------------------

@app.command()
def lens(
    prompt: str | None = typer.Option(None, "--prompt", help="Prompt text (or use --task)."),
    task: str | None = typer.Option(None, "--task", help=f"Built-in organism task: {', '.join(TASKS)}."),
    model: str = typer.Option("shapes-llava", "--model", help=MODEL_HELP),
    image: Path | None = typer.Option(None, "--image", help="Image file for a VLM."),
    targets: str | None = typer.Option(None, "--targets", help="Comma-separated target words, e.g. red,blue "
                                                               "(scored by their first token)."),
    positions: str = typer.Option("last", "--positions", help="last, all, image, or comma-separated ints."),
    top_k: int = typer.Option(3, "--top-k", help="Top tokens to show per layer."),
    no_norm: bool = typer.Option(False, "--no-norm", help="Skip the final norm (as ProjectAway / DoLa code)."),
    n: int = typer.Option(200, "--n", help="--task: number of items."),
    batch_size: int = typer.Option(16, "--batch-size", help="--task: items per forward."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
    html: Path | None = typer.Option(None, "--html", help="Write a self-contained HTML figure here."),
    remote: bool = typer.Option(False, "--remote", help=REMOTE_HELP + " --prompt only."),
) -> None:
    """Logit lens per layer: top tokens and target ranks for a prompt, or prior-vs-pixel over an organism task."""
    from rich.console import Console
    from rich.table import Table

    if (prompt is None) == (task is None):
        _fail("give exactly one of --prompt or --task")
    _check_prompt(prompt)
    _check_out(html, "--html")
    if task is not None:
        if task not in TASKS:
            _fail(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
        if remote:
            _fail("--remote works with --prompt; the organism tasks run locally")
        _lens_task(model, n, batch_size, as_json, html, apply_norm=not no_norm)
        return
    console = _console(as_json)
    m = load_model(model, console, remote=remote)
    inputs = _inputs(m, prompt, image)
    words = _split(targets)
    from haltrace.trace.lens import logit_lens, target_token_ids

    try:
        target_token_ids(m.tokenizer, words)
        res = logit_lens(m, inputs, words, positions=_positions(positions), top_k=max(top_k, 1),
                         apply_norm=not no_norm)
    except (ValueError, RuntimeError) as exc:
        _fail(str(exc))
    tokens = _tokens(m, inputs)
    pos = res.positions[0].tolist() if res.positions is not None else list(range(len(tokens)))
    report: dict[str, Any] = {"model": model, "prompt": prompt, "layers": res.layers, "positions": pos,
                              "position_tokens": [tokens[p] for p in pos], "targets": words,
                              "target_ids": res.target_ids, "target_token_ids": res.target_token_ids,
                              "apply_norm": not no_norm, "top": [], "target_ranks": None, "target_probs": None}
    tok = m.tokenizer
    for li in range(len(res.layers)):
        report["top"].append([[(t, round(p, 6)) for t, p in res.top_tokens(tok, li, 0, pi)][:top_k]
                              for pi in range(len(pos))])
    if words:
        report["target_ranks"] = res.target_ranks[:, 0].tolist()  # [L, P, T]
        report["target_probs"] = res.target_probs[:, 0].tolist()
    if html is not None:
        _lens_html(m, inputs, res, words, tokens, pos, html, apply_norm=not no_norm)
        report["html"] = str(html)
    if as_json:
        typer.echo(json.dumps(report))
        return
    table = Table(title=f"logit lens, {m.name_or_path}, position {pos[-1]} ({tokens[pos[-1]]!r})")
    table.add_column("layer")
    table.add_column(f"top-{top_k}")
    for word in words:
        table.add_column(f"{word}: rank / p", justify="right")
    for li, name in enumerate(res.layers):
        cells = [", ".join(f"{t} {p:.2f}" for t, p in report["top"][li][-1])]
        for ti in range(len(words)):
            cells.append(f"{int(res.target_ranks[li, 0, -1, ti])} / {float(res.target_probs[li, 0, -1, ti]):.3f}")
        table.add_row(name, *cells)
    Console().print(table)
    if html is not None:
        Console().print(f"wrote {html}")


def _lens_html(m: Any, inputs: Any, res: Any, words: Sequence[str], tokens: list[str], pos: list[int],
               html: Path, apply_norm: bool) -> None:
    import torch

    from haltrace.trace.lens import logit_lens
    from haltrace.viz.figures import rank_heatmap, write_html

    if words:  # layers x targets at the last selected position
        fig = rank_heatmap(res.target_ranks[:, 0, -1], res.layers, list(words),
                           title=f"Logit lens rank of each target at position {pos[-1]} ({tokens[pos[-1]]!r})")
    else:  # layers x positions: rank of the token the model finally predicts at each position
        final = res.top_ids[-1, 0, :, 0].tolist()
        again = logit_lens(m, inputs, final, positions=res.positions, top_k=0, apply_norm=apply_norm)
        idx = torch.arange(len(pos))
        diag = again.target_ranks[:, 0, idx, idx]  # [L, P]: position p scored against its own final token
        labels = [f"{p}:{tokens[p]}" for p in pos]
        fig = rank_heatmap(diag, res.layers, labels, x_title="position",
                           title="Logit lens rank of the final prediction at each position")
    write_html(fig, html)


def _lens_task(model: str, n: int, batch_size: int, as_json: bool, html: Path | None, apply_norm: bool) -> None:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from haltrace.organism.paths import organism_folder, organism_world
    from haltrace.organism.tasks import counterfactual_colour_set
    from haltrace.trace.prior_pixel import prior_pixel_lens

    console = _console(as_json)
    try:
        folder, world = organism_folder(model), organism_world(model)
    except FileNotFoundError as exc:
        _fail(f"--task needs a ShapesWorld organism (a folder with world.json): {exc}")
    if world is None:
        _fail(f"--task needs a ShapesWorld organism (a folder with world.json); {model!r} is not one")
    if n < 1 or batch_size < 1:
        _fail("--n and --batch-size must be >= 1")
    m = load_model(str(folder), console)
    items = counterfactual_colour_set(world, n_images=n)
    with Progress(console=console, transient=True) as progress:
        bar = progress.add_task("counterfactual colour lens", total=len(items))
        try:
            stats = prior_pixel_lens(m, items, world.config.colours, batch_size=batch_size, apply_norm=apply_norm,
                                     on_batch=lambda k: progress.advance(bar, k))
        except ValueError as exc:
            _fail(str(exc))
    layers = stats["layers"]
    report = {"task": "counterfactual-color", "model": model} | stats
    if html is not None:
        from haltrace.viz.figures import prior_pixel_figure, write_html

        write_html(prior_pixel_figure(report["prior_leads_by_layer"], report["prior_mean_rank_by_layer"],
                                      report["pixel_mean_rank_by_layer"], layers, n=len(items),
                                      title="Counterfactual colours: prior vs pixel across layers"), html)
        report["html"] = str(html)
    if as_json:
        typer.echo(json.dumps(report))
        return
    table = Table(title=f"prior vs pixel colour, {len(items)} counterfactual items ({model})")
    for col in ("layer", "prior outranks pixel", "mean rank prior", "mean rank pixel", "pixel top-1"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for i, name in enumerate(layers):
        table.add_row(name, f"{report['prior_leads_by_layer'][i]:.1%}", f"{report['prior_mean_rank_by_layer'][i]:.2f}",
                      f"{report['pixel_mean_rank_by_layer'][i]:.2f}", f"{report['pixel_top1_by_layer'][i]:.1%}")
    Console().print(table)
    if html is not None:
        Console().print(f"wrote {html}")
