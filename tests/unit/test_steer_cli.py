"""``haltrace steer`` / ``haltrace eval`` through Typer's CliRunner, on a tiny organism and a dummy method."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from haltrace.cli import app
from haltrace.steering.engine import Add
from haltrace.steering.registry import _REGISTRY, FittedIntervention, Method, register_method

runner = CliRunner()


class _Dummy(Method):
    """A test method: adds alpha * e_0 to the residual stream after block ``layer``, on every token."""

    name = "dummy-test"
    summary = "test only"

    def fit(self, model, data=None, alpha: float = 8.0, layer: int = 0, **kw):
        vec = torch.zeros(model.hidden_size)
        vec[0] = 1.0
        return FittedIntervention(self.name, [Add(f"resid_post.{layer}", vec, alpha=alpha)],
                                  {"alpha": alpha, "layer": layer, "direction": vec, **kw})


@pytest.fixture()
def dummy():
    register_method(_Dummy)
    yield _Dummy.name
    _REGISTRY.pop(_Dummy.name, None)


def test_eval_baseline_json(organism_folder):
    res = runner.invoke(app, ["eval", "--model", organism_folder, "--eval", "pope,refusal", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert {"pope.adversarial.recall", "pope.mean_f1", "refusal.refusal_unknown"} <= set(data["metrics"])
    assert data["report"]["pope"]["adversarial"]["parser"] == "official"


def test_steer_dummy_before_after_and_saved(organism_folder, dummy, tmp_path):
    from haltrace.steering.results import load_fitted

    out = tmp_path / "run"
    res = runner.invoke(app, ["steer", "--method", dummy, "--model", organism_folder, "--eval", "pope,counterfactual",
                              "--alpha", "16", "--layer", "1", "--opt", "note=hello", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "before" in res.stdout and "after" in res.stdout and "pope.adversarial.recall" in res.stdout
    manifest = json.loads((out / "intervention.json").read_text())
    assert manifest["method"] == dummy and manifest["interventions"][0]["hook"] == "resid_post.1"
    assert manifest["provenance"]["note"] == "hello" and manifest["provenance"]["direction"]["tensor"]
    fitted = load_fitted(out)
    assert fitted.interventions[0].alpha == 16.0 and fitted.interventions[0].vector[0] == 1.0
    report = json.loads((out / "report.json").read_text())
    metrics = {r["metric"] for r in report["comparison"]}
    assert "counterfactual.prior_to_pixel" in metrics or report["flips"]["n_prior"] == 0
    assert report["options"] == {"alpha": 16.0, "layer": 1, "note": "hello"}


def test_steer_json_is_one_object(organism_folder, dummy):
    res = runner.invoke(app, ["steer", "--method", dummy, "--model", organism_folder, "--eval", "refusal", "--json",
                              "--alpha", "0"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert all(abs(r["change"]) < 1e-9 for r in data["comparison"])  # alpha 0 changes nothing
    assert dummy in data["registered_methods"]


def test_unknown_method_lists_registry(dummy):
    res = runner.invoke(app, ["steer", "--method", "no-such-method", "--model", "x"])
    assert res.exit_code != 0
    assert "unknown steering method" in res.output and dummy in res.output


def test_bad_eval_name(dummy):
    res = runner.invoke(app, ["steer", "--method", dummy, "--eval", "pope,nonsense"])
    assert res.exit_code != 0 and "nonsense" in res.output and "counterfactual" in res.output
    res = runner.invoke(app, ["eval", "--eval", "bogus"])
    assert res.exit_code != 0 and "bogus" in res.output


def test_eval_official_files_without_model(tmp_path):
    from haltrace.evals import formats

    qs = [{"question_id": 1, "image": "a.png", "text": "Is there a cat?", "label": "yes"},
          {"question_id": 2, "image": "a.png", "text": "Is there a dog?", "label": "no"}]
    q = formats.write_pope_questions(tmp_path / "pope_random.jsonl", qs)
    a = formats.write_pope_answers(tmp_path / "answers_random.jsonl", qs, ["There is a cat.", "No."])
    res = runner.invoke(app, ["eval", "--pope-questions", str(q), "--pope-answers", str(a), "--json",
                              "--parser", "lvlm-lp"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["report"]["pope"]["parser"] == "lvlm-lp" and data["metrics"]["pope.random.recall"] == 0.0


def test_load_refuses_an_old_fit_with_custom_hooks(tmp_path):
    """Format 1 saved methods that ran hooks outside the engine: loading says to refit, never half-loads."""
    from haltrace.steering.results import FitFileError, load_fitted, save_fitted

    save_fitted(FittedIntervention("truthprint", [], {}), tmp_path)
    manifest = json.loads((tmp_path / "intervention.json").read_text())
    (tmp_path / "intervention.json").write_text(json.dumps(manifest | {"format_version": 1, "custom_hooks": True}))
    with pytest.raises(FitFileError, match="older haltrace.*haltrace steer --method truthprint --out DIR"):
        load_fitted(tmp_path)


def test_load_names_an_unregistered_intervention_type(tmp_path):
    from haltrace.steering.results import load_fitted, save_fitted

    save_fitted(FittedIntervention("x", [Add("resid_post.0", torch.ones(4))], {}), tmp_path)
    manifest = json.loads((tmp_path / "intervention.json").read_text())
    manifest["interventions"][0]["state"]["type"] = "NoSuchEdit"
    (tmp_path / "intervention.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="unknown intervention type 'NoSuchEdit'; known types: .*Add"):
        load_fitted(tmp_path)


def test_steer_from_saved_folder_reproduces_the_fit(organism_folder, dummy, tmp_path):
    out = tmp_path / "run"
    args = ["--model", organism_folder, "--eval", "pope,refusal", "--json"]
    first = runner.invoke(app, ["steer", "--method", dummy, "--alpha", "16", "--out", str(out), *args])
    assert first.exit_code == 0, first.output
    again = runner.invoke(app, ["steer", "--from", str(out), "--eval", "pope,refusal", "--json"])
    assert again.exit_code == 0, again.output
    a, b = json.loads(first.stdout), json.loads(again.stdout)
    assert b["method"] == dummy and b["model"] == organism_folder  # both read from the saved folder
    assert b["loaded_from"] == str(out)
    assert b["after"] == a["after"] and any(abs(r["change"]) > 0 for r in b["comparison"])


def _flat(output: str) -> str:
    """CLI output without Rich's error-box borders and line wrapping, for substring checks."""
    return " ".join(output.replace("│", " ").replace("╭", " ").replace("╰", " ").split())


