"""The demo's single self-contained HTML report (plotly.js inlined once) and its stage summary rows.

>>> rows = summary_rows(summary)                                   # doctest: +SKIP
>>> write_demo_report(summary, figures, "out/demo/report.html")    # doctest: +SKIP
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any


def _f(value: Any, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def summary_rows(summary: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(stage, what was measured, seconds): one line per stage, for the console table and the report."""
    st = summary["stages"]
    rows: list[tuple[str, str, str]] = []
    if "phenomena" in st:
        rep = st["phenomena"]["report"]
        fy = {s: rep["pope"][s]["false_yes_rate"] for s in ("random", "adversarial")}
        cf = rep["counterfactual_color"]
        rows.append(("phenomena", f"POPE false-yes random {fy['random']:.3f} / adversarial {fy['adversarial']:.3f}; "
                                  f"counterfactual prior {cf['prior_rate']:.3f} / pixel {cf['pixel_rate']:.3f}; "
                                  f"CHAIR_i {rep['chair']['chair_i']:.3f}", _f(st["phenomena"]["seconds"], 1)))
    if "trace" in st:
        lens = st["trace"]["lens"]["prior_leads_by_layer"]
        by = st["trace"]["attention_by_answer"]
        mean = {g: (sum(v) / len(v) if v else None) for g, v in by.items()}
        rows.append(("trace", "prior colour leads the lens: " + " -> ".join(f"{v:.2f}" for v in lens)
                     + f"; attention to image, prior answers {_f(mean.get('prior'))} vs pixel answers "
                       f"{_f(mean.get('pixel'))}", _f(st["trace"]["seconds"], 1)))
    if "probe" in st:
        parts = [f"{task}: AUROC {r['best_auroc']:.3f} at layer {r['best_layer']} (bag-of-tokens "
                 f"{_f(r['bag_of_tokens_auroc'])})" for task, r in st["probe"].items() if isinstance(r, dict)]
        rows.append(("probe", "; ".join(parts), _f(st["probe"]["seconds"], 1)))
    if "steer" in st:
        base = st["steer"]["baseline"]
        parts = []
        for name, row in st["steer"]["methods"].items():
            if "error" in row:
                parts.append(f"{name}: failed ({row['error'][:60]})")
                continue
            h = row["headline"]
            parts.append(f"{name}: adv false-yes {_f(base['pope.adversarial.false_yes_rate'])}->"
                         f"{_f(h['pope.adversarial.false_yes_rate'])}, CHAIR_i {_f(base['chair.chair_i'])}->"
                         f"{_f(h['chair.chair_i'])}, CF pixel {_f(base['counterfactual.pixel_rate'])}->"
                         f"{_f(h['counterfactual.pixel_rate'])}")
        rows.append(("steer + evaluate", "; ".join(parts), _f(st["steer"]["seconds"], 1)))
    if "export" in st:
        ex = st["export"]
        dep = ex["deploy"]
        rows.append(("export + deploy",
                     f"{ex['vector']['hook']} -> {', '.join(ex['gguf']['tensors'].values())} (GGUF); plain HF + "
                     f"haltrace.deploy: refusal on known names {dep['refusal_known_before']:.3f} -> "
                     f"{dep['refusal_known_after']:.3f}; deploy vs engine max |dlogit| "
                     f"{dep['max_abs_logit_diff_vs_engine']:.1e}", _f(ex["seconds"], 1)))
    if "explain" in st:
        ex = st["explain"]["examples"]
        rows.append(("explain", "; ".join(f"{k}: {v['answer']!r}" + (f" (hallucinated: {', '.join(v['hallucinated'])})"
                                                                   if v.get("hallucinated") else "")
                                          for k, v in ex.items()), _f(st["explain"]["seconds"], 1)))
    rows.append(("total", "", _f(summary.get("seconds"), 1)))
    return rows


