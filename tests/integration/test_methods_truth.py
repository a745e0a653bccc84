"""TruthPrInt, VHR, ITI, CAA and DoLa on the shipped organism: measured before/after numbers.

Only TruthPrInt's yes/no variant carries an acceptance margin (POPE adversarial false-yes rate down >= 20%
relative, recall on present objects down <= 5 points); that figure is in-distribution (its fit questions come from
POPE's question generator and its selection optimises the evaluated rate). TruthPrInt's caption variant (the
paper's method, the default) and the other methods are recorded (printed with ``-s`` and attached as junit
properties) and checked only for having run and produced numbers. Each fit + evaluation runs once per module.
"""

from __future__ import annotations

import json
import math

import pytest

from haltrace.steering.registry import get_method

EVALS = ["pope", "chair"]


@pytest.fixture(scope="module")
def model():
    import haltrace

    try:
        return haltrace.load("shapes-llava")
    except FileNotFoundError as exc:  # the checkpoint is an artifact, not part of every checkout
        pytest.skip(f"shipped organism not available: {exc}")


@pytest.fixture(scope="module")
def baseline(model):
    from haltrace.evals.suite import evaluate

    return evaluate(model, EVALS)


@pytest.fixture(scope="module")
def results(model):
    """name -> (fitted, evaluation under it); filled lazily so each method is fitted and evaluated once."""
    from haltrace.evals.suite import evaluate

    cache: dict[tuple, tuple] = {}

    def get(name: str, **kw):
        key = (name, tuple(sorted(kw.items())))
        if key not in cache:
            fitted = get_method(name).fit(model, **kw)
            cache[key] = (fitted, evaluate(model, EVALS, fitted=fitted))
        return cache[key]

    return get


def summary(report: dict) -> dict[str, float]:
    adv, chair = report["pope"]["adversarial"], report["chair"]
    return {"adv_false_yes": adv["false_yes_rate"], "adv_recall": adv["recall"], "adv_f1": adv["f1"],
            "random_false_yes": report["pope"]["random"]["false_yes_rate"],
            "chair_i": chair["chair_i"], "chair_s": chair["chair_s"], "chair_recall": chair["recall"],
            "caption_length": chair["mean_length"]}


def record(record_property, name: str, before: dict, after: dict, fitted) -> dict:
    b, a = summary(before), summary(after)
    for key in b:
        assert math.isfinite(b[key]) and math.isfinite(a[key]), f"{name}: {key} is not a number"
    line = {"method": name, "before": b, "after": a, "fingerprint": fitted.provenance.get("fingerprint")}
    record_property(name, json.dumps(line))
    print(f"\n[{name}] " + json.dumps(line))
    return line


def check_provenance(fitted, name: str) -> None:
    prov = fitted.provenance
    assert prov["method"] == name and prov["paper"] and prov["fingerprint"]
    assert {"positions", "phase", "data"} <= set(prov), sorted(prov)


def test_truthprint_yesno_cuts_adversarial_false_yes(model, baseline, results, record_property):
    """In-distribution: the yes/no variant's fit questions come from POPE's own question generator."""
    from haltrace.steering.truthprint import gate_of

    fitted, after = results("truthprint", variant="yesno")
    check_provenance(fitted, "truthprint")
    prov = fitted.provenance
    assert prov["variant"] == "yesno" and "in-distribution" in prov["in_distribution"]
    assert prov["layer"]["haltrace"].startswith("resid_post.") and 0.0 <= prov["threshold"] <= 1.0
    line = record(record_property, "truthprint-yesno", baseline, after, fitted)
    b, a = line["before"], line["after"]
    stats = gate_of(fitted).detector.stats
    print(f"[truthprint-yesno] gate {stats}, layer {prov['layer']['haltrace']}, "
          f"threshold {prov['threshold']}, alpha {prov['alpha']}")
    assert b["adv_false_yes"] > 0, "the organism shows no adversarial false yes: nothing to reduce"
    assert a["adv_false_yes"] <= 0.8 * b["adv_false_yes"], (b, a)  # >= 20% relative reduction
    assert b["adv_recall"] - a["adv_recall"] <= 0.05, (b, a)  # recall down by at most 5 points
    # the gate ran and is gone afterwards
    assert stats["fired"] > 0
    assert all(not layer._forward_hooks for layer in model.adapter.layers)


@pytest.mark.parametrize("preset", [None, "paper"])
def test_truthprint_caption_recorded(model, baseline, results, record_property, preset):
    """The paper's caption-token method: recorded, not held to a margin (CHAIR is the held-out caption set)."""
    from haltrace.steering.truthprint import gate_of

    fitted, after = results("truthprint", **({"preset": preset} if preset else {}))
    check_provenance(fitted, "truthprint")
    prov = fitted.provenance
    assert prov["variant"] == "caption" and prov["preset"] == preset and prov["deviations"]
    assert 0.0 <= prov["detector"]["val_auroc"] <= 1.0
    line = record(record_property, f"truthprint-{preset or 'default'}", baseline, after, fitted)
    stats = gate_of(fitted).detector.stats
    print(f"[truthprint-{preset or 'default'}] gate {stats}, layer {prov['layer']['haltrace']}, threshold "
          f"{prov['threshold']}, alpha {prov['alpha']}, detector AUROC {prov['detector']['val_auroc']:.3f}")
    assert stats["steps"] > 0 and line["after"]
    assert all(not layer._forward_hooks for layer in model.adapter.layers)


@pytest.mark.parametrize("heads", ["sample", "fixed"])
def test_vhr_recorded(model, baseline, results, record_property, heads):
    """The paper's per-sample heads (default) and the fixed-head ablation."""
    fitted, after = results("vhr", heads=heads)
    check_provenance(fitted, "vhr")
    assert fitted.provenance["heads_mode"] == heads and fitted.provenance["deviations"]
    assert fitted.interventions and all(getattr(i, "alpha", getattr(i, "factor", None)) == 2.0
                                        for i in fitted.interventions)
    record(record_property, f"vhr-{heads}", baseline, after, fitted)


def test_iti_recorded(model, baseline, results, record_property):
    fitted, after = results("iti")
    check_provenance(fitted, "iti")
    assert len(fitted.provenance["heads"]) == fitted.provenance["k"]
    record(record_property, "iti", baseline, after, fitted)


def test_caa_recorded(model, baseline, results, record_property):
    fitted, after = results("caa")
    check_provenance(fitted, "caa")
    assert fitted.provenance["pair_agreement"] > 0.5  # the pairs mostly agree with their mean difference
    record(record_property, "caa", baseline, after, fitted)


def test_dola_recorded(model, baseline, results, record_property):
    fitted, after = results("dola")
    check_provenance(fitted, "dola")
    assert fitted.interventions[0].stats["positions"] > 0
    record(record_property, "dola", baseline, after, fitted)
    print(f"[dola] premature layer choices {fitted.interventions[0].stats['premature']}")
