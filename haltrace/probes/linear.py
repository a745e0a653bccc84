"""Per-layer linear probes, fast: every layer, fold and regularisation strength solved as one batched problem.

What :func:`fit_probes` does for each layer (methods-llm-eval.md §3):

* **splits by group** (image, entity, question; never by row): ``n_folds`` stratified group folds for the
  held-out estimate, and inside each training part ``inner_folds`` group folds that pick ``C``;
* **standardises on the training rows only** (per fold), then fits L2 logistic regression (sklearn's
  objective: ``C * sum(log-loss) + ||w||^2 / 2``, unpenalised intercept) for every ``C`` in ``Cs``;
* a **mass-mean** probe ``theta = mu_1 - mu_0`` with the midpoint bias ``-theta . (mu_1 + mu_0) / 2``
  (Marks & Tegmark; without the bias uncentred activations lose ~20 points of accuracy);
* reports out-of-fold AUROC and accuracy (every row is scored by a model that never saw its group), and
  refits on all rows at the ``C`` that cross-validated best, returning weights in **residual units**.

Why it is fast: the solver is a batched damped Newton method in torch, run on all (layer, fold, split, C)
problems at once. When the width ``d`` exceeds ``max_dim`` the fit is **reduced-rank**, and says so
(``info["reduced_rank"]``, ``info["rank"]``; ``haltrace probe`` writes them to ``probes.json``): each fold's
standardised features are projected onto ``max_dim - 1`` principal directions of that fold's training rows (a
randomised range finder on a row subsample; features only, no labels) plus **the fit's own** class-mean gap,
computed from the labels of the rows that fit trains on. An inner split that chooses C therefore never sees
its validation rows' labels, not even through its basis (the gap of the whole training part, or of another
inner split, would carry them). Under a spiked covariance (a few large directions plus isotropic noise: what
residual streams look like) the ridge / logistic solution ``(Sigma + lambda I)^-1 Delta mu`` lies close to
that span, so little is lost, and the data is read only a few times. With ``d <= max_dim`` no projection
happens and the result matches scikit-learn's ``StandardScaler + LogisticRegression`` (tested);
``exact=True`` (``haltrace probe --exact``) runs scikit-learn itself on all features, for spot checks.

Fidelity (methods-llm-eval.md §3, methods-fidelity.md §5):

| practice / reference | haltrace | same? |
|---|---|---|
| sklearn L2 logistic regression, ``C * sum(loss) + ‖w‖² / 2``, unpenalised intercept | :func:`_newton` | same optimum when ``d <= max_dim`` (tested against sklearn); reduced-rank above it (recorded) |
| sklearn on all features | ``exact=True`` | same (it is sklearn: ``LogisticRegression``, lbfgs) |
| split by group, stratified (``StratifiedGroupKFold``) | :func:`group_folds` | same rule, vectorised; fold assignment differs from sklearn's |
| nested CV: C chosen inside each training part, every inner step fitted on its own training rows | :func:`_split_masks`, :func:`_layer_features` | same: standardisation and principal directions use the outer training part's features (no labels); every label-dependent step uses only the fit's own training rows |
| standardise on training rows only | :func:`_moments` | same |
| mass-mean probe with midpoint bias (Marks & Tegmark) | ``mm_*`` | same |
| Marks & Tegmark's ``Sigma^-1 theta`` (LDA) probe; per-data-set centring | (none) | missing |
| report one held-out metric | ``auroc`` per layer; ``run_probe``'s ``best_auroc`` is the max over layers | different: the max over layers is optimistic; the per-layer values are not |

Example
-------
>>> import torch
>>> y = torch.arange(200) % 2
>>> X = torch.randn(3, 200, 16) + y[None, :, None] * torch.tensor([0.0, 0.5, 2.0])[:, None, None]
>>> sweep = fit_probes(X, y, n_folds=4, inner_folds=2, seed=0)
>>> sweep.auroc.shape, bool(sweep.auroc[2] > sweep.auroc[0])
(torch.Size([3]), True)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from haltrace.errors import InputError
from haltrace.metrics import auroc  # noqa: F401  (the batched AUROC probes report; one copy)

#: default grid of inverse regularisation strengths (sklearn's C), ascending
DEFAULT_CS: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0)


@dataclass
class ProbeSweep:
    """Per-layer results of :func:`fit_probes` (index ``i`` = the ``i``-th layer given).

    ``auroc``/``accuracy``: out-of-fold logistic-regression metrics; ``mm_*``: the mass-mean probe's.
    ``weight``/``bias``: the final logistic probe in residual units (``score = x @ weight[i] + bias[i]``,
    positive = label 1); ``mm_direction``/``mm_bias``: ``mu_1 - mu_0`` and its midpoint bias; ``mean``/``std``:
    the standardisation of all rows; ``C``: the refit's C; ``oof``: out-of-fold logistic scores ``[L, n]``.
    """

    auroc: torch.Tensor
    accuracy: torch.Tensor
    mm_auroc: torch.Tensor
    mm_accuracy: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    mm_direction: torch.Tensor
    mm_bias: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    C: torch.Tensor
    oof: torch.Tensor
    fold_C: torch.Tensor  # [L, n_folds] the C each outer fold picked by inner CV
    info: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- metrics
def accuracy(scores: torch.Tensor, y: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """Fraction of rows with ``(score > threshold) == y`` over the last dim."""
    return ((scores > threshold).long() == y.long()).double().mean(-1)


# ----------------------------------------------------------------------------------------------- splits
def group_folds(y: np.ndarray, groups: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Fold id per row: every group in exactly one fold, folds stratified by each group's label mix.

    Groups are sorted by their fraction of label 1 (random order among equals) and dealt out in blocks of
    ``n_folds``, each block to a random permutation of the folds: every fold gets groups from every part of
    the label distribution and about the same number of groups. Vectorised; sklearn's StratifiedGroupKFold
    loops over groups in Python and took seconds on 2,500 groups.

    >>> group_folds(np.array([0, 1] * 4), np.arange(8) // 2, 2, 0).shape
    (8,)
    """
    uniq, inverse = np.unique(np.asarray(groups), return_inverse=True)
    if len(uniq) < n_folds:
        raise InputError(f"only {len(uniq)} groups for {n_folds} folds; every fold needs its own groups. Use fewer "
                         f"folds (e.g. --folds {max(2, len(uniq))}) or a data set with more groups (images/entities)")
    rng = np.random.default_rng(seed)
    frac = np.bincount(inverse, weights=np.asarray(y, dtype=float)) / np.bincount(inverse)
    order = rng.permutation(len(uniq))
    order = order[np.argsort(frac[order], kind="stable")]
    blocks = -(-len(uniq) // n_folds)
    deal = np.concatenate([rng.permutation(n_folds) for _ in range(blocks)])[:len(uniq)]
    fold_of_group = np.empty(len(uniq), dtype=np.int64)
    fold_of_group[order] = deal
    return fold_of_group[inverse]


def _split_masks(y: np.ndarray, groups: np.ndarray, n_folds: int, inner_folds: int, seed: int):
    """-> outer fold ids [n] and train masks [K+1, Q, n] (Q = inner splits + the whole training part).

    Row ``K`` of the first axis is the final refit (all rows); its inner splits are unused placeholders.
    """
    n = len(y)
    outer = group_folds(y, groups, n_folds, seed)
    masks = np.zeros((n_folds + 1, inner_folds + 1, n), dtype=bool)
    for f in range(n_folds):
        train = outer != f
        inner = np.full(n, -1)
        inner[train] = group_folds(y[train], groups[train], inner_folds, seed + 1 + f)
        for j in range(inner_folds):
            masks[f, j] = train & (inner != j)
        masks[f, inner_folds] = train
    masks[n_folds, :] = True
    for f in range(n_folds + 1):
        for q in range(inner_folds + 1):
            classes = set(y[masks[f, q]].tolist())
            if len(classes) < 2:
                raise InputError(f"a training split holds only label {classes}; each class needs rows in several "
                                 f"groups. Use fewer folds or add examples of the rarer class")
    return outer, masks


# ------------------------------------------------------------------------------------------------ solver
#: torch's worker threads spin-wait for a core, so on a busy machine small ops (QR of a [6, 1024, 48] stack,
#: elementwise work on a few million floats) run ~20-100x slower with 2 threads than with 1 (measured on 2
#: shared cores). The solver therefore runs single-threaded; only GEMMs this large use every thread.
BIG_GEMM = 2e9  # multiply-adds
BIG_SOLVE = 1e7  # rows x problems in one Newton solve: above this, use every torch thread
_THREADS = {"all": 1}


@contextmanager
def _single_thread() -> Iterator[None]:
    """Run the block with one torch thread (restored afterwards); :func:`_mm` still uses all for big GEMMs."""
    before = torch.get_num_threads()
    _THREADS["all"] = before
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b``, with every thread when the product is big enough to be worth it."""
    if a.shape[0] * a.shape[-1] * b.shape[-1] < BIG_GEMM or _THREADS["all"] <= 1:
        return a @ b
    torch.set_num_threads(_THREADS["all"])
    try:
        return a @ b
    finally:
        torch.set_num_threads(1)


def _newton(Z: torch.Tensor, y: torch.Tensor, masks: torch.Tensor, Cs: torch.Tensor, *, max_iter: int = 30,
            tol: float = 1e-5, hessian_rows: int = 2048, chunk_bytes: float = 80e6,
            feature_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Batched L2 logistic regression: ``Z [G, n, k]``, ``masks [G, Q, n]`` -> weights ``[G, Q*nC, k+1]``.

    Problem ``(g, q, c)`` minimises ``mean_{train rows}(log-loss) + ||w||^2 / (2 C_c n_train)`` (the same
    minimiser as sklearn's objective; the intercept, last entry, is not penalised). Damped Newton with a
    backtracking step per problem; Hessians are ``(k+1)^2`` each, so this is for small ``k``. With more than
    ``hessian_rows`` rows the Hessian is estimated on a fixed random subset of rows (sub-sampled Newton): the
    gradient and the line search stay exact, so the solution is the exact optimum; only the path differs.
    Groups are solved in chunks of about ``chunk_bytes`` per ``[g, n, P]`` temporary, which keeps allocations
    small enough for the allocator to reuse (huge temporaries cost page faults on every iteration).

    ``feature_mask [Q, k]`` (bool), when given, restricts split ``q``'s problems to the columns where it is
    True: the other weights stay exactly 0 (their gradient is zeroed and their Hessian block is the identity).
    The reduced-rank path uses it so that each split sees only its own class-mean gap column.
    """
    G, n, k = Z.shape
    P = masks.shape[1] * Cs.numel()
    if feature_mask is not None and tuple(feature_mask.shape) != (masks.shape[1], k):
        raise ValueError(f"feature_mask must be [Q={masks.shape[1]}, k={k}], got {tuple(feature_mask.shape)}")
    per_group = 4 * (n * P + min(n, hessian_rows) * (k + 1) ** 2)
    step = max(1, int(chunk_bytes // per_group))
    return torch.cat([_newton_chunk(Z[g:g + step], y, masks[g:g + step], Cs, max_iter, tol, hessian_rows,
                                    feature_mask) for g in range(0, G, step)])


def _newton_chunk(Z: torch.Tensor, y: torch.Tensor, masks: torch.Tensor, Cs: torch.Tensor, max_iter: int,
                  tol: float, hessian_rows: int, feature_mask: torch.Tensor | None = None) -> torch.Tensor:
    G, n, k = Z.shape
    Q, nC = masks.shape[1], Cs.numel()
    # per-problem free coordinates (weights + the intercept, always free); None = all free
    free = (None if feature_mask is None else
            torch.cat([feature_mask.bool(), torch.ones(Q, 1, dtype=torch.bool)], dim=1).repeat_interleave(nC, 0))
    Za = torch.cat([Z, torch.ones(G, n, 1, dtype=Z.dtype)], dim=2)  # [G, n, k+1]
    m = masks.to(Z.dtype).repeat_interleave(nC, dim=1)  # [G, P, n], problem p = q*nC + c
    n_train = m.sum(-1, keepdim=True)  # [G, P, 1]
    w_row = (m / n_train).transpose(1, 2).contiguous()  # [G, n, P] per-row weight of each problem's mean loss
    lam = 1.0 / (Cs.to(Z.dtype).repeat(Q)[None, :, None] * n_train)  # [G, P, 1]
    pen = torch.ones(k + 1, dtype=Z.dtype)
    pen[-1] = 0.0  # intercept unpenalised
    target = y.to(Z.dtype)[None, :, None].expand(G, n, Q * nC)
    base = (m * y.to(Z.dtype)).sum(-1) / n_train[..., 0]
    W = torch.zeros(G, Q * nC, k + 1, dtype=Z.dtype)
    W[..., -1] = torch.log(base.clamp(1e-6, 1 - 1e-6) / (1 - base).clamp(1e-6, 1 - 1e-6))
    sub = (torch.randperm(n, generator=torch.Generator().manual_seed(0))[:hessian_rows]
           if n > hessian_rows else torch.arange(n))
    ws = (w_row[:, sub] * (n / len(sub))).transpose(1, 2)  # [G, P, rows]
    # Hessian = curvature-weighted sum of row outer products: precompute them once, so each iteration's
    # Hessians for all problems are one GEMM [P, rows] @ [rows, (k+1)^2] (no gathers: those are slow on CPU)
    Zs = Za[:, sub]
    outer = (Zs[:, :, :, None] * Zs[:, :, None, :]).reshape(G, len(sub), (k + 1) ** 2)
    ridge = (lam[..., None] * torch.diag(pen)).double() + 1e-10 * torch.eye(k + 1, dtype=torch.float64)

    def loss(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = torch.bmm(Za, W.transpose(1, 2))  # [G, n, P]
        ll = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, weight=w_row, reduction="none")
        return ll.sum(1, dtype=torch.float64) + 0.5 * lam[..., 0].double() * (W * W * pen).sum(-1).double(), logits

    current, logits = loss(W)
    active = torch.ones(G, Q * nC, dtype=torch.bool)
    for _ in range(max_iter):
        p = torch.sigmoid(logits)
        grad = torch.bmm(Za.transpose(1, 2), (p - target) * w_row).transpose(1, 2) + lam * W * pen  # [G, P, k+1]
        ps = p[:, sub].transpose(1, 2)
        curv = ps * (1 - ps) * ws  # [G, P, rows]
        H = torch.bmm(curv, outer).view(G, Q * nC, k + 1, k + 1).double()
        if free is not None:  # fixed coordinates: zero gradient, identity Hessian block -> zero step
            grad = grad * free
            pair = free[:, :, None] & free[:, None, :]
            H = torch.where(pair, H, torch.eye(k + 1, dtype=H.dtype).expand_as(H))
        direction = torch.linalg.solve(H + ridge, grad.double().unsqueeze(-1)).squeeze(-1).to(Z.dtype)
        direction = direction * active[..., None]
        decrease = (grad * direction).sum(-1).double()  # the directional derivative is -decrease
        alpha = torch.ones(G, Q * nC, 1, dtype=Z.dtype)
        for _ in range(10):  # Armijo backtracking per problem; the slack absorbs float32 rounding of the loss
            trial, trial_logits = loss(W - alpha * direction)
            ok = (trial <= current - 1e-4 * alpha[..., 0].double() * decrease + 1e-7 * current.abs()) | ~active
            if bool(ok.all()):
                break
            alpha = torch.where(ok[..., None], alpha, alpha * 0.5)
        else:  # no decrease found: those problems are at float precision already; keep their weights
            alpha = torch.where(ok[..., None], alpha, torch.zeros_like(alpha))
            trial, trial_logits = loss(W - alpha * direction)
        W = W - alpha * direction
        moved = (alpha * direction).abs().amax(-1)
        # stop a problem once the Newton decrement (its predicted remaining loss reduction) is negligible
        active = (active & (grad.abs().amax(-1) > tol) & (decrease > 1e-9)
                  & (moved > 1e-6 * (1 + W.abs().amax(-1))))
        current, logits = trial, trial_logits
        if not bool(active.any()):
            break
    return W


# ----------------------------------------------------------------------------------------------- probes
def _moments(X: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the rows of ``X [n, d]`` under each mask ``[F, n]`` (std of constant features -> 1)."""
    centre = X.mean(0)
    Xc = X - centre  # centred first: one-pass variance of large-offset features would cancel catastrophically
    mf = masks.to(X.dtype)
    count = mf.sum(1, keepdim=True)
    s1 = mf @ Xc / count
    s2 = mf @ Xc.square_() / count  # in place: one [n, d] temporary per layer, not two
    std = (s2 - s1 * s1).clamp_min(0).sqrt()
    std = torch.where(std > 1e-6 * std.amax(1, keepdim=True).clamp_min(1e-12), std, torch.ones_like(std))
    return s1 + centre, std


def _class_means(X: torch.Tensor, y: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-1 and class-0 means of ``X`` under each mask ``[F, n]`` -> two ``[F, d]``."""
    yf = y.to(X.dtype)
    m1 = masks.to(X.dtype) * yf
    m0 = masks.to(X.dtype) * (1 - yf)
    both = _mm(torch.cat([m1, m0]), X)
    F = masks.shape[0]
    return both[:F] / m1.sum(1, keepdim=True), both[F:] / m0.sum(1, keepdim=True)


def _layer_features(X: torch.Tensor, y: torch.Tensor, masks: torch.Tensor, max_dim: int, n_sketch: int,
                    gen: torch.Generator):
    """One layer -> (Z [K+1, n, k], basis [K+1, d, k] or None, mean, std [K+1, d], mm scores [K+1, n], theta, bias,
    feature mask [Q, k] or None).

    Exact path (``d <= max_dim``): ``Z`` holds the standardised features themselves, every problem uses them all.

    Reduced path: fold ``f``'s columns are ``k_pca = max_dim - 1`` orthonormal principal directions of its
    standardised training part (label-free: features only, never labels), followed by one column per split
    ``q``: split ``q``'s own class-mean gap (from its own training rows' labels), orthogonalised against the
    principal directions only and normalised. Problem ``(f, q)`` may use the principal columns and its own gap
    column (the feature mask), so it has rank ``max_dim`` and no label of its validation rows enters its
    features: the gap of the whole training part, or of another inner split, would contain them.
    """
    K1, Q, n = masks.shape
    train = masks[:, -1]  # [K+1, n] each fold's whole training part
    mean, std = _moments(X, train)  # label-free: training part's features only
    mu1, mu0 = _class_means(X, y, masks.reshape(K1 * Q, n))  # each split's own labels
    mu1, mu0 = mu1.view(K1, Q, -1), mu0.view(K1, Q, -1)
    theta = mu1[:, -1] - mu0[:, -1]  # raw mass-mean direction per fold
    mm_bias = -(theta * (mu1[:, -1] + mu0[:, -1]) / 2).sum(-1)
    d = X.shape[1]
    if d <= max_dim:  # exact: the standardised features themselves
        Z = (X[None] - mean[:, None]) / std[:, None]
        mm = X @ theta.T + mm_bias
        return Z, None, mean, std, mm.T, theta, mm_bias, None
    k_pca = max_dim - 1
    rows = torch.randperm(n, generator=gen)[:min(n, n_sketch)]
    Xs = X[rows]
    omega = torch.randn(d, k_pca, generator=gen, dtype=X.dtype)
    inv = 1.0 / std  # [K+1, d]
    # randomised range finder, per fold: Y_f = ((Xs - m_f) / s_f) @ omega on fold f's training rows only
    Y = _mm(Xs, (omega[None] * inv[:, :, None]).permute(1, 0, 2).reshape(d, K1 * k_pca)).view(len(rows), K1, k_pca)
    Y = Y - ((mean * inv) @ omega)[None]
    Y = Y * train[:, rows].T[..., None].to(X.dtype)  # only each fold's training rows
    A = _mm(Xs.T, Y.reshape(len(rows), K1 * k_pca)).view(d, K1, k_pca).permute(1, 0, 2)  # [K+1, d, k_pca]
    A = (A - mean[:, :, None] * Y.sum(0)[:, None, :]) * inv[:, :, None]
    pcs = torch.linalg.qr(A).Q  # [K+1, d, k_pca] orthonormal, label-free
    gaps = ((mu1 - mu0) * inv[:, None, :]).transpose(1, 2)  # [K+1, d, Q] standardised class-mean gaps
    # each gap is orthogonalised against the principal directions only, never against another split's gap
    resid = gaps - pcs @ (pcs.transpose(1, 2) @ gaps)
    size = resid.norm(dim=1, keepdim=True)
    keep = size > 1e-6 * gaps.norm(dim=1, keepdim=True).clamp_min(1e-12)  # a gap inside the PCs adds nothing
    resid = torch.where(keep, resid / size.clamp_min(1e-30), torch.zeros_like(resid))
    basis = torch.cat([pcs, resid], dim=2)  # [K+1, d, k_pca + Q]
    k = basis.shape[2]
    feature_mask = torch.zeros(Q, k, dtype=torch.bool)
    feature_mask[:, :k_pca] = True
    feature_mask[torch.arange(Q), k_pca + torch.arange(Q)] = True
    proj = torch.cat([(basis * inv[:, :, None]).permute(1, 0, 2).reshape(d, K1 * k), theta.T], dim=1)
    out = _mm(X, proj)  # one pass over the layer: every fold's features and mass-mean scores
    Z = out[:, :K1 * k].view(n, K1, k).permute(1, 0, 2) - ((mean * inv)[:, None, :] @ basis)
    mm = out[:, K1 * k:].T + mm_bias[:, None]
    return Z.contiguous(), basis, mean, std, mm, theta, mm_bias, feature_mask


def _check_inputs(X: Any, y: Sequence[int] | torch.Tensor, groups: Sequence | None, n_folds: int,
                  inner_folds: int, Cs: Sequence[float], max_dim: int):
    y_np = np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y).astype(np.int64)
    if set(np.unique(y_np).tolist()) != {0, 1}:
        raise InputError(f"labels must be 0 and 1 with both present, got values {sorted(set(y_np.tolist()))}")
    n = len(y_np)
    g_np = np.arange(n) if groups is None else np.asarray([str(g) for g in groups])
    if len(g_np) != n:
        raise InputError(f"got {n} labels and {len(g_np)} groups; give one group id per row")
    if n_folds < 2 or inner_folds < 2:
        raise InputError(f"n_folds={n_folds}, inner_folds={inner_folds}: each needs at least 2 folds "
                         f"(--folds 5 --inner-folds 3 are the defaults)")
    if not Cs or any(not float(c) > 0 for c in Cs):
        raise InputError(f"Cs={list(Cs)}: give one or more positive inverse regularisation strengths")
    if max_dim < 2:
        raise InputError(f"max_dim={max_dim}: the reduced basis needs at least 2 dimensions (one principal "
                         f"direction plus the class-mean gap); use --max-dim 128 (default) or --exact")
    if len(X) == 0:
        raise InputError("X holds no layers")
    return y_np, g_np, n


def fit_probes(X: torch.Tensor | Sequence[torch.Tensor], y: Sequence[int] | torch.Tensor,
               groups: Sequence | None = None, *, n_folds: int = 5, inner_folds: int = 3,
               Cs: Sequence[float] = DEFAULT_CS, max_dim: int = 128, n_sketch: int = 1024, seed: int = 0,
               exact: bool = False, progress: Callable[[int], None] | None = None) -> ProbeSweep:
    """Fit and evaluate logistic and mass-mean probes on every layer.

    Args:
        X: ``[L, n, d]`` float tensor, or a sequence of ``L`` tensors ``[n, d]`` (indexed one layer at a time,
            so a lazy sequence keeps one layer in memory).
        y: binary labels (0/1) per row. groups: group id per row (rows of a group never straddle train and
            test); ``None`` makes each row its own group.
        n_folds / inner_folds: outer folds (held-out metrics) / inner folds (choose C inside each training part).
        Cs: inverse L2 strengths, as sklearn's ``C``. max_dim: widths above this are fitted at reduced rank
            ``max_dim`` per fold (see the module docstring; ``info["reduced_rank"]`` says so). seed: fixes folds
            and sketches.
        exact: fit scikit-learn's ``LogisticRegression`` (lbfgs) on all ``d`` standardised features instead of
            the batched solver, same folds, same C selection (slow for wide layers: a spot check).
        progress: called with 1 after each layer's features are ready.

    ``info`` records ``solver``, ``reduced_rank`` (True when ``d > max_dim`` and not ``exact``), ``rank`` (the
    dimension each logistic fit had) and ``max_dim``.

    >>> sweep = fit_probes(torch.randn(2, 60, 8), [0, 1] * 30, n_folds=3, inner_folds=2)  # doctest: +SKIP
    """
    y_np, g_np, n = _check_inputs(X, y, groups, n_folds, inner_folds, Cs, max_dim)
    outer, masks_np = _split_masks(y_np, g_np, n_folds, inner_folds, seed)
    if exact:
        return _fit_probes_exact(X, y_np, g_np, outer, masks_np, n_folds, inner_folds, Cs, max_dim, seed, progress)
    masks = torch.from_numpy(masks_np)
    yt = torch.from_numpy(y_np)
    Cs_t = torch.tensor(sorted(Cs), dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    L, K = len(X), n_folds
    # every layer's features go straight into two preallocated tensors: the outer folds' [L, K, n, k] (a
    # contiguous [L*K, n, k] for the batched solve, no copy) and the final fit's [L, n, k]
    Zout: torch.Tensor | None = None
    Zfin: torch.Tensor | None = None
    fmask: torch.Tensor | None = None
    bases, means, stds, mms, thetas, mm_biases = [], [], [], [], [], []
    for i in range(len(X)):  # one layer in memory at a time when X is a lazy sequence
        Xl = X[i].float()
        if Xl.dim() != 2 or Xl.shape[0] != n:
            raise InputError(f"each layer must be [n={n}, d], got {tuple(Xl.shape)}")
        with _single_thread():
            Z, basis, mean, std, mm, theta, mm_bias, fm = _layer_features(Xl, yt, masks, max_dim, n_sketch, gen)
        if Zout is None:
            Zout = torch.empty(L, K, *Z.shape[1:], dtype=Z.dtype)
            Zfin = torch.empty(L, *Z.shape[1:], dtype=Z.dtype)
            fmask = fm
        elif tuple(Z.shape[1:]) != tuple(Zout.shape[2:]):
            raise InputError(f"layer {i} is {Xl.shape[1]} wide, layer 0 is {X[0].shape[-1]}; every layer must "
                             "have the same width")
        Zout[i] = Z[:K]
        Zfin[i] = Z[K]
        del Z
        bases.append(None if basis is None else basis[-1].clone())  # only the final (all-rows) basis is used
        del basis
        means.append(mean)
        stds.append(std)
        mms.append(mm)
        thetas.append(theta)
        mm_biases.append(mm_bias)
        if progress is not None:
            progress(1)
    assert Zout is not None and Zfin is not None
    k = Zout.shape[-1]
    nC = Cs_t.numel()
    # outer folds: inner splits + whole training part, all Cs; final: whole data, all Cs. On large sweeps the
    # solver's [groups, rows, problems] tensors are big enough for every thread to pay off (bench: 1.4x on 2
    # cores); small sweeps such as the organism's stay on one thread, which is faster on a busy machine.
    big = L * K * n * masks.shape[1] * nC >= BIG_SOLVE
    with nullcontext() if big else _single_thread():
        W_out = _newton(Zout.view(L * K, n, k), yt, masks[:K].repeat(L, 1, 1), Cs_t, feature_mask=fmask)
        W_fin = _newton(Zfin, yt, masks[K:, -1:].expand(L, 1, n), Cs_t,
                        feature_mask=None if fmask is None else fmask[-1:])
    del Zfin
    # scores one layer at a time (the same per-matrix products as one [L*K, n, k+1] bmm, without that copy)
    W_l = W_out.view(L, K, *W_out.shape[1:])
    scores = torch.stack([torch.bmm(torch.cat([Zout[i], torch.ones(K, n, 1)], dim=-1), W_l[i].transpose(1, 2))
                          for i in range(L)]).view(L, K, n, inner_folds + 1, nC)
    del Zout
    choice, oof, full, final_c, mm_oof = _select(scores, yt, masks, outer, mms, inner_folds)
    # final probe back to residual units: score = (x - mean)/std @ w_std + b
    rows = torch.arange(L)
    beta = W_fin[rows, final_c]  # [L, k+1]
    weight, bias = [], []
    for i in range(L):
        w_std = beta[i, :-1] if bases[i] is None else bases[i] @ beta[i, :-1]
        w = w_std / stds[i][K]
        weight.append(w)
        bias.append(beta[i, -1] - (w * means[i][K]).sum())
    reduced = bases[0] is not None
    rank = max_dim if reduced else int(X[0].shape[-1])
    return ProbeSweep(
        auroc=auroc(oof, yt).float(), accuracy=accuracy(oof, yt).float(),
        mm_auroc=auroc(mm_oof, yt).float(), mm_accuracy=accuracy(mm_oof, yt).float(),
        weight=torch.stack(weight), bias=torch.stack(bias),
        mm_direction=torch.stack([t[K] for t in thetas]), mm_bias=torch.stack([b[K] for b in mm_biases]),
        mean=torch.stack([m[K] for m in means]), std=torch.stack([s[K] for s in stds]),
        C=Cs_t[final_c], oof=oof, fold_C=Cs_t[choice],
        info={"n": n, "n_folds": K, "inner_folds": inner_folds, "Cs": Cs_t.tolist(), "reduced_dim": rank
              if reduced else None, "n_groups": int(len(np.unique(g_np))), "seed": seed,
              "solver": "batched damped Newton (haltrace)", "reduced_rank": reduced, "rank": rank,
              "max_dim": max_dim, "d": int(X[0].shape[-1])},
    )


def _select(scores: torch.Tensor, yt: torch.Tensor, masks: torch.Tensor, outer: np.ndarray, mms: list[torch.Tensor],
            inner_folds: int):
    """C per outer fold by inner-validation AUROC, out-of-fold scores, the final C, mass-mean out-of-fold scores.

    ``scores [L, K, n, J+1, nC]``: split ``j < J`` of fold ``f`` was fitted on ``masks[f, j]``; ``J`` on the
    whole training part ``masks[f, J]``.
    """
    L, K, n = scores.shape[:3]
    nC = scores.shape[-1]
    # inner validation AUROC: split j of fold f validates on fold-f training rows outside split j
    valid = (masks[:K, -1:] & ~masks[:K, :inner_folds])  # [K, J, n]
    inner_scores = scores[..., :inner_folds, :].permute(0, 1, 3, 4, 2)  # [L, K, J, nC, n]
    inner_auc = auroc(inner_scores, yt, valid[None, :, :, None, :])
    choice = torch.nan_to_num(inner_auc, nan=0.5).mean(2).argmax(-1)  # [L, K], first max = smallest C
    outer_t = torch.from_numpy(outer)
    full = scores[..., inner_folds, :]  # [L, K, n, nC] outer-train fits
    picked = full.gather(-1, choice[:, :, None, None].expand(L, K, n, 1))[..., 0]  # [L, K, n]
    oof = picked.gather(1, outer_t[None, None, :].expand(L, 1, n))[:, 0]  # each row from its own fold's model
    oof_c = full.gather(1, outer_t[None, None, :, None].expand(L, 1, n, nC))[:, 0].permute(0, 2, 1)
    final_c = torch.nan_to_num(auroc(oof_c, yt), nan=0.5).argmax(-1)  # [L] C for the shipped probe
    mm_oof = torch.stack([m[:K].gather(0, outer_t[None])[0] for m in mms])
    return choice, oof, full, final_c, mm_oof


def _fit_probes_exact(X: Any, y_np: np.ndarray, g_np: np.ndarray, outer: np.ndarray, masks_np: np.ndarray,
                      K: int, inner_folds: int, Cs: Sequence[float], max_dim: int, seed: int,
                      progress: Callable[[int], None] | None) -> ProbeSweep:
    """:func:`fit_probes` with scikit-learn's ``StandardScaler`` + ``LogisticRegression`` on all features.

    Same folds, same protocol: each outer fold standardises on its training part, each inner split fits on
    its own training rows and is scored on the rest of the training part, C is the first best mean inner
    AUROC, the shipped probe is refit on all rows at the C with the best out-of-fold AUROC.
    """
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    masks = torch.from_numpy(masks_np)
    yt = torch.from_numpy(y_np)
    Cs_sorted = sorted(float(c) for c in Cs)
    Cs_t = torch.tensor(Cs_sorted, dtype=torch.float32)
    L, n, nC, J = len(X), len(y_np), len(Cs_sorted), inner_folds
    scores = torch.zeros(L, K, n, J + 1, nC, dtype=torch.float64)
    mms, thetas, mm_biases, unconverged = [], [], [], 0
    weight, bias, means, stds = [], [], [], []

    def lr(C: float, Xtr: np.ndarray, ytr: np.ndarray) -> Any:
        nonlocal unconverged
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            clf = LogisticRegression(C=C, max_iter=2000, tol=1e-6).fit(Xtr, ytr)
        unconverged += sum(issubclass(w.category, ConvergenceWarning) for w in caught)
        return clf

    for i in range(L):
        Xl = X[i].float()
        if Xl.dim() != 2 or Xl.shape[0] != n:
            raise InputError(f"each layer must be [n={n}, d], got {tuple(Xl.shape)}")
        x = Xl.double().numpy()
        # mass-mean: the same arithmetic as the batched path
        mu1, mu0 = _class_means(Xl, yt, masks[:, -1])
        theta = mu1 - mu0
        mm_bias = -(theta * (mu1 + mu0) / 2).sum(-1)
        mms.append((Xl @ theta.T + mm_bias).T)
        thetas.append(theta)
        mm_biases.append(mm_bias)
        for f in range(K):
            train = masks_np[f, -1]
            scaler = StandardScaler().fit(x[train])
            xs = scaler.transform(x)
            for q in range(J + 1):
                rows = masks_np[f, q]
                for c, C in enumerate(Cs_sorted):
                    scores[i, f, :, q, c] = torch.from_numpy(lr(C, xs[rows], y_np[rows]).decision_function(xs))
        # the shipped probe: all rows, at the C with this layer's best out-of-fold AUROC
        final_c = int(_select(scores[i:i + 1], yt, masks, outer, mms[i:i + 1], inner_folds)[3][0])
        scaler = StandardScaler().fit(x)
        clf = lr(Cs_sorted[final_c], scaler.transform(x), y_np)
        scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
        w = clf.coef_[0] / scale
        weight.append(torch.from_numpy(w).float())
        bias.append(torch.tensor(float(clf.intercept_[0] - (w * scaler.mean_).sum())))
        means.append(torch.from_numpy(scaler.mean_).float())
        stds.append(torch.from_numpy(scale).float())
        if progress is not None:
            progress(1)
    choice, oof, full, final_c, mm_oof = _select(scores, yt, masks, outer, mms, inner_folds)
    d = int(X[0].shape[-1])
    return ProbeSweep(
        auroc=auroc(oof, yt).float(), accuracy=accuracy(oof, yt).float(),
        mm_auroc=auroc(mm_oof, yt).float(), mm_accuracy=accuracy(mm_oof, yt).float(),
        weight=torch.stack(weight), bias=torch.stack(bias),
        mm_direction=torch.stack([t[K] for t in thetas]), mm_bias=torch.stack([b[K] for b in mm_biases]),
        mean=torch.stack(means), std=torch.stack(stds), C=Cs_t[final_c], oof=oof.float(), fold_C=Cs_t[choice],
        info={"n": n, "n_folds": K, "inner_folds": inner_folds, "Cs": Cs_sorted, "reduced_dim": None,
              "n_groups": int(len(np.unique(g_np))), "seed": seed,
              "solver": "scikit-learn LogisticRegression (lbfgs, L2) on all features", "reduced_rank": False,
              "rank": d, "max_dim": max_dim, "d": d, "unconverged_fits": unconverged},
    )


def majority_baseline(y: Sequence[int], groups: Sequence | None = None, *, n_folds: int = 5,
                      seed: int = 0) -> dict[str, float]:
    """Accuracy of predicting each outer fold's training majority class on its test rows (same folds); AUROC 0.5.

    >>> majority_baseline([0, 0, 0, 1] * 10, n_folds=2)["accuracy"]
    0.75
    """
    y_np = np.asarray(y).astype(np.int64)
    g_np = np.arange(len(y_np)) if groups is None else np.asarray([str(g) for g in groups])
    outer = group_folds(y_np, g_np, n_folds, seed)
    correct = 0
    for f in range(n_folds):
        majority = int(y_np[outer != f].mean() >= 0.5)
        correct += int((y_np[outer == f] == majority).sum())
    return {"auroc": 0.5, "accuracy": correct / len(y_np)}


def bag_of_tokens(token_ids: Sequence[Sequence[int]]) -> tuple[torch.Tensor, list[int]]:
    """Token-count features ``[n, V]`` over the token ids that occur, and those ids (the column order).

    >>> bag_of_tokens([[5, 7, 7], [7]])[0].tolist()
    [[1.0, 2.0], [0.0, 1.0]]
    """
    vocab = sorted({t for ids in token_ids for t in ids})
    column = {t: i for i, t in enumerate(vocab)}
    counts = torch.zeros(len(token_ids), max(1, len(vocab)))
    for r, ids in enumerate(token_ids):
        for t in ids:
            counts[r, column[t]] += 1
    return counts, vocab
