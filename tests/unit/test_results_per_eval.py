"""The results table evaluates an evaluation under the fit options its paper uses for it (VISTA's caption
lambda on CHAIR), unless the user set those options."""

from __future__ import annotations

import pytest

from haltrace.evals import results_table as results
from haltrace.steering import registry
from haltrace.steering.registry import FittedIntervention, Method


class _PerTask(Method):
    name = "per-task-test"
    eval_fit_options = {"chair": {"task": "caption"}}

    def fit(self, model, data=None, task: str = "pope", **kw):
        return FittedIntervention(self.name, [], {"task": task})


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", {"per-task-test": _PerTask})
    monkeypatch.setattr(registry, "_load_all", lambda: None)
    seen = []

    def evaluate(model, evals, *, fitted=None, world=None, keep_answers=False):
        seen.append((tuple(evals), fitted.provenance["task"]))
        return {e: {"task": fitted.provenance["task"]} for e in evals}

    monkeypatch.setattr("haltrace.evals.suite.evaluate", evaluate)
    return seen


def test_chair_runs_under_the_caption_fit(fake):
    row = results.evaluate_method(None, "per-task-test", ["pope", "chair"], {})
    assert fake == [(("pope",), "pope"), (("chair",), "caption")]
    assert row["after"] == {"pope": {"task": "pope"}, "chair": {"task": "caption"}}
    assert row["per_eval_fit_options"] == {"chair": {"task": "caption"}}


def test_a_user_setting_wins(fake):
    row = results.evaluate_method(None, "per-task-test", ["pope", "chair"], {}, fit_kwargs={"task": "pope"})
    assert fake == [(("pope", "chair"), "pope")] and "per_eval_fit_options" not in row
