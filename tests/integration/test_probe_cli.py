"""``haltrace probe`` end to end on a tiny freshly trained organism: artifacts, store reuse, and bad inputs."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from haltrace.probes.cli import app


@pytest.fixture(scope="module")
def organism(tmp_path_factory):
    import torch

    from haltrace.organism.train import train_organism

    out = tmp_path_factory.mktemp("org") / "tiny"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops: one thread is faster on a busy machine
    try:
        train_organism(out, preset="tiny", seed=0, steps=4, progress=False)  # plumbing only, not phenomena
    finally:
        torch.set_num_threads(threads)
    return str(out)


def _run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_entity_probe_writes_artifacts_and_reuses_store(organism, tmp_path):
    out = tmp_path / "run"
    result = _run("--model", organism, "--task", "entity", "--layers", "all", "--out", out, "--json",
                  "--folds", 3, "--inner-folds", 2)
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    assert manifest["task"] == "entity" and manifest["layers"] == [0, 1]
    assert manifest["label_names"] == {"0": "known", "1": "unknown"} and manifest["n_groups"] == 144
    assert set(manifest["baselines"]) == {"bag_of_tokens", "majority", "shuffled_labels"}
    assert 0.0 <= manifest["metrics"]["1"]["logreg"]["auroc"] <= 1.0
    assert "output of block i" in manifest["layer_convention"]
    for name in ("probes.json", "probes.safetensors", "report.html", "vectors/probe.safetensors",
                 "vectors/mass_mean.json", "store/manifest.json"):
        assert (out / name).is_file(), name
    assert "plotly" in (out / "report.html").read_text()[:5_000_000]

    from haltrace.probes.artifacts import load_probe_artifacts
    from haltrace.steering.vector import SteeringVector

    _, tensors = load_probe_artifacts(out)
    assert tensors["weight"].shape == (2, 64)
    vec = SteeringVector.load(out / "vectors" / "mass_mean", hidden_size=64, n_layers=2)
    assert vec.layers == [0, 1] and vec.provenance["task"] == "entity"

    shard_times = {p: p.stat().st_mtime_ns for p in (out / "store" / "shards").iterdir()}
    again = _run("--model", organism, "--task", "entity", "--layers", "1", "--out", out, "--json",
                 "--folds", 3, "--inner-folds", 2)
    assert again.exit_code == 0, again.output
    assert {p: p.stat().st_mtime_ns for p in (out / "store" / "shards").iterdir()} == shard_times  # reused

    other_hook = _run("--model", organism, "--task", "entity", "--hook", "mlp_out", "--out", out)
    assert other_hook.exit_code == 2
    assert "different settings" in other_hook.output and "--overwrite" in other_hook.output


def test_jsonl_with_word_and_generated_positions(organism, tmp_path):
    from haltrace.organism.tasks import entity_sets
    from haltrace.organism.train import load_world

    sets = entity_sets(load_world(organism))
    rows = [{"prompt": ex.prompt, "label": label, "group": ex.meta["name"], "position": {"word": ex.meta["name"]}}
            for label, group in ((0, "known"), (1, "unknown_heldout")) for ex in sets[group][:40]]
    rows += [{"prompt": "what sport does the player zomi play ? answer :", "label": 1, "position": {"generated": 0},
              "group": "gen"}]
    data = tmp_path / "set.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = _run("--model", organism, "--data", data, "--layers", "-1", "--out", tmp_path / "run", "--json",
                  "--folds", 3, "--inner-folds", 2)
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    # the generated row survives unless this barely trained model stops at once (then it is dropped, warned)
    assert manifest["layers"] == [1] and manifest["counts"]["0"] == 40 and manifest["counts"]["1"] in (40, 41)
    assert '{"generated": 0}' in manifest["position_rule"] and '{"word":' in manifest["position_rule"]


def test_reduced_rank_is_recorded_and_exact_fits_all_features(organism, tmp_path):
    out = tmp_path / "rank"
    reduced = _run("--model", organism, "--task", "entity", "--layers", "1", "--out", out, "--json",
                   "--folds", 3, "--inner-folds", 2, "--max-dim", 16)
    assert reduced.exit_code == 0, reduced.output
    manifest = json.loads(reduced.stdout)
    assert (manifest["reduced_rank"], manifest["rank"], manifest["max_dim"]) == (True, 16, 16)
    assert "REDUCED RANK" in manifest["protocol"]
    assert json.loads((out / "probes.json").read_text())["reduced_rank"] is True  # the saved manifest says so
    exact = _run("--model", organism, "--task", "entity", "--layers", "1", "--out", out, "--json",
                 "--folds", 3, "--inner-folds", 2, "--max-dim", 16, "--exact")
    assert exact.exit_code == 0, exact.output
    manifest = json.loads(exact.stdout)
    assert (manifest["reduced_rank"], manifest["rank"]) == (False, 64)  # all 64 features of the tiny organism
    assert "scikit-learn" in manifest["solver"] and "REDUCED RANK" not in manifest["protocol"]
    assert 0.0 <= manifest["metrics"]["1"]["logreg"]["auroc"] <= 1.0


def test_bad_inputs_fail_clearly(organism, tmp_path):
    one = tmp_path / "one.jsonl"
    one.write_text('{"prompt": "a", "label": "yes"}\n{"prompt": "b", "label": "yes"}\n')
    result = _run("--model", organism, "--data", one, "--out", tmp_path / "x")
    assert result.exit_code == 2 and "one.jsonl" in result.output and '"yes"' in result.output

    result = _run("--model", organism, "--task", "nope", "--out", tmp_path / "x")
    assert result.exit_code == 2 and "unknown task 'nope'" in result.output and "prior-vs-pixel" in result.output

    result = _run("--model", organism, "--out", tmp_path / "x")
    assert result.exit_code == 2 and "exactly one of --task" in result.output

    result = _run("--model", organism, "--task", "entity", "--hook", "attn_pattern", "--out", tmp_path / "x")
    assert result.exit_code == 2 and "resid_post" in result.output
