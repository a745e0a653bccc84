"""Probes: the batched solver against scikit-learn, AUROC, folds, labelled-set parsing and their errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from haltrace.probes.artifacts import layer_convention, parse_layers
from haltrace.probes.datasets import TASKS, build_task, cut_at_word, load_jsonl, organism_folder
from haltrace.probes.linear import (
    _split_masks,
    auroc,
    bag_of_tokens,
    fit_probes,
    group_folds,
    majority_baseline,
)


def _data(n=240, d=12, layers=2, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    groups = np.arange(n) // 3
    X = rng.normal(size=(layers, n, d)).astype(np.float32)
    for layer in range(layers):
        X[layer, :, :2] += 0.5 * (layer + 1) * y[:, None]
    X[:, :, 3] *= 40.0  # wildly different feature scales: standardisation matters
    X[:, :, 4] += 100.0
    return torch.from_numpy(X), y, groups


def test_matches_sklearn_with_same_folds_and_C():
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    X, y, groups = _data()
    sweep = fit_probes(X, y, groups, n_folds=4, inner_folds=2, seed=0)
    outer, _ = _split_masks(y, groups.astype(str), 4, 2, 0)
    for layer in range(X.shape[0]):
        x = X[layer].numpy()
        oof = np.zeros(len(y))
        for f in range(4):
            train, test = outer != f, outer == f
            scaler = StandardScaler().fit(x[train])  # standardised on training rows only
            clf = LogisticRegression(C=float(sweep.fold_C[layer, f]), max_iter=5000, tol=1e-8)
            clf.fit(scaler.transform(x[train]), y[train])
            oof[test] = clf.decision_function(scaler.transform(x[test]))
        assert abs(roc_auc_score(y, oof) - float(sweep.auroc[layer])) < 0.01
        # final probe is in residual units: score = x @ w + b equals sklearn's pipeline on all rows
        scaler = StandardScaler().fit(x)
        clf = LogisticRegression(C=float(sweep.C[layer]), max_iter=5000, tol=1e-8).fit(scaler.transform(x), y)
        ours = x @ sweep.weight[layer].numpy() + float(sweep.bias[layer])
        assert np.abs(ours - clf.decision_function(scaler.transform(x))).max() < 0.02


def test_reduced_basis_close_to_exact_on_spiked_data():
    rng = np.random.default_rng(1)
    n, d = 300, 96
    y = rng.integers(0, 2, n)
    spikes = rng.normal(size=(n, 3)) * 8 @ rng.normal(size=(3, d))  # a few large directions + noise
    X = spikes + rng.normal(size=(n, d)) + 0.35 * y[:, None] * rng.normal(size=d)
    X = torch.from_numpy(X[None].astype(np.float32))
    exact = fit_probes(X, y, n_folds=3, inner_folds=2, max_dim=128)
    reduced = fit_probes(X, y, n_folds=3, inner_folds=2, max_dim=16)
    assert reduced.info["reduced_dim"] == 16 and exact.info["reduced_dim"] is None
    assert abs(float(exact.auroc[0]) - float(reduced.auroc[0])) < 0.06  # measured gap 0.01-0.045 over 4 seeds
    assert reduced.weight.shape == (1, d)
    assert reduced.info["reduced_rank"] is True and reduced.info["rank"] == 16 and reduced.info["max_dim"] == 16
    assert exact.info["reduced_rank"] is False and exact.info["rank"] == d


def _inner_split_features(monkeypatch, X, y, outer, masks, target):
    """Run fit_probes with fixed folds and return the features the solver got for the problem that trains on
    the rows ``target`` (and is scored on the rest of its fold's training part)."""
    import haltrace.probes.linear as lin

    monkeypatch.setattr(lin, "_split_masks", lambda *a, **k: (outer, masks))  # same folds whatever the labels
    seen = []
    real = lin._newton

    def spy(Z, y_, m, Cs, **kw):
        fm = kw.get("feature_mask")
        for g in range(m.shape[0]):
            for q in range(m.shape[1]):
                if torch.equal(m[g, q], target):
                    seen.append(Z[g] if fm is None else Z[g][:, fm[q]])
        return real(Z, y_, m, Cs, **kw)

    monkeypatch.setattr(lin, "_newton", spy)
    lin.fit_probes(X, y, n_folds=3, inner_folds=2, max_dim=8, seed=0)
    assert seen, "no solver problem trained on the inner split's rows"
    return seen[0].clone()


def test_inner_cv_basis_never_sees_the_inner_validation_labels(monkeypatch):
    """Regression: the reduced basis of every fold held the class-mean gap of its whole training part, so the
    features an inner split was fitted and scored on carried its own validation rows' labels (inflated inner
    AUROC, biased choice of C). Changing only those labels must leave that split's features unchanged."""
    from haltrace.probes.linear import _split_masks

    rng = np.random.default_rng(0)
    n, d = 90, 60  # wide (d > max_dim=8): the reduced-rank path
    y0 = np.array([0, 1] * (n // 2))
    X = torch.from_numpy(rng.normal(size=(1, n, d)).astype(np.float32))
    outer, masks = _split_masks(y0, np.arange(n).astype(str), 3, 2, 0)
    target = torch.from_numpy(masks[0, 0])  # fold 0, inner split 0: trains on these rows ...
    valid = masks[0, -1] & ~masks[0, 0]  # ... and is scored on these
    assert valid.sum() > 10
    base = _inner_split_features(monkeypatch, X, y0, outer, masks, target)
    y_valid = y0.copy()
    y_valid[valid] = 1 - y_valid[valid]  # only the inner-validation labels change
    assert torch.allclose(_inner_split_features(monkeypatch, X, y_valid, outer, masks, target), base, atol=1e-5)
    # the features do depend on the split's own training labels (the check above is not vacuous)
    y_train = y0.copy()
    flip = np.flatnonzero(masks[0, 0])[:10]
    y_train[flip] = 1 - y_train[flip]
    assert not torch.allclose(_inner_split_features(monkeypatch, X, y_train, outer, masks, target), base,
                              atol=1e-3)


def test_exact_solver_is_sklearn_on_all_features():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    X, y, groups = _data(n=180, d=40, layers=1)
    sweep = fit_probes(X, y, groups, n_folds=3, inner_folds=2, max_dim=8, exact=True)
    assert sweep.info["reduced_rank"] is False and sweep.info["rank"] == 40 and "scikit-learn" in sweep.info["solver"]
    x = X[0].numpy()
    scaler = StandardScaler().fit(x)
    clf = LogisticRegression(C=float(sweep.C[0]), max_iter=5000, tol=1e-8).fit(scaler.transform(x), y)
    ours = x @ sweep.weight[0].numpy() + float(sweep.bias[0])
    assert np.abs(ours - clf.decision_function(scaler.transform(x))).max() < 1e-3
    batched = fit_probes(X, y, groups, n_folds=3, inner_folds=2, max_dim=128)  # d <= max_dim: exact too
    assert abs(float(batched.auroc[0]) - float(sweep.auroc[0])) < 0.01
    reduced = fit_probes(X, y, groups, n_folds=3, inner_folds=2, max_dim=8)
    assert reduced.info["reduced_rank"] is True and reduced.info["rank"] == 8
    from haltrace.errors import InputError

    with pytest.raises(InputError, match="--max-dim 128.*--exact"):
        fit_probes(X, y, groups, max_dim=1)


def test_mass_mean_midpoint_bias_handles_uncentred_data():
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 2
    X = torch.randn(1, 200, 8, generator=gen) + 0.8 * y[None, :, None] + 500.0
    sweep = fit_probes(X, y, n_folds=3, inner_folds=2)
    assert float(sweep.mm_accuracy[0]) > 0.8  # without the midpoint bias every score would have one sign
    expected = X[0][y == 1].mean(0) - X[0][y == 0].mean(0)
    assert torch.allclose(sweep.mm_direction[0], expected, atol=1e-3)


def test_auroc_matches_sklearn_with_ties_and_masks():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 50)
    s = np.round(rng.normal(size=(3, 50)) + y, 1)  # rounding makes ties
    mask = rng.random((3, 50)) < 0.7
    ours = auroc(torch.from_numpy(s), torch.from_numpy(y), torch.from_numpy(mask))
    for i in range(3):
        assert abs(float(ours[i]) - roc_auc_score(y[mask[i]], s[i][mask[i]])) < 1e-9
    assert torch.isnan(auroc(torch.ones(4), torch.ones(4)))


def test_folds_keep_groups_together_and_errors():
    y = np.array([0, 1] * 30)
    groups = np.arange(60) // 4
    folds = group_folds(y, groups, 5, seed=0)
    for g in np.unique(groups):
        assert len(set(folds[groups == g])) == 1
    with pytest.raises(ValueError, match="only 2 groups for 5 folds"):
        group_folds(y, np.arange(60) // 30, 5, seed=0)
    with pytest.raises(ValueError, match="labels must be 0 and 1"):
        fit_probes(torch.randn(1, 10, 3), [0] * 10)


def test_baselines():
    counts, vocab = bag_of_tokens([[3, 3, 9], [9]])
    assert vocab == [3, 9] and counts.tolist() == [[2.0, 1.0], [0.0, 1.0]]
    assert majority_baseline([1, 1, 1, 0] * 5, n_folds=2)["accuracy"] == 0.75


def test_parse_layers_and_convention():
    assert parse_layers("all", 3) == [0, 1, 2]
    assert parse_layers("-1,0-1", 4) == [0, 1, 3]
    with pytest.raises(ValueError, match="layers 0..3"):
        parse_layers("7", 4)
    assert "output of block i" in layer_convention("resid_post")


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_positions_labels_groups_and_images(tmp_path):
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (4, 4), (255, 0, 0)).save(tmp_path / "imgs" / "a.png")
    path = _write(tmp_path / "set.jsonl", [
        {"prompt": "the player zomi plays golf", "label": "unknown", "position": {"word": "zomi"}},
        {"prompt": "<image> is there a cup ?", "label": "known", "image": "imgs/a.png", "group": "g1"},
        {"prompt": "say more", "label": "known", "position": {"generated": 2}},
    ])
    pset = load_jsonl(path)
    assert pset.label_names == ["known", "unknown"] and pset.labels == [1, 0, 0]
    assert pset.rows[0]["prompt"] == "the player zomi" and pset.rows[0]["source_prompt"].endswith("golf")
    assert pset.rows[1]["image"].size == (4, 4) and pset.rows[1]["group"] == "g1"
    assert pset.rows[2]["position"] == {"generated": 2}
    assert cut_at_word("a zomiz zomi b", "zomi") == "a zomiz zomi"


def test_one_class_file_names_file_and_class(tmp_path):
    path = _write(tmp_path / "one.jsonl", [{"prompt": "a", "label": "yes"}, {"prompt": "b", "label": "yes"}])
    with pytest.raises(ValueError, match=r'one\.jsonl: every row has label "yes"'):
        load_jsonl(path)


@pytest.mark.parametrize(("row", "message"), [
    ({"prompt": "a b", "label": 1, "position": {"word": "zz"}}, "does not occur"),
    ({"prompt": "a b", "label": 1, "position": "first"}, "position must be"),
    ({"prompt": "a b", "label": 1, "image": "missing.png"}, "relative to the JSONL"),
    ({"text": "a b", "label": 1}, "needs a \"prompt\""),
])
def test_jsonl_bad_rows(tmp_path, row, message):
    path = _write(tmp_path / "bad.jsonl", [{"prompt": "ok", "label": 0}, row])
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_jsonl(path)


def test_unknown_task_lists_tasks_and_non_organism_model():
    with pytest.raises(ValueError, match="unknown task 'nope'; tasks: hallucination") as err:
        build_task("nope", None)
    assert all(name in str(err.value) for name in TASKS)

    class Fake:
        name_or_path = "gpt2"

    with pytest.raises(ValueError, match="--data FILE.jsonl"):
        organism_folder(Fake())
