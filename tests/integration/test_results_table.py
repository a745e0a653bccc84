"""``haltrace steer --method all``: every registered method gets a row; a method that fails is listed with its
error. Real methods are replaced by two test methods so the test stays fast and independent of them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from haltrace.cli import app
from haltrace.steering import registry
from haltrace.steering.engine import Add
from haltrace.steering.registry import FittedIntervention, Method


class _Works(Method):
    name = "works-test"

    def fit(self, model, data=None, **kw):
        vec = torch.zeros(model.hidden_size)
        vec[1] = 4.0
        return FittedIntervention(self.name, [Add("resid_post.0", vec, positions="last")], {"why": "test"})


class _Breaks(Method):
    name = "breaks-test"

    def fit(self, model, data=None, **kw):
        raise RuntimeError("no contrast pairs for this organism")


@pytest.fixture()
def only_test_methods(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", {"works-test": _Works, "breaks-test": _Breaks})
    monkeypatch.setattr(registry, "_load_all", lambda: None)


@pytest.mark.slow
def test_results_table_all_methods(organism_folder, only_test_methods, tmp_path):
    out = tmp_path / "results" / "organism.md"
    res = CliRunner().invoke(app, ["steer", "--method", "all", "--model", organism_folder, "--eval",
                                   "pope,chair,counterfactual,refusal", "--results", str(out),
                                   "--out", str(tmp_path / "saved")])
    assert res.exit_code == 0, res.output
    text = out.read_text()
    assert "| works-test |" in text and "| (baseline) |" in text and "→" in text
    assert "breaks-test" in text and "no contrast pairs for this organism" in text
    assert "- command: `" in text and "- date: " in text and organism_folder in text
    data = json.loads(out.with_suffix(".json").read_text())
    (section, data), = data["sections"].items()  # one section per organism and preset
    assert section == f"{Path(organism_folder).name}, haltrace settings"
    rows = {r["method"]: r for r in data["methods"]}
    assert set(rows) == {"works-test", "breaks-test"} and "error" in rows["breaks-test"]
    head = rows["works-test"]["headline"]
    assert {"pope.adversarial.false_yes_rate", "chair.chair_i", "chair.mean_length",
            "counterfactual.prior_to_pixel", "refusal.refusal_unknown"} <= set(head)
    assert (tmp_path / "saved" / "works-test" / "intervention.safetensors").exists()
    assert not (tmp_path / "saved" / "breaks-test").exists()
