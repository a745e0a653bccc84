"""Scores shared by probes, steering methods and evaluations (imports only numpy and torch; scikit-learn inside
:func:`auroc_score`).

It sits at the bottom of haltrace's layers, beside :mod:`haltrace.conventions`, so every layer can import it.
Two forms of one statistic: :func:`auroc` scores many problems at once in torch (the probes' cross-validation);
:func:`auroc_score` scores one problem as a float with ``sklearn.metrics.roc_auc_score``, the reference
implementation (the steering methods' detector scores; bit for bit what their published fits recorded).

>>> auroc_score([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
0.75
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def auroc(scores: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Batched AUROC (Mann-Whitney, ties averaged) over the last dim; ``mask`` picks rows per problem.

    NaN where a problem's rows hold only one class. Equal to ``sklearn.metrics.roc_auc_score`` (up to float
    rounding: here the result is the exact rank statistic rounded once, in float64).

    >>> auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])).item()
    0.75
    >>> auroc(torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]), torch.tensor([0, 1, 1])).tolist()
    [1.0, 0.0]
    """
    scores = scores.double()
    y = y.to(scores.device).double().expand_as(scores)
    mask = torch.ones_like(scores, dtype=torch.bool) if mask is None else mask.expand_as(scores).bool()
    s = torch.where(mask, scores, torch.full_like(scores, float("inf")))  # excluded rows rank last
    ordered = s.sort(dim=-1).values.contiguous()
    lo = torch.searchsorted(ordered, s.contiguous(), right=False)
    hi = torch.searchsorted(ordered, s.contiguous(), right=True)
    rank = (lo + hi + 1).double() / 2  # average 1-based rank among ties
    pos = (y * mask).sum(-1)
    neg = ((1 - y) * mask).sum(-1)
    rank_sum = (rank * y * mask).sum(-1)
    out = (rank_sum - pos * (pos + 1) / 2) / (pos * neg)
    return torch.where((pos > 0) & (neg > 0), out, torch.full_like(out, float("nan")))


def auroc_score(scores: Any, labels: Any, *, single_class: float = float("nan")) -> float:
    """AUROC of one problem as a float: 1-D ``scores`` against 0/1 ``labels`` (arrays, tensors or lists), by
    ``sklearn.metrics.roc_auc_score``. Equal to :func:`auroc` up to float rounding (the last bit can differ).

    ``single_class`` is returned when the labels hold only one class (NaN by default; 0.5 = chance).

    >>> auroc_score([0.2, 0.2, 0.9], [0, 1, 1])
    0.75
    >>> auroc_score([0.3, 0.4], [1, 1], single_class=0.5)
    0.5
    """
    from sklearn.metrics import roc_auc_score

    s = _numpy(scores).reshape(-1)
    y = _numpy(labels).reshape(-1)
    if len(s) != len(y):
        raise ValueError(f"{len(s)} scores but {len(y)} labels")
    if not 0 < int((y == 1).sum()) < len(y):
        return float(single_class)
    return float(roc_auc_score(y, s))


def _numpy(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)
