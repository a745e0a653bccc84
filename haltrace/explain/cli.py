"""``haltrace explain``: one image, one prompt, one answer, explained token by token in one HTML page.

Example::

    haltrace explain --model shapes-llava --image sets/images/caption_0000.png --prompt "caption :" \\
        --truth plate --out out/explain.html
    haltrace explain --model shapes-llava --image img.png --prompt "caption :" --from runs/pvp --out page.html --json
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(add_completion=False)


@app.command("explain")
def explain_cmd(
    model: str = typer.Option(..., "--model", help="Hub id, local folder or organism name (loaded with eager "
                                                    "attention: the attention maps need it)."),
    out: Path = typer.Option(..., "--out", help="The HTML page to write (self-contained, opens offline)."),
    image: Path = typer.Option(None, "--image", help="The image (omit for a text-only prompt)."),
    prompt: str = typer.Option("describe the image", "--prompt",
                               help="A plain question (the model's chat template wraps it) or a full prompt holding "
                                    "the image placeholder."),
    detector: Path = typer.Option(None, "--detector", help="A fitted TruthPrInt folder (`haltrace steer --method "
                                                           "truthprint --out DIR`): its p(hallucinated) per token."),
    probe: Path = typer.Option(None, "--probe", help="A probe / steering vector file: its projection per token."),
    probe_layer: int = typer.Option(None, "--probe-layer", help="Layer of the probe vector (default: best AUROC)."),
    truth: str = typer.Option(None, "--truth", help="Comma-separated objects really in the image: object words are "
                                                    "then checked with CHAIR's rules and marked."),
    chair_table: Path = typer.Option(None, "--chair-synonyms", help="CHAIR synonyms.txt (default: the organism's "
                                                                    "kinds for an organism, COCO's otherwise)."),
    method: str = typer.Option(None, "--method", help="Fit this steering method now and explain the steered answer "
                                                      "next to the plain one."),
    from_dir: Path = typer.Option(None, "--from", help="A saved fitted intervention (`haltrace steer --out DIR`) "
                                                       "to compare against."),
    competitor: str = typer.Option(None, "--competitor", help="A word whose lens rank is drawn next to each "
                                                              "token's (default: the runner-up at the last layer)."),
    layer: int = typer.Option(None, "--layer", help="The layer the page opens on."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens"),
    as_json: bool = typer.Option(False, "--json", help="Print every number of the page as one JSON object."),
) -> None:
    """Explain one answer token by token: lens maps over the image, attention, scores, CHAIR marks."""
    from haltrace.explain import explain

    if method is not None and from_dir is not None:
        raise typer.BadParameter("pass --method or --from, not both", param_hint="--method/--from")
    if image is not None and not image.is_file():
        raise typer.BadParameter(f"{image} is not a file", param_hint="--image")
    try:
        ex = explain(model, image, prompt, detector=detector, probe=probe, probe_layer=probe_layer, truth=truth,
                     method=method, fitted=from_dir, max_new_tokens=max_new_tokens, competitor=competitor,
                     chair_table=chair_table, layer=layer)
    except (ValueError, FileNotFoundError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    path = ex.save(out)
    if as_json:
        typer.echo(json.dumps({"page": str(path), **{k: v for k, v in ex.data.items() if k != "image"}},
                              allow_nan=False))
        return
    for answer in ex.answers:
        marks = [f"{m['word']} ({m['verdict']})" for m in answer["mentions"] if m.get("verdict")]
        typer.echo(f"{answer['label']}: {answer['text']}" + (f"   [{', '.join(marks)}]" if marks else ""))
    typer.echo(f"page: {path}  ({ex.data['seconds']:.2f} s)")
