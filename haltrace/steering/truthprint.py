"""TruthPrInt (Duan et al., ICCV 2025, arXiv 2503.10602): a per-token hallucination detector gates a
truthful-direction shift of the hidden state *before* the token is produced ("pre-intervention").

No official code exists (``jinhaoduan/TruthPrInt`` holds only a README), so every knob below is our choice,
recorded in the provenance (see ``shared/research/methods-vlm.md`` §2 and ``methods-llm-eval.md`` §3.5):

* **Detector**: logistic regression (standardised features) on ``resid_post`` states at the position that
  *produces* an answer token (the paper's "token immediately preceding" the object word, a one-step early
  warning). Training states are the model's own "yes" answers on fit questions, labelled hallucinated when the
  object is absent (the organism's ground truth). The blocks read (one block, or a run of blocks ending at the
  last one, concatenated) and the L2 strength ``C`` are chosen by AUROC on a held-out split of the fit data; the
  shift happens at the deepest block read, ``resid_post.L``.
* **Truthful direction** (``direction="truthful_answer"``, default): mean state of absent objects the model
  correctly answers "no" minus mean state of absent objects it answers "yes" (same ground truth, truthful vs
  hallucinated decoding). ``"real_minus_hallucinated"`` (real vs hallucinated "yes" states) and ``"probe"``
  (minus the detector weight, scaled to the mass-mean norm) are options; all three cosines are recorded.
* **Gate**: at every forward, only at the token-producing position (last real prompt token at prefill, the
  newest token at each decoding step), if ``p(hallucinated) > threshold``: ``h <- h + alpha * d``. ``alpha`` is in
  units of the class-mean difference (alpha=1 moves the hallucinated mean onto the truthful mean).
* ``threshold`` and ``alpha`` are chosen on the held-out fit split (never the eval sets): the lowest false-yes
  rate on absent *partner* questions whose recall drop on present objects stays within ``max_recall_drop``
  (3 points, under the 5-point budget because the fit split is small).
* Not implemented: the reported backtracking to the lowest-confidence token and ComnHallu cross-model alignment.

Fit data: :class:`~haltrace.data.YesNoQuestion` items with images (an organism's default: fresh scenes, seed
4242, far from the eval seeds; ``DIR/fit/truthprint.jsonl`` from ``haltrace organism eval --write-sets DIR``).

>>> import haltrace
>>> from haltrace.steering.registry import get_method
>>> from haltrace.evals.suite import evaluate
>>> model = haltrace.load("shapes-llava")                              # doctest: +SKIP
>>> fitted = get_method("truthprint").fit(model)                      # doctest: +SKIP
>>> evaluate(model, ["pope"], fitted=fitted)["pope"]["adversarial"]   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from haltrace.data.items import YesNoQuestion, of_kind
from haltrace.data.sources import default_fit_data
from haltrace.steering.fitdata import (
    TRUTHPRINT_FIT_SEED,
    fingerprint,
    image_ids_of,
    image_split,
    items_fingerprint,
    question_states,
    says_yes,
)
from haltrace.steering.engine import Add, Gated, LinearDetector, steer
from haltrace.steering.registry import FittedIntervention, Method, register_method

PAPER = "Duan et al., TruthPrInt: Latent Truthful-Guided Pre-Intervention, ICCV 2025, arXiv 2503.10602"
DIRECTIONS = ("truthful_answer", "real_minus_hallucinated", "probe")


def _auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores)) if 0 < labels.sum() < len(labels) else float("nan")


# ----------------------------------------------------------------------------- the gate (engine edit)
def truthful_gate(layers: int | Sequence[int], mean: Any, scale: Any, weight: Any, bias: float, direction: Any, *,
                  alpha: float, threshold: float) -> Gated:
    """The gated pre-intervention as one engine edit: ``Gated(Add("resid_post.{layers[-1]}", direction,
    alpha, positions="producing"), LinearDetector(layers, mean, scale, weight, bias, threshold))``.

    The detector reads the ``resid_post`` states of ``layers`` at the token-producing position (concatenated in
    order); where ``p = sigmoid(((h - mean) / scale) . weight + bias) > threshold`` the gate adds
    ``alpha * direction`` there, at the deepest block read, before later blocks run.

    >>> gate = truthful_gate([2, 3], mean, scale, weight, 0.0, direction, alpha=1.0, threshold=0.5)  # doctest: +SKIP
    >>> with steer(model, gate):                                                                # doctest: +SKIP
    ...     model.hf.generate(**inputs, max_new_tokens=4)
    """
    det = LinearDetector(layers, mean, scale, weight, bias, threshold=threshold)
    direction = torch.as_tensor(direction, dtype=torch.float32).reshape(-1)
    if direction.numel() * len(det.layers) != det.weight.numel():
        raise ValueError(f"mean/scale/weight must have len(layers) * direction width values, got "
                         f"{det.weight.numel()} for {len(det.layers)} layers x width {direction.numel()}")
    return Gated(Add(f"resid_post.{det.layers[-1]}", direction, alpha=alpha, positions="producing"), det)


#: kept for callers of the old name (the gate is now an engine edit, installed with ``steer``)
TruthfulGate = truthful_gate


# ----------------------------------------------------------------------------- the method
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
                    candidates: Sequence[Sequence[int]], probe_cs: Sequence[float]
                    ) -> tuple[dict[str, Any], list[dict[str, Any]], tuple[np.ndarray, np.ndarray, np.ndarray, float]]:
    """Every (layers, C) candidate fitted on ``train`` and scored by AUROC on ``val``; returns the pick (best
    AUROC, then fewer blocks, then smaller C), every candidate's record, and the pick's fit."""
    records, best_fit, pick = [], None, None
    for cand in candidates:
        for c in probe_cs:
            fit = fit_detector(feats, cand, y, train, c)
            rec = {"layers": list(cand), "C": c, "val_auroc": _auroc(detector_scores(feats, cand, val, *fit), y[val])}
            records.append(rec)
            key = (rec["val_auroc"], -len(rec["layers"]), -rec["C"])
            if pick is None or key > (pick["val_auroc"], -len(pick["layers"]), -pick["C"]):
                pick, best_fit = rec, fit
    assert pick is not None and best_fit is not None
    return pick, records, best_fit


@register_method
class TruthPrInt(Method):
    """TruthPrInt: a per-token hallucination probe gates a truthful-direction shift during decoding."""

    name = "truthprint"
    summary = ("per-token hallucination probe on resid_post gates a truthful-direction pre-intervention at the "
               "token-producing position (prompt answer token and every generated token)")

    def fit(self, model: Any, data: Sequence[YesNoQuestion] | None = None, *, n_images: int = 1000,
            seed: int = TRUTHPRINT_FIT_SEED,
            layers: Sequence[int] | None = None, direction: str = "truthful_answer",
            probe_cs: Sequence[float] = (0.1, 1.0),
            thresholds: Sequence[float] = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95),
            alphas: Sequence[float] = (0.25, 0.5, 0.75, 1.0, 1.5),
            max_recall_drop: float = 0.03, **kw: Any) -> FittedIntervention:
        """Fit the detector and direction, then choose (threshold, alpha) on the held-out fit split.

        ``data``: :class:`~haltrace.data.YesNoQuestion` items with images (``category="partner"`` marks absent
        co-occurring objects, the selection's target; without any, every absent object counts). Default: the
        model's data source (an organism's fresh questions, ``n_images`` images drawn with ``seed``).
        """
        if kw:
            raise TypeError(f"unexpected arguments {sorted(kw)}")
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        source = data
        if data is None:
            data = default_fit_data(model, self.name, n_images=n_images, seed=seed)
        questions = of_kind(data, YesNoQuestion, method=self.name)
        hooks = [f"resid_post.{i}" for i in range(model.n_layers)]
        logits, acts = question_states(model, questions, hooks)
        says = says_yes(model, logits)
        present = np.array([q.present for q in questions])
        held = image_split(image_ids_of(questions), seed=seed)
        yes_rows = says
        y = (~present).astype(int)  # 1 = hallucinated when the answer is "yes"
        train, val = yes_rows & ~held, yes_rows & held
        if y[train].sum() < 5 or (1 - y[train]).sum() < 5 or y[val].sum() < 2:
            raise ValueError(f"too few hallucinated 'yes' answers to fit a detector ({int(y[yes_rows].sum())} "
                             f"of {int(yes_rows.sum())} 'yes' answers); pass more data or n_images")
        # detector candidates: each single block, and each run of blocks ending at the last one (the gate reads
        # their states at the producing position and shifts at the deepest); C from probe_cs; best held-out AUROC
        n = model.n_layers
        feats = {i: acts[f"resid_post.{i}"].numpy() for i in range(n)}
        if layers is not None:
            candidates_l = [sorted({int(x) for x in layers})]
        else:
            candidates_l = [[i] for i in range(n)] + [list(range(i, n)) for i in range(n - 1)]
        pick, scores_l, (mean, scale, weight, bias) = select_detector(feats, y, train, val, candidates_l, probe_cs)
        det_layers, probe_c = pick["layers"], pick["C"]
        chosen = det_layers[-1]
        x = acts[f"resid_post.{chosen}"]

        fit_rows = torch.from_numpy(~held)
        halluc = torch.from_numpy(says & ~present) & fit_rows
        real = torch.from_numpy(says & present) & fit_rows
        truthful_no = torch.from_numpy(~says & ~present) & fit_rows
        if int(truthful_no.sum()) < 2:
            raise ValueError("the model never answers 'no' to an absent object in the fit data: no truthful states")
        candidates = {
            "truthful_answer": x[truthful_no].mean(0) - x[halluc].mean(0),
            "real_minus_hallucinated": x[real].mean(0) - x[halluc].mean(0),
        }
        # detector weight on the shifted block, in residual coordinates
        w_res = torch.as_tensor((weight / scale)[-model.hidden_size:], dtype=torch.float32)
        candidates["probe"] = -w_res / w_res.norm() * candidates["truthful_answer"].norm()
        d = candidates[direction]
        cosines = {f"{a}~{b}": float(torch.nn.functional.cosine_similarity(candidates[a], candidates[b], dim=0))
                   for a, b in (("truthful_answer", "real_minus_hallucinated"), ("truthful_answer", "probe"),
                                ("real_minus_hallucinated", "probe"))}

        # choose (threshold, alpha) on the held-out fit questions: false yes on absent *partners* (the
        # co-occurrence hallucination POPE-adversarial probes) against recall on present objects
        val_q = [q for q, h in zip(questions, held, strict=True) if h]
        val_present = present[held]
        val_partner = np.array([q.category == "partner" for q in val_q])
        if not val_partner.any():
            val_partner = ~val_present  # no partner questions given: all absent objects
        base_yes = says[held]
        # Exact and cheap: questions are independent and the detector reads states the shift cannot change, so
        # one forward per alpha with the gate always open gives every threshold's answers (fired -> shifted).
        p_val = LinearDetector(det_layers, mean, scale, weight, bias, threshold=0.0).probability(
            torch.from_numpy(detector_rows(feats, det_layers, held))).numpy()
        shifted = {}
        for a in alphas:
            with steer(model, truthful_gate(det_layers, mean, scale, weight, bias, d, alpha=a, threshold=0.0)):
                lg, _ = question_states(model, val_q, [])
            shifted[a] = says_yes(model, lg)
        grid = []
        for t in thresholds:
            for a in alphas:
                yes = np.where(p_val > t, shifted[a], base_yes)
                grid.append({"threshold": t, "alpha": a, "false_yes_partner": float(yes[val_partner].mean()),
                             "false_yes_absent": float(yes[~val_present].mean()),
                             "recall": float(yes[val_present].mean()), "fired": float((p_val > t).mean())})
        base = {"false_yes_partner": float(base_yes[val_partner].mean()),
                "false_yes_absent": float(base_yes[~val_present].mean()), "recall": float(base_yes[val_present].mean())}
        ok = [g for g in grid if base["recall"] - g["recall"] <= max_recall_drop]
        best = min(ok, key=lambda g: (g["false_yes_partner"], -g["recall"], g["alpha"])) if ok else None
        if best is None:  # nothing keeps recall: take the mildest setting, and say so in the provenance
            best = max(grid, key=lambda g: (g["recall"], -g["false_yes_partner"]))
        gate = truthful_gate(det_layers, mean, scale, weight, bias, d, alpha=best["alpha"], threshold=best["threshold"])
        spec = {"n_images": n_images, "seed": seed, "layers": det_layers, "direction": direction, "probe_c": probe_c,
                "threshold": best["threshold"], "alpha": best["alpha"]}
        provenance = {
            "method": self.name,
            "paper": PAPER,
            "faithfulness": ("no official code: detector, direction, gate and selection are haltrace choices; "
                             "no backtracking, no ComnHallu alignment"),
            "layer": {"haltrace": f"resid_post.{chosen}", "hf_hidden_states_index": chosen + 1,
                      "paper": "not released (an unofficial 13B reproduction used layer 20 of 40)"},
            "detector": {"type": "logistic regression on standardised resid_post (concatenated blocks)",
                         "layers": [f"resid_post.{i}" for i in det_layers], "C": probe_c,
                         "labels": "model's 'yes' answers; 1 = object absent (hallucinated)",
                         "val_auroc": pick["val_auroc"], "candidates": scores_l,
                         "selection": "best held-out AUROC" if layers is None else "layers given"},
            "direction": {"kind": direction, "norm": float(d.norm()), "cosines": cosines,
                          "definition": {"truthful_answer": "mean(absent, says no) - mean(absent, says yes)",
                                         "real_minus_hallucinated": "mean(present, says yes) - mean(absent, says yes)",
                                         "probe": "-detector weight (residual coords), scaled to truthful_answer norm"
                                         }[direction]},
            "threshold": best["threshold"], "alpha": best["alpha"],
            "alpha_units": "multiples of the direction (alpha=1 = one class-mean difference)",
            "positions": "token-producing position only: last real prompt token at prefill, newest token per step",
            "phase": "both",
            "selection": {"rule": f"lowest fit-val false-yes on absent partners with recall drop <= "
                                  f"{max_recall_drop}",
                          "found": bool(ok), "baseline": base, "grid": grid},
            "data": {"description": "yes/no questions with images; 70/30 split by image (probe+direction / "
                                    "layer, threshold, alpha selection)",
                     "n_questions": len(questions), "n_yes": int(says.sum()),
                     "n_hallucinated_yes": int((says & ~present).sum()), "seed": seed,
                     "source": "given" if source is not None else "default (model's data source)",
                     "fingerprint": items_fingerprint(questions)},
            "fingerprint": fingerprint(d, weight, mean, scale, spec=spec),
        }
        return FittedIntervention(self.name, [gate], provenance)
