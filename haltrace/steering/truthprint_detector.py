"""TruthPrInt's detector fitting: a standardised logistic probe on the producing states of one or more blocks,
chosen on a held-out split (:func:`select_detector`). Split from :mod:`haltrace.steering.truthprint`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from haltrace.metrics import auroc_score

#: relative depth of the shifted block under preset="paper": the only layer on record is an unofficial 13B
#: reproduction's "layer 20 of 40" (shared/research/methods-vlm.md §2c); the paper's own value was not retrieved
PAPER_RELATIVE_DEPTH = 0.5



# ----------------------------------------------------------------------------- detector fitting
def detector_rows(feats: dict[int, np.ndarray], layers: Sequence[int], rows: np.ndarray) -> np.ndarray:
    """``rows`` (a boolean mask) of the blocks ``layers`` concatenated, float32, built block by block (one
    ``[rows, sum d]`` array; never the concatenation of every row first)."""
    idx = np.flatnonzero(rows)
    out = np.empty((len(idx), sum(feats[i].shape[1] for i in layers)), dtype=np.float32)
    col = 0
    for i in layers:
        d = feats[i].shape[1]
        out[:, col:col + d] = feats[i][idx]
        col += d
    return out


def fit_detector(feats: dict[int, np.ndarray], layers: Sequence[int], y: np.ndarray, rows: np.ndarray, c: float
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Logistic regression (``C=c``) on the standardised concatenated states of ``layers`` at ``rows``:
    ``(mean, scale, weight, bias)`` in standardised units. Memory: one float32 copy of the training rows,
    standardised in place (per block, so no full-size temporaries)."""
    from sklearn.linear_model import LogisticRegression

    x = detector_rows(feats, layers, rows)
    mean = np.empty(x.shape[1], dtype=np.float32)
    scale = np.empty(x.shape[1], dtype=np.float32)
    for lo in range(0, x.shape[1], 4096):
        blk = x[:, lo:lo + 4096]
        mean[lo:lo + 4096] = blk.mean(0)
        scale[lo:lo + 4096] = blk.std(0) + 1e-6
        blk -= mean[lo:lo + 4096]
        blk /= scale[lo:lo + 4096]
    clf = LogisticRegression(C=c, max_iter=2000).fit(x, y[rows])
    return mean, scale, clf.coef_[0], float(clf.intercept_[0])


def detector_scores(feats: dict[int, np.ndarray], layers: Sequence[int], rows: np.ndarray, mean: np.ndarray,
                    scale: np.ndarray, weight: np.ndarray, bias: float) -> np.ndarray:
    """Decision values ``((x - mean) / scale) . weight + bias`` at ``rows``, block by block."""
    idx = np.flatnonzero(rows)
    out = np.full(len(idx), bias, dtype=np.float64)
    col = 0
    for i in layers:
        d = feats[i].shape[1]
        out += ((feats[i][idx] - mean[col:col + d]) / scale[col:col + d]) @ weight[col:col + d]
        col += d
    return out


def select_detector(feats: dict[int, np.ndarray], y: np.ndarray, train: np.ndarray, val: np.ndarray,
                    candidates: Sequence[Sequence[int]], probe_cs: Sequence[float], *, tolerance: float | None = None
                    ) -> tuple[dict[str, Any], list[dict[str, Any]], tuple[np.ndarray, np.ndarray, np.ndarray, float]]:
    """Every (layers, C) candidate fitted on ``train`` and scored by AUROC on ``val``; returns the pick, every
    candidate's record, and the pick's fit. The pick: the best AUROC, then fewer blocks, then smaller C; with
    ``tolerance``, the candidate with the fewest blocks, then the smallest C, then the best AUROC among those
    within ``tolerance`` of the best AUROC (a parsimony rule that float noise, e.g. from the thread count,
    cannot flip the way it flips exact near-ties)."""
    records, best_fit, pick = [], None, None
    for cand in candidates:
        for c in probe_cs:
            fit = fit_detector(feats, cand, y, train, c)
            rec = {"layers": list(cand), "C": c, "val_auroc": auroc_score(detector_scores(feats, cand, val, *fit), y[val])}
            records.append(rec)
            key = (rec["val_auroc"], -len(rec["layers"]), -rec["C"])
            if pick is None or key > (pick["val_auroc"], -len(pick["layers"]), -pick["C"]):
                pick, best_fit = rec, fit
    assert pick is not None and best_fit is not None
    if tolerance is not None:
        near = [r for r in records if r["val_auroc"] >= pick["val_auroc"] - tolerance]
        simple = max(near, key=lambda r: (-len(r["layers"]), -r["C"], r["val_auroc"]))
        if simple is not pick:
            pick, best_fit = simple, fit_detector(feats, simple["layers"], y, train, simple["C"])
    return pick, records, best_fit


def layer_candidates(n_layers: int, layers: Sequence[int] | None) -> list[list[int]]:
    """The detector's candidate block sets: the given ``layers``, else each single block and each run of blocks
    ending at the last one."""
    if layers is not None:
        return [sorted({int(x) % n_layers for x in layers})]
    return [[i] for i in range(n_layers)] + [list(range(i, n_layers)) for i in range(n_layers - 1)]


def paper_layer(n_layers: int) -> int:
    """The ``resid_post`` block at :data:`PAPER_RELATIVE_DEPTH` (HF ``hidden_states`` index ``round(depth * n)``):
    20 of 40 -> ``resid_post.19``; 32 layers -> ``resid_post.15``; the 4-layer organism -> ``resid_post.1``."""
    return max(0, int(round(PAPER_RELATIVE_DEPTH * n_layers)) - 1)


