"""Self-contained HTML report of a probe sweep: AUROC (and accuracy) per layer, probe vs baselines.

The page embeds plotly.js, so it opens offline. For the ``prior-vs-pixel`` task the AUROC curve is the
per-layer answer to "where does the model's choice of prior over pixels become linearly readable".

It belongs to the probes layer (:func:`haltrace.probes.artifacts.run_probe` writes it with every sweep); the
viz package above it holds the figures of the other commands.

>>> from haltrace.probes.artifacts import run_probe
>>> from haltrace.probes.datasets import load_jsonl
>>> rows = [{"prompt": f"is there a {c} {s} ?", "label": c} for c in ("red", "blue")
...         for s in ("circle", "square", "star", "cup", "plate", "fork")]
>>> _ = Path("data.jsonl").write_text("".join(json.dumps(r) + "\\n" for r in rows))
>>> _ = run_probe(model, load_jsonl("data.jsonl"), out="out", n_folds=2, inner_folds=2)   # tiny model
>>> write_probe_report(json.loads(Path("out/probes.json").read_text()), "out/report.html")
PosixPath('out/report.html')
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any


def _figure(manifest: dict[str, Any], metric: str) -> Any:
    import plotly.graph_objects as go

    layers = manifest["layers"]
    per = manifest["metrics"]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=layers, y=[per[str(x)]["logreg"][metric] for x in layers], mode="lines+markers",
                             name="logistic probe (nested CV)"))
    fig.add_trace(go.Scatter(x=layers, y=[per[str(x)]["mass_mean"][metric] for x in layers], mode="lines+markers",
                             name="mass-mean probe", line={"dash": "dot"}))
    for name, style in (("bag_of_tokens", "dash"), ("majority", "dashdot")):
        value = manifest["baselines"].get(name, {}).get(metric)
        if value is not None:
            fig.add_trace(go.Scatter(x=layers, y=[value] * len(layers), mode="lines", line={"dash": style},
                                     name=f"{name.replace('_', '-')} baseline"))
    title = {"auroc": "held-out AUROC", "accuracy": "held-out accuracy"}[metric]
    if manifest.get("task") == "prior-vs-pixel" and metric == "auroc":
        title += ": prior vs pixel answer, per layer"
    fig.update_layout(title=f"{title} per layer ({manifest['hook']}.i, {manifest['task']})",
                      xaxis_title=f"layer i ({manifest['hook']}.i)", yaxis_title=metric.upper(),
                      yaxis_range=[0.0 if metric == "auroc" else 0.0, 1.02], template="plotly_white",
                      height=420, legend={"orientation": "h", "y": -0.25})
    fig.update_xaxes(tickmode="array", tickvals=layers)
    return fig


def _table(manifest: dict[str, Any]) -> str:
    rows = []
    for x in manifest["layers"]:
        m = manifest["metrics"][str(x)]
        rows.append(f"<tr><td>{x}</td><td>{m['logreg']['auroc']:.3f}</td><td>{m['logreg']['accuracy']:.3f}</td>"
                    f"<td>{m['logreg']['C']:g}</td><td>{m['mass_mean']['auroc']:.3f}</td>"
                    f"<td>{m['mass_mean']['accuracy']:.3f}</td></tr>")
    return ("<table><tr><th>layer</th><th>probe AUROC</th><th>probe acc.</th><th>C</th><th>mass-mean AUROC</th>"
            "<th>mass-mean acc.</th></tr>" + "".join(rows) + "</table>")


def write_probe_report(manifest: dict[str, Any], path: str | Path) -> Path:
    """Write the report for a probe manifest (the ``probes.json`` written by ``haltrace probe``)."""
    from haltrace.trace.store import atomic_write_text

    figs = [_figure(manifest, "auroc"), _figure(manifest, "accuracy")]
    divs = [fig.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, fig in enumerate(figs)]
    base = manifest["baselines"]
    facts = {
        "model": manifest["model"], "task": manifest["task"], "source": manifest["source"],
        "examples": f"{manifest['n']} ({', '.join(f'{k}: {v}' for k, v in manifest['counts'].items())}), "
                    f"{manifest['n_groups']} groups",
        "position": manifest["position_rule"],
        "best layer": f"{manifest['best_layer']} (AUROC {manifest['best_auroc']:.3f})",
        "bag-of-tokens baseline": f"AUROC {base['bag_of_tokens']['auroc']:.3f}" if base.get("bag_of_tokens")
        else "n/a",
        "majority baseline": f"accuracy {base['majority']['accuracy']:.3f}",
        "shuffled-label control": (f"AUROC {base['shuffled_labels']['auroc']:.3f} at layer "
                                   f"{base['shuffled_labels']['layer']}") if base.get("shuffled_labels") else "n/a",
        "protocol": manifest["protocol"], "layer convention": manifest["layer_convention"],
    }
    info = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts.items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>haltrace probe: {html.escape(manifest['task'])}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}} table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left;font-size:13px}}</style></head><body>
<h1>Probe sweep: {html.escape(manifest['task'])}</h1><table>{info}</table>
{divs[0]}{divs[1]}<h2>Per layer</h2>{_table(manifest)}
<details><summary>manifest</summary><pre>{html.escape(json.dumps(manifest, indent=1))}</pre></details>
</body></html>"""
    atomic_write_text(path, page)
    Path(path).chmod(0o644)  # atomic temp files are created 0600; a report is meant to be opened by others
    return Path(path)
