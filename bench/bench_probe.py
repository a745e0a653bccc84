"""Probe sweep benchmark: 32 layers x 10,000 examples x d=4096 (synthetic float32) on CPU.

Times :func:`haltrace.probes.fit_probes` (5 outer group folds, C from 5 values by 3 inner group folds, logistic
+ mass-mean, final refit) against a plain scikit-learn loop with the same protocol
(``StandardScaler + LogisticRegression(lbfgs)`` per layer, per fold, per C: 105 fits per layer). That loop
would run for hours here, so a few of its fits are timed on ``--sklearn-layers`` layers and the total is
extrapolated by fit count (stated in the output); the held-out AUROC of its fold-0 model is compared with ours.

The data has what residual streams have: a few large shared directions (spiked covariance), unequal feature
scales and offsets, and a label signal whose strength grows with depth.

    python bench/bench_probe.py                       # full scale (~5 GiB of activations)
    python bench/bench_probe.py --layers 4 --n 2000 --d 1024 --sklearn-layers 1   # quick
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch


def make_data(layers: int, n: int, d: int, seed: int = 0) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=gen)
    groups = np.arange(n) // 4  # e.g. 4 questions per image
    X = torch.empty(layers, n, d)
    scale = torch.exp(torch.randn(d, generator=gen) * 0.5)
    offset = torch.randn(d, generator=gen) * 3
    for i in range(layers):
        spikes = torch.randn(8, d, generator=gen) * 6
        signal = torch.randn(d, generator=gen)
        signal *= (0.3 + 2.2 * i / max(1, layers - 1)) / signal.norm()  # separation 0.3 -> 2.5 sd
        X[i] = torch.randn(n, d, generator=gen)
        X[i] += torch.randn(n, 8, generator=gen) @ spikes
        X[i] += y[:, None].float() * signal
        X[i] *= scale
        X[i] += offset
    return X, y.numpy(), groups


def run_ours(X, y, groups, args) -> tuple[float, object]:
    from haltrace.probes.linear import fit_probes

    start = time.perf_counter()
    sweep = fit_probes(X, y, groups, n_folds=5, inner_folds=3, max_dim=args.max_dim, seed=0)
    return time.perf_counter() - start, sweep


def run_sklearn(X, y, groups, sweep, args) -> dict:
    """Time sklearn's fits on ``--sklearn-layers`` layers and extrapolate to the full protocol by fit count.

    Per layer it times the 5 fits of one inner split (one per C) plus the outer-fold refit at the C our
    solver picked, whose held-out AUROC on fold 0 is compared with ours on the same rows.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    from haltrace.probes.linear import DEFAULT_CS, _split_masks

    outer, masks = _split_masks(y, groups.astype(str), 5, 3, 0)
    per_fit, aucs = [], []
    for layer in np.linspace(X.shape[0] - 1, 0, args.sklearn_layers).round().astype(int).tolist():
        x = X[layer].numpy()
        tr = masks[0, 0]
        scaler = StandardScaler().fit(x[tr])
        xt = scaler.transform(x[tr])
        for C in DEFAULT_CS:
            start = time.perf_counter()
            LogisticRegression(C=C, max_iter=1000).fit(xt, y[tr])
            per_fit.append(time.perf_counter() - start)
        C = float(sweep.fold_C[layer, 0])
        tr, te = outer != 0, outer == 0
        start = time.perf_counter()
        scaler = StandardScaler().fit(x[tr])
        clf = LogisticRegression(C=C, max_iter=1000).fit(scaler.transform(x[tr]), y[tr])
        per_fit.append(time.perf_counter() - start)
        sk_auc = roc_auc_score(y[te], clf.decision_function(scaler.transform(x[te])))
        ours_auc = roc_auc_score(y[te], sweep.oof[layer].numpy()[te])
        aucs.append({"layer": layer, "C": C, "sklearn_auroc_fold0": round(float(sk_auc), 4),
                     "ours_auroc_fold0": round(float(ours_auc), 4)})
    fits_full = 5 * (3 + 1) * len(DEFAULT_CS) + len(DEFAULT_CS)  # nested CV + final refit at every C
    estimate = float(np.mean(per_fit)) * fits_full * X.shape[0]
    return {"fit_seconds": [round(t, 1) for t in per_fit], "fits_per_layer_full_protocol": fits_full,
            "estimated_full_seconds": round(estimate, 1), "auroc_check": aucs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--max-dim", type=int, default=32)
    parser.add_argument("--sklearn-layers", type=int, default=1, help="layers to time sklearn on (0 = skip)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    t0 = time.perf_counter()
    X, y, groups = make_data(args.layers, args.n, args.d)
    gen_s = time.perf_counter() - t0
    ours_s, sweep = run_ours(X, y, groups, args)
    result = {
        "shape": [args.layers, args.n, args.d], "max_dim": args.max_dim, "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "data_generation_s": round(gen_s, 1),
        "ours_s": round(ours_s, 1), "ours_auroc_first_mid_last": [round(float(sweep.auroc[i]), 4) for i in
                                                                   (0, args.layers // 2, args.layers - 1)],
        "ours_mass_mean_auroc_last": round(float(sweep.mm_auroc[-1]), 4),
    }
    if args.sklearn_layers:
        result["sklearn"] = run_sklearn(X, y, groups, sweep, args)
        result["speedup_vs_sklearn_estimate"] = round(result["sklearn"]["estimated_full_seconds"] / ours_s, 1)
    print(json.dumps(result, indent=1) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