def _table(header: list[str], rows: list[tuple[Any, ...]] | list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _steer_table(steer: dict[str, Any]) -> str:
    from haltrace.evals.results_table import HEADLINE

    base = steer["baseline"]
    rows = [["(baseline)"] + [_f(base.get(k)) for k, _, _ in HEADLINE]]
    for name, row in steer["methods"].items():
        if "error" in row:
            rows.append([name, f"failed: {row['error']}"] + [""] * (len(HEADLINE) - 1))
        else:
            rows.append([name] + [_f(row["headline"].get(k)) for k, _, _ in HEADLINE])
    return _table(["method"] + [label for _, label, _ in HEADLINE], rows)


def _export_section(ex: dict[str, Any]) -> str:
    dep = ex["deploy"]
    facts = [
        ("vector", f"entity-last probe mass-mean direction (known -> unknown), {ex['vector']['hook']}, "
                   f"alpha {ex['vector']['alpha']}, probe AUROC at that layer {ex['vector']['probe_auroc']:.3f}"),
        ("files", f"{ex['files']['safetensors']} (+ .json manifest), {ex['files']['gguf']}"),
        ("GGUF tensors (llama.cpp adds direction.N after block N)",
         ", ".join(f"resid_post.{k} -> {v}" for k, v in ex["gguf"]["tensors"].items())
         + f"; layer_count {ex['gguf']['layer_count']}; max |GGUF - vector x alpha| "
           f"{ex['gguf']['max_abs_diff_vs_vector']:.1e}"),
        ("refusal on known names (plain HF + haltrace.deploy)",
         f"{dep['refusal_known_before']:.3f} -> {dep['refusal_known_after']:.3f}"),
        ("refusal on unseen names (plain HF + haltrace.deploy)",
         f"{dep['refusal_unknown_before']:.3f} -> {dep['refusal_unknown_after']:.3f}"),
        ("deploy vs haltrace engine", f"max |logit difference| {dep['max_abs_logit_diff_vs_engine']:.2e}"),
    ]
    methods = [(name, "exported to GGUF" if reason is None else f"refused: {reason}")
               for name, reason in ex["method_exports"].items()]
    return (_table(["", ""], facts) + "<h3>Fitted methods through the GGUF exporter</h3>"
            + _table(["method", "result"], methods))


def write_demo_report(summary: dict[str, Any], figures: dict[str, Any], path: str | Path) -> Path:
    """Write the report atomically; plotly.js is inlined with the first figure, so the page opens offline."""
    from haltrace.trace.store import atomic_write_text

    done = {"n": 0}

    def fig(name: str) -> str:
        if name not in figures:
            return ""
        first = done["n"] == 0
        done["n"] += 1
        return figures[name].to_html(full_html=False, include_plotlyjs=first)

    st = summary["stages"]
    parts = [f"<h1>haltrace demo on {html.escape(Path(summary['folder']).name)}</h1>",
             f"<p>haltrace {html.escape(summary['haltrace'])}, torch {html.escape(summary['torch'])}, "
             f"{summary['threads']} threads; every number below was measured in this run "
             f"({summary['seconds']:.0f} s).</p>",
             _table(["stage", "measured", "seconds"], summary_rows(summary))]
    if "phenomena" in st:
        parts += ["<h2>1. The organism's hallucinations</h2>",
                  _table(["phenomenon", "metric", "measured", "built to show"], st["phenomena"]["rows"])]
    if "trace" in st:
        parts += ["<h2>2. Trace: prior vs pixels, attention to the image</h2>", fig("lens"), fig("attention"),
                  fig("attention_by_answer")]
    if "probe" in st:
        parts += ["<h2>3. Probes</h2>"]
        for task, r in st["probe"].items():
            if isinstance(r, dict):
                parts += [fig(f"probe-{task}"), f"<p>full report: {html.escape(r['report'])}</p>"]
    if "steer" in st:
        parts += ["<h2>4. Steering, evaluated before and after</h2>", fig("steer"), _steer_table(st["steer"]),
                  f"<p>full table with provenance: {html.escape(st['steer']['table'])}</p>"]
    if "export" in st:
        parts += ["<h2>5. Export and deploy</h2>", _export_section(st["export"])]
    if "explain" in st and figures.get("explain"):
        from haltrace.viz.explain_page import page_script, render_fragment

        if done["n"] == 0:  # no figure inlined plotly.js yet: the explain views need it
            from plotly.offline import get_plotlyjs

            parts.append(f"<script type='text/javascript'>{get_plotlyjs()}</script>")
        parts += ["<h2>6. Explain: three answers, token by token</h2>",
                  "<p>Each view: the image, the answer as tokens coloured by a score; click a token for its logit "
                  "lens over the image patches, its attention to the image and its curves over layers. Standalone "
                  "pages: " + ", ".join(html.escape(v["page"]) for v in st["explain"]["examples"].values()) + "</p>",
                  page_script()]
        parts += [render_fragment(d, f"demo{i}") for i, d in enumerate(figures["explain"])]
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>haltrace demo</title><style>"
            "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;"
            "margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;font-size:13px}</style>"
            "</head><body>" + "\n".join(parts) + "</body></html>\n")
    path = Path(path)
    atomic_write_text(path, page)
    path.chmod(0o644)
    return path
