"""Probe margins on the shipped organism (issue "Directions"): entity recognition, hallucinated object tokens,
and the prior-vs-pixel curve, each against its confound baseline."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model():
    import haltrace

    return haltrace.load("shapes-llava")


def _sweep(model, task, out):
    from haltrace.probes.artifacts import run_probe
    from haltrace.probes.datasets import build_task

    return run_probe(model, build_task(task, model), out=out)


def test_entity_probe_at_the_decision_point_beats_its_baseline(model, tmp_path):
    manifest = _sweep(model, "entity-last", tmp_path / "entity-last")
    bag = manifest["baselines"]["bag_of_tokens"]["auroc"]
    print(f"entity-last: best AUROC {manifest['best_auroc']:.3f} at layer {manifest['best_layer']}, "
          f"bag-of-tokens {bag:.3f}")
    assert manifest["best_auroc"] >= 0.9
    assert manifest["best_auroc"] > bag + 0.1


def test_hallucination_token_probe_beats_question_only_baseline(model, tmp_path):
    manifest = _sweep(model, "hallucination", tmp_path / "hallucination")
    bag = manifest["baselines"]["bag_of_tokens"]["auroc"]
    print(f"hallucination: best AUROC {manifest['best_auroc']:.3f} at layer {manifest['best_layer']}, "
          f"question-only (bag-of-tokens) {bag:.3f}")
    assert manifest["best_auroc"] - bag >= 0.05


def test_prior_vs_pixel_curve_is_in_the_report(model, tmp_path):
    manifest = _sweep(model, "prior-vs-pixel", tmp_path / "pvp")
    assert manifest["layers"] == list(range(model.n_layers))
    assert all(0.0 <= manifest["metrics"][str(x)]["logreg"]["auroc"] <= 1.0 for x in manifest["layers"])
    page = (tmp_path / "pvp" / "report.html").read_text()
    assert "prior vs pixel answer, per layer" in page
