"""``haltrace demo``: the whole pipeline on the shipped organism, trace -> probe -> steer -> evaluate -> export.

One command, one folder, one HTML report. Every number in it is measured in this run:

1. **phenomena**: the organism's planted hallucinations (POPE, counterfactual colours, CHAIR, entities);
2. **trace**: logit lens of prior vs pixel colour per layer, and attention to image tokens at the answer
   position, split by whether the model answered with the prior or with the pixels;
3. **probe**: per-layer linear probes for entity recognition (known vs unknown names) and for hallucinated
   object words in captions, against their confound baselines;
4. **steer + evaluate**: chosen steering methods fitted and evaluated before/after on the held-out sets;
5. **export**: the "unknown entity" direction exported as a haltrace vector and a llama.cpp GGUF control
   vector, read back, and applied to the *plain* HF model with :mod:`haltrace.deploy` (refusal rates, and
   agreement with haltrace's engine). A method that GGUF cannot express is refused, and the reason is shown.
6. **explain**: three organism answers explained token by token with :func:`haltrace.explain` (a counterfactual
   colour, a caption naming the absent partner, an unknown entity), each scored by the fitted TruthPrInt
   detector (when it was among the methods) and the hallucination probe, one page each under ``explain/`` and
   the same views inside the report.

>>> from haltrace.demo import run_demo
>>> summary = run_demo("out/demo")          # doctest: +SKIP
>>> summary["stages"]["export"]["deploy"]["refusal_known_after"]   # doctest: +SKIP
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# torch is imported inside the functions: `haltrace demo --help` reads the defaults below without loading it
DEFAULT_METHODS: tuple[str, ...] = ("pvp", "truthprint", "vti", "erasure")
EVALS: tuple[str, ...] = ("pope", "chair", "counterfactual", "refusal")
PROBE_TASKS: tuple[str, ...] = ("entity-last", "hallucination")
EXPORT_ALPHA = 1.0  # one class-mean difference: the vector's natural unit, not tuned on the evaluation set


def run_demo(out: str | Path, *, model: str = "shapes-llava", methods: Sequence[str] = DEFAULT_METHODS,
             n_lens: int = 200, probe_tasks: Sequence[str] = PROBE_TASKS,
             on_stage: Callable[[str], None] | None = None, show_tables: bool = True) -> dict[str, Any]:
    """Run every stage, write ``out/report.html`` (+ ``summary.json`` and each stage's artifacts); returns the
    summary dict. ``on_stage(name)`` is called as each stage starts (progress display). The export stage
    ships the ``entity-last`` probe's direction, so ``probe_tasks`` must include it."""
    if "entity-last" not in probe_tasks:
        raise ValueError(f"probe_tasks {list(probe_tasks)} must include 'entity-last': the export stage ships its "
                         "direction")
    import torch

    import haltrace
    from haltrace.organism.paths import organism_folder, organism_world

    folder, world = organism_folder(model), organism_world(model)
    if world is None:  # the demo needs an organism: its held-out sets are the evaluation data
        raise FileNotFoundError(f"{model} is not a ShapesWorld organism folder (no world.json); the demo runs on "
                                "the organism (--model shapes-llava or a folder from `haltrace organism train`)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    notify = on_stage or (lambda _name: None)
    started = time.perf_counter()
    m = haltrace.load(str(folder))
    eager = haltrace.load(str(folder), attn_implementation="eager")  # attention weights for attention-to-image
    stages: dict[str, dict[str, Any]] = {}
    figures: dict[str, Any] = {}

    def timed(name: str, fn: Callable[[], dict[str, Any]]) -> None:
        notify(name)
        t0 = time.perf_counter()
        stages[name] = fn()
        stages[name]["seconds"] = time.perf_counter() - t0

    timed("phenomena", lambda: _phenomena(m, world, show_tables))
    timed("trace", lambda: _trace(m, eager, world, n_lens, figures))
    timed("probe", lambda: _probe(m, out, probe_tasks, figures))
    timed("steer", lambda: _steer(m, out, methods, figures))
    timed("export", lambda: _export(m, folder, world, out, stages))
    timed("explain", lambda: _explain_examples(eager, world, out, figures))
    summary = {"model": str(model), "folder": str(folder), "out": str(out), "stages": stages,
               "seconds": time.perf_counter() - started, "torch": torch.__version__,
               "threads": torch.get_num_threads(), "haltrace": haltrace.__version__}
    from haltrace.trace.store import atomic_write_text
    from haltrace.viz.demo_report import write_demo_report

    summary["report"] = str(write_demo_report(summary, figures, out / "report.html"))
    atomic_write_text(out / "summary.json", json.dumps(jsonable(summary), indent=1, allow_nan=False) + "\n")
    (out / "summary.json").chmod(0o644)
    return summary


# ------------------------------------------------------------------------------------------------- stages
def _phenomena(m: Any, world: Any, show: bool) -> dict[str, Any]:
    from haltrace.organism.card import phenomena_rows, print_phenomena_table
    from haltrace.organism.phenomena import measure_phenomena

    report = measure_phenomena(m.hf, world)
    if show:
        print_phenomena_table(report)
    return {"report": report, "rows": phenomena_rows(report)}


def _trace(m: Any, eager: Any, world: Any, n: int, figures: dict[str, Any]) -> dict[str, Any]:
    import torch
    from PIL import Image

    from haltrace.organism.phenomena import OrganismRunner
    from haltrace.organism.tasks import counterfactual_colour_set
    from haltrace.trace.attention import attention_to_image
    from haltrace.trace.prior_pixel import prior_pixel_lens
    from haltrace.viz.figures import image_attention_heatmap, prior_pixel_figure

    items = counterfactual_colour_set(world, n_images=n)
    lens = prior_pixel_lens(m, items, world.config.colours, batch_size=32)
    answers = OrganismRunner(m.hf, world).answers(items)
    ratios = []
    for start in range(0, len(items), 32):
        batch = items[start:start + 32]
        inputs = eager.prepare([ex.full_prompt for ex in batch], images=[Image.fromarray(ex.image) for ex in batch])
        ratios.append(attention_to_image(eager, inputs).ratio[:, 0])  # [B, layers, heads] at the last token
    air = torch.cat(ratios).float()
    groups = {"prior": [a == ex.meta["prior"] for ex, a in zip(items, answers, strict=True)],
              "pixel": [a == ex.meta["pixel"] for ex, a in zip(items, answers, strict=True)]}
    by_answer = {g: (air[torch.tensor(mask)].mean((0, 2)).tolist() if any(mask) else None)
                 for g, mask in groups.items()}
    layers = lens["layers"]
    figures["lens"] = prior_pixel_figure(lens["prior_leads_by_layer"], lens["prior_mean_rank_by_layer"],
                                         lens["pixel_mean_rank_by_layer"], layers, n=len(items),
                                         title="Counterfactual colours: prior vs pixel colour across layers")
    figures["attention"] = image_attention_heatmap(
        air.mean(0), [f"layer {i}" for i in range(air.shape[1])],
        title=f"Attention to image tokens at the answer position (mean over {len(items)} counterfactual items)")
    figures["attention_by_answer"] = _lines({f"answered with the {g} colour (n={sum(groups[g])})": v
                                             for g, v in by_answer.items() if v is not None},
                                            "Attention to image per layer (mean over heads) by the answer given",
                                            "share of attention on image tokens")
    return {"lens": lens, "attention_mean_by_layer": air.mean((0, 2)).tolist(),
            "attention_by_answer": by_answer, "answer_counts": {g: int(sum(v)) for g, v in groups.items()}}


def _probe(m: Any, out: Path, probe_tasks: Sequence[str], figures: dict[str, Any]) -> dict[str, Any]:
    from haltrace.probes.artifacts import run_probe
    from haltrace.probes.datasets import build_task
    from haltrace.probes.report import _figure as probe_figure

    results = {}
    for task in probe_tasks:
        manifest = run_probe(m, build_task(task, m), out=out / f"probe-{task}", overwrite=True)
        figures[f"probe-{task}"] = probe_figure(manifest, "auroc")
        base = manifest["baselines"].get("bag_of_tokens") or {}
        results[task] = {"best_layer": manifest["best_layer"], "best_auroc": manifest["best_auroc"],
                         "bag_of_tokens_auroc": base.get("auroc"), "n": manifest["n"],
                         "auroc_by_layer": [manifest["metrics"][str(x)]["logreg"]["auroc"] for x in manifest["layers"]],
                         "report": str(out / f"probe-{task}" / "report.html")}
    return results


def _steer(m: Any, out: Path, methods: Sequence[str], figures: dict[str, Any]) -> dict[str, Any]:
    from haltrace.evals.results_table import headline, results_json, run_methods, write_results
    from haltrace.steering.results import save_fitted

    run = run_methods(m, EVALS, list(methods))
    write_results(out / "steering.md", run, command="haltrace demo")
    for row in run["rows"]:
        if "fitted" in row:
            save_fitted(row["fitted"], out / "interventions" / row["method"], extra={"model": str(m.name_or_path)})
    figures["steer"] = _steer_figure(headline(run["before"]), run["rows"])
    summary = results_json(run)
    return {"baseline": summary["baseline"]["headline"], "methods": {r["method"]: r for r in summary["methods"]},
            "table": str(out / "steering.md")}


def _export(m: Any, folder: Path, world: Any, out: Path, stages: dict[str, Any]) -> dict[str, Any]:
    from transformers import AutoModelForImageTextToText

    from haltrace import deploy
    from haltrace.export.convert import ExportError
    from haltrace.export.formats import export
    from haltrace.export.gguf import read_gguf
    from haltrace.organism.phenomena import OrganismRunner
    from haltrace.organism.tasks import entity_sets
    from haltrace.steering import Add, steer
    from haltrace.steering.vector import SteeringVector

    # the entity probe's mass-mean direction (known -> unknown) at its best layer that llama.cpp can hold (>= 1)
    probe = stages["probe"]["entity-last"]
    source = SteeringVector.load(out / "probe-entity-last" / "vectors" / "mass_mean")
    auroc = probe["auroc_by_layer"]
    layer = max(range(1, len(auroc)), key=lambda i: auroc[i])
    vec = SteeringVector(direction=source.for_layer(layer), layers=[layer], hidden_size=source.hidden_size,
                         hook="resid_post", alpha=EXPORT_ALPHA, positions="all", phase="both", method="mass_mean",
                         model=source.model, n_layers=m.n_layers,
                         provenance={"from": "haltrace demo: entity-last probe, mass-mean (known -> unknown)",
                                     "probe_auroc": auroc[layer], **{k: v for k, v in source.provenance.items()
                                                                     if isinstance(v, (str, int, float))}})
    exported = export(vec, out / "export" / "entity-unknown", format="safetensors")
    gguf_result = export(vec, out / "export" / "entity-unknown.gguf", format="gguf", model_hint=Path(str(folder)).name)
    control = read_gguf(gguf_result.path)
    gguf_max_diff = max(float((control.directions[x] - vec.for_layer(x) * vec.alpha).abs().max()) for x in vec.layers)

    # deployment: the plain HF model, no haltrace in the forward pass, only haltrace.deploy's hooks
    plain = AutoModelForImageTextToText.from_pretrained(folder).eval()
    runner = OrganismRunner(plain, world)
    sets = entity_sets(world)

    def refusal(group: str) -> float:
        answers = runner.answers(sets[group])
        return sum(a == "unknown" for a in answers) / len(answers)

    before = {"known": refusal("known"), "unknown_heldout": refusal("unknown_heldout")}
    with deploy.steered(plain, exported.path):
        after = {"known": refusal("known"), "unknown_heldout": refusal("unknown_heldout")}
        deployed_logits, _ = runner.last_position(sets["known"][:32])
    with steer(m, Add(f"resid_post.{layer}", vec.for_layer(layer), alpha=vec.alpha)):
        engine_logits, _ = OrganismRunner(m.hf, world).last_position(sets["known"][:32])
    # each fitted method through the GGUF exporter: a plain add exports, anything else is refused with the reason
    refused: dict[str, str | None] = {}
    for name in stages["steer"]["methods"]:
        fitted_dir = out / "interventions" / name
        if not fitted_dir.is_dir():
            continue
        try:
            export(fitted_dir, out / "export" / f"{name}.gguf", format="gguf", model_hint=Path(str(folder)).name)
            refused[name] = None
        except ExportError as err:
            refused[name] = str(err)
    return {
        "vector": {"layer": layer, "hook": f"resid_post.{layer}", "alpha": vec.alpha, "probe_auroc": auroc[layer],
                   "norm": float(vec.for_layer(layer).norm())},
        "files": {"safetensors": str(exported.path), "gguf": str(gguf_result.path)},
        "gguf": {"tensors": {str(k): v for k, v in control.tensor_names.items()}, "layer_count": control.layer_count,
                 "model_hint": control.model_hint, "max_abs_diff_vs_vector": gguf_max_diff},
        "deploy": {"refusal_known_before": before["known"], "refusal_known_after": after["known"],
                   "refusal_unknown_before": before["unknown_heldout"],
                   "refusal_unknown_after": after["unknown_heldout"],
                   "max_abs_logit_diff_vs_engine": float((deployed_logits - engine_logits).abs().max())},
        "method_exports": refused,
    }


def _explain_examples(eager: Any, world: Any, out: Path, figures: dict[str, Any]) -> dict[str, Any]:
    """Three answers explained token by token: a counterfactual colour (the prior's competitor: the pixel
    colour), a caption naming the absent partner (with the image's ground truth), an unknown entity (text only,
    competitor: the refusal word). Picks the first held-out item where the organism shows the phenomenon."""
    import haltrace
    from haltrace.organism import tasks
    from haltrace.organism.phenomena import OrganismRunner
    from haltrace.organism.world import REFUSAL_WORD

    runner = OrganismRunner(eager.hf, world)
    detector = out / "interventions" / "truthprint"
    detector = detector if (detector / "intervention.json").is_file() else None
    probe = out / "probe-hallucination" / "vectors" / "mass_mean"
    probe = probe if probe.with_suffix(".safetensors").is_file() else None
    scores = {"detector": detector, "probe": probe}

    cf = tasks.counterfactual_colour_set(world)[:40]
    cf_answers = runner.answers(cf)
    colour = next((ex for ex, a in zip(cf, cf_answers, strict=True) if a == ex.meta["prior"]), cf[0])
    caps = tasks.caption_set(world)[:40]
    captions = runner.captions(caps)
    caption = next((ex for ex, c in zip(caps, captions, strict=True) if ex.meta["absent_partner"] in c.split()),
                   caps[0])
    unknown = tasks.entity_sets(world)["unknown_heldout"][:40]
    unknown_answers = runner.answers(unknown)
    entity = next((ex for ex, a in zip(unknown, unknown_answers, strict=True) if a != REFUSAL_WORD), unknown[0])
    cases = [
        ("counterfactual", f"A counterfactual colour: a {colour.meta['pixel']} {colour.meta['kind']} (prior colour "
                           f"{colour.meta['prior']})",
         dict(image=colour.image, prompt=tasks.plain_question(colour.prompt), competitor=colour.meta["pixel"])),
        ("caption", f"A caption naming the absent partner ({caption.meta['absent_partner']}); in the image: "
                    f"{', '.join(sorted(caption.scene.kinds))}",
         dict(image=caption.image, prompt=caption.prompt, truth=sorted(caption.scene.kinds))),
        ("entity", f"An unknown entity, never seen in training: {entity.meta['name']} (text only)",
         dict(image=None, prompt=tasks.plain_question(entity.prompt), competitor=REFUSAL_WORD)),
    ]
    rows, datas = {}, []
    for key, title, kw in cases:
        ex = haltrace.explain(eager, kw.pop("image"), kw.pop("prompt"), title=title, **scores, **kw)
        page = ex.save(out / "explain" / f"{key}.html")
        datas.append(ex.data)
        rows[key] = {"title": title, "answer": ex.answer, "page": str(page), "seconds": ex.data["seconds"],
                     "hallucinated": (ex.answers[0]["chair"] or {}).get("hallucinated"),
                     "scores": sorted(ex.data["scores"])}
    figures["explain"] = datas
    return {"examples": rows, "detector": str(detector) if detector else None,
            "probe": str(probe) if probe else None}


# ------------------------------------------------------------------------------------------------ helpers
def _lines(series: dict[str, list[float]], title: str, y_title: str) -> Any:
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, values in series.items():
        fig.add_trace(go.Scatter(x=[f"layer {i}" for i in range(len(values))], y=values, mode="lines+markers",
                                 name=name))
    fig.update_layout(title=title, yaxis_title=y_title, template="plotly_white", height=380)
    return fig


def _steer_figure(base: dict[str, float | None], rows: list[dict[str, Any]]) -> Any:
    import plotly.graph_objects as go

    from haltrace.evals.results_table import headline

    keys = [("pope.adversarial.false_yes_rate", "POPE adv false-yes"), ("pope.adversarial.recall", "POPE adv recall"),
            ("chair.chair_i", "CHAIR_i"), ("counterfactual.pixel_rate", "CF pixel rate")]
    fig = go.Figure()
    fig.add_trace(go.Bar(name="baseline", x=[label for _, label in keys], y=[base.get(k) for k, _ in keys]))
    for row in rows:
        if "after" in row:
            after = headline(row["after"], row.get("flips") or {})
            fig.add_trace(go.Bar(name=row["method"], x=[label for _, label in keys], y=[after.get(k) for k, _ in keys]))
    fig.update_layout(barmode="group", title="Steering: headline metrics before (baseline) and after each method",
                      template="plotly_white", height=420, yaxis_range=[0, 1])
    return fig


def jsonable(value: Any) -> Any:
    """JSON-ready copy: tuples and tensors become lists, NaN becomes null."""
    import torch

    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, float) and value != value:  # NaN is not JSON
        return None
    return value