def test_steer_from_refuses_fit_options_and_another_method(organism_folder, dummy, tmp_path):
    out = tmp_path / "run"
    assert runner.invoke(app, ["steer", "--method", dummy, "--model", organism_folder, "--eval", "refusal",
                               "--out", str(out)]).exit_code == 0
    res = runner.invoke(app, ["steer", "--from", str(out), "--alpha", "2"])
    assert res.exit_code != 0 and "would be ignored" in _flat(res.output)
    res = runner.invoke(app, ["steer", "--from", str(out), "--method", "pvp"])
    assert res.exit_code != 0 and f"holds a {dummy} fit, not pvp" in _flat(res.output)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(out / "intervention.safetensors"))
    tensors["interventions.0.vector"] = torch.zeros(7)  # as if saved from a model 7 wide
    save_file(tensors, str(out / "intervention.safetensors"))
    res = runner.invoke(app, ["steer", "--from", str(out), "--eval", "refusal"])
    assert res.exit_code != 0 and "does not fit" in _flat(res.output) and "7" in _flat(res.output)
    assert "baseline" not in res.stdout  # refused before the baseline evaluation ran
    res = runner.invoke(app, ["steer", "--from", str(tmp_path / "nothing-here")])
    assert res.exit_code != 0 and "lacks intervention.json" in _flat(res.output)
    res = runner.invoke(app, ["steer", "--model", organism_folder])
    assert res.exit_code != 0 and "pass --method NAME" in _flat(res.output) and "pvp" in _flat(res.output)


def test_steer_all_wants_options_scoped_per_method(dummy):
    res = runner.invoke(app, ["steer", "--method", "all", "--alpha", "4"])
    assert res.exit_code != 0 and "would go to every method" in _flat(res.output) and "--opt pvp.alpha=4" in _flat(res.output)
    res = runner.invoke(app, ["steer", "--method", "all", "--opt", "nosuch.alpha=4"])
    assert res.exit_code != 0 and "names no registered method" in _flat(res.output) and "pvp" in _flat(res.output)


def test_single_method_steer_fits_again_for_a_per_task_setting(organism_folder):
    """A method whose paper sets options per evaluation (VISTA's caption lambda) is evaluated there under them,
    unless the user set those options."""
    calls = []

    class _PerTask(_Dummy):
        name = "dummy-per-task"
        eval_fit_options = {"refusal": {"alpha": 0.0}}

        def fit(self, model, data=None, alpha: float = 8.0, layer: int = 0, **kw):
            calls.append(alpha)
            return super().fit(model, data, alpha=alpha, layer=layer, **kw)

    register_method(_PerTask)
    try:
        res = runner.invoke(app, ["steer", "--method", _PerTask.name, "--model", organism_folder, "--eval",
                                  "refusal", "--json"])
        assert res.exit_code == 0, res.output
        data = json.loads(res.stdout)
        assert calls == [8.0, 0.0] and data["per_eval_fit_options"] == {"refusal": {"alpha": 0.0}}
        assert all(abs(r["change"]) < 1e-9 for r in data["comparison"])  # refusal ran under the alpha-0 fit
        calls.clear()
        res = runner.invoke(app, ["steer", "--method", _PerTask.name, "--model", organism_folder, "--eval",
                                  "refusal", "--json", "--alpha", "3"])
        assert res.exit_code == 0, res.output
        assert calls == [3.0] and "per_eval_fit_options" not in json.loads(res.stdout)
    finally:
        _REGISTRY.pop(_PerTask.name, None)
