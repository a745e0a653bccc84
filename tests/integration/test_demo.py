"""``haltrace demo`` end to end on the shipped organism, trimmed (one cheap method, fewer lens items)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from haltrace.demo_cli import app


@pytest.mark.slow
def test_demo_writes_report_summary_and_exports(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["--out", str(out), "--methods", "caa", "--n-lens", "24",
                                     "--probes", "entity-last"])
    assert result.exit_code == 0, result.output
    assert "haltrace demo" in result.output and "export + deploy" in result.output
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["stages"]) == {"phenomena", "trace", "probe", "steer", "export", "explain"}
    page = (out / "report.html").read_text()
    assert page.count("plotly.js v") == 1 and "<script src=" not in page  # plotly.js inlined once, no CDN
    assert "5. Export and deploy" in page
    ex = summary["stages"]["export"]
    layer = ex["vector"]["layer"]
    assert layer >= 1 and ex["gguf"]["tensors"] == {str(layer): f"direction.{layer}"}
    assert ex["gguf"]["max_abs_diff_vs_vector"] == 0.0
    assert ex["deploy"]["max_abs_logit_diff_vs_engine"] <= 1e-5
    assert (out / "export" / "entity-unknown.gguf").is_file()
    assert ex["method_exports"]["caa"] is not None  # CAA steers the last token only: GGUF must refuse it
    assert summary["stages"]["steer"]["methods"]["caa"].get("headline")
    # 6. three answers explained token by token, inside the report and as pages of their own
    explained = summary["stages"]["explain"]["examples"]
    assert set(explained) == {"counterfactual", "caption", "entity"}
    assert explained["caption"]["hallucinated"]  # the caption names the absent partner
    assert all((out / "explain" / f"{k}.html").is_file() for k in explained)
    assert "6. Explain" in page and page.count('class="hx"') == 3
    assert page.count("window.haltraceExplain = window.haltraceExplain") == 1


def test_demo_rejects_unknown_method(tmp_path):
    result = CliRunner().invoke(app, ["--out", str(tmp_path), "--methods", "nope"])
    assert result.exit_code != 0 and "registered" in result.output
