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
problems at once. When the width ``d`` exceeds ``max_dim`` each fold's standardised features are first
projected onto a small basis: the top principal directions of that fold's training rows (a randomised
range finder on a row subsample) plus the class-mean differences of its training splits. Under a spiked
covariance (a few large directions plus isotropic noise: what residual streams look like) the ridge /
logistic solution ``(Sigma + lambda I)^-1 Delta mu`` lies in exactly that span, so little is lost, and the
data is read only a few times. With ``d <= max_dim`` no projection happens and the result matches
scikit-learn's ``StandardScaler + LogisticRegression`` (tested).

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

import numpy as np
import torch

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
def auroc(scores: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Batched AUROC (Mann-Whitney, ties averaged) over the last dim; ``mask`` picks rows per problem.

    NaN where a problem's rows hold only one class.

    >>> auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])).item()
    0.75
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
        raise ValueError(f"only {len(uniq)} groups for {n_folds} folds; every fold needs its own groups. Use fewer "
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
                raise ValueError(f"a training split holds only label {classes}; each class needs rows in several "
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
            tol: float = 1e-5, hessian_rows: int = 2048, chunk_bytes: float = 80e6) -> torch.Tensor:
    """Batched L2 logistic regression: ``Z [G, n, k]``, ``masks [G, Q, n]`` -> weights ``[G, Q*nC, k+1]``.

    Problem ``(g, q, c)`` minimises ``mean_{train rows}(log-loss) + ||w||^2 / (2 C_c n_train)`` (the same
    minimiser as sklearn's objective; the intercept, last entry, is not penalised). Damped Newton with a
    backtracking step per problem; Hessians are ``(k+1)^2`` each, so this is for small ``k``. With more than
    ``hessian_rows`` rows the Hessian is estimated on a fixed random subset of rows (sub-sampled Newton): the
    gradient and the line search stay exact, so the solution is the exact optimum; only the path differs.
    Groups are solved in chunks of about ``chunk_bytes`` per ``[g, n, P]`` temporary, which keeps allocations
    small enough for the allocator to reuse (huge temporaries cost page faults on every iteration).
    """
    G, n, k = Z.shape
    P = masks.shape[1] * Cs.numel()
    per_group = 4 * (n * P + min(n, hessian_rows) * (k + 1) ** 2)
    step = max(1, int(chunk_bytes // per_group))
    return torch.cat([_newton_chunk(Z[g:g + step], y, masks[g:g + step], Cs, max_iter, tol, hessian_rows)
                      for g in range(0, G, step)])


def _newton_chunk(Z: torch.Tensor, y: torch.Tensor, masks: torch.Tensor, Cs: torch.Tensor, max_iter: int,
                  tol: float, hessian_rows: int) -> torch.Tensor:
    G, n, k = Z.shape
    Q, nC = masks.shape[1], Cs.numel()
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
    """One layer -> (Z [K+1, n, k], basis [K+1, d, k] or None, mean, std [K+1, d], mm scores [K+1, n], theta, bias)."""
    K1, Q, n = masks.shape
    train = masks[:, -1]  # [K+1, n] each fold's whole training part
    mean, std = _moments(X, train)
    mu1, mu0 = _class_means(X, y, masks.reshape(K1 * Q, n))
    mu1, mu0 = mu1.view(K1, Q, -1), mu0.view(K1, Q, -1)
    theta = mu1[:, -1] - mu0[:, -1]  # raw mass-mean direction per fold
    mm_bias = -(theta * (mu1[:, -1] + mu0[:, -1]) / 2).sum(-1)
    d = X.shape[1]
    if d <= max_dim:  # exact: the standardised features themselves
        Z = (X[None] - mean[:, None]) / std[:, None]
        mm = X @ theta.T + mm_bias
        return Z, None, mean, std, mm.T, theta, mm_bias
    # reduced: basis = top principal directions of each fold's standardised training rows + class-mean gaps
    k_pca = max(1, max_dim - Q)
    rows = torch.randperm(n, generator=gen)[:min(n, n_sketch)]
    Xs = X[rows]
    omega = torch.randn(d, k_pca, generator=gen, dtype=X.dtype)
    inv = 1.0 / std  # [K+1, d]
    # Y_f = ((Xs - m_f) / s_f) @ omega, for all folds in one matmul
    Y = _mm(Xs, (omega[None] * inv[:, :, None]).permute(1, 0, 2).reshape(d, K1 * k_pca)).view(len(rows), K1, k_pca)
    Y = Y - ((mean * inv) @ omega)[None]
    Y = Y * train[:, rows].T[..., None].to(X.dtype)  # only each fold's training rows
    A = _mm(Xs.T, Y.reshape(len(rows), K1 * k_pca)).view(d, K1, k_pca).permute(1, 0, 2)  # [K+1, d, k]
    A = (A - mean[:, :, None] * Y.sum(0)[:, None, :]) * inv[:, :, None]
    gaps = ((mu1 - mu0) * inv[:, None, :]).transpose(1, 2)  # [K+1, d, Q] standardised class-mean gaps
    basis = torch.linalg.qr(torch.cat([gaps, A], dim=2)).Q  # [K+1, d, Q + k_pca]
    k = basis.shape[2]
    proj = torch.cat([(basis * inv[:, :, None]).permute(1, 0, 2).reshape(d, K1 * k), theta.T], dim=1)
    out = _mm(X, proj)  # one pass over the layer: every fold's features and mass-mean scores
    Z = out[:, :K1 * k].view(n, K1, k).permute(1, 0, 2) - ((mean * inv)[:, None, :] @ basis)
    mm = out[:, K1 * k:].T + mm_bias[:, None]
    return Z.contiguous(), basis, mean, std, mm, theta, mm_bias


def fit_probes(X: torch.Tensor | Sequence[torch.Tensor], y: Sequence[int] | torch.Tensor,
               groups: Sequence | None = None, *, n_folds: int = 5, inner_folds: int = 3,
               Cs: Sequence[float] = DEFAULT_CS, max_dim: int = 128, n_sketch: int = 1024, seed: int = 0,
               progress: Callable[[int], None] | None = None) -> ProbeSweep:
    """Fit and evaluate logistic and mass-mean probes on every layer.

    Args:
        X: ``[L, n, d]`` float tensor, or a sequence of ``L`` tensors ``[n, d]`` (indexed one layer at a time,
            so a lazy sequence keeps one layer in memory).
        y: binary labels (0/1) per row. groups: group id per row (rows of a group never straddle train and
            test); ``None`` makes each row its own group.
        n_folds / inner_folds: outer folds (held-out metrics) / inner folds (choose C inside each training part).
        Cs: inverse L2 strengths, as sklearn's ``C``. max_dim: widths above this are reduced to a
            ``max_dim``-dimensional basis per fold (see the module docstring). seed: fixes folds and sketches.
        progress: called with 1 after each layer's features are ready.

    >>> sweep = fit_probes(torch.randn(2, 60, 8), [0, 1] * 30, n_folds=3, inner_folds=2)  # doctest: +SKIP
    """
    y_np = np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y).astype(np.int64)
    if set(np.unique(y_np).tolist()) != {0, 1}:
        raise ValueError(f"labels must be 0 and 1 with both present, got values {sorted(set(y_np.tolist()))}")
    n = len(y_np)
    g_np = np.arange(n) if groups is None else np.asarray([str(g) for g in groups])
    if len(g_np) != n:
        raise ValueError(f"got {n} labels and {len(g_np)} groups; give one group id per row")
    outer, masks_np = _split_masks(y_np, g_np, n_folds, inner_folds, seed)
    masks = torch.from_numpy(masks_np)
    yt = torch.from_numpy(y_np)
    Cs_t = torch.tensor(sorted(Cs), dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    if len(X) == 0:
        raise ValueError("X holds no layers")
    L, K = len(X), n_folds
    # every layer's features go straight into two preallocated tensors: the outer folds' [L, K, n, k] (a
    # contiguous [L*K, n, k] for the batched solve, no copy) and the final fit's [L, n, k]
    Zout: torch.Tensor | None = None
    Zfin: torch.Tensor | None = None
    bases, means, stds, mms, thetas, mm_biases = [], [], [], [], [], []
    for i in range(len(X)):  # one layer in memory at a time when X is a lazy sequence
        Xl = X[i].float()
        if Xl.dim() != 2 or Xl.shape[0] != n:
            raise ValueError(f"each layer must be [n={n}, d], got {tuple(Xl.shape)}")
        with _single_thread():
            Z, basis, mean, std, mm, theta, mm_bias = _layer_features(Xl, yt, masks, max_dim, n_sketch, gen)
        if Zout is None:
            Zout = torch.empty(L, K, *Z.shape[1:], dtype=Z.dtype)
            Zfin = torch.empty(L, *Z.shape[1:], dtype=Z.dtype)
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
        W_out = _newton(Zout.view(L * K, n, k), yt, masks[:K].repeat(L, 1, 1), Cs_t)
        W_fin = _newton(Zfin, yt, masks[K:, -1:].expand(L, 1, n), Cs_t)
    del Zfin
    # scores one layer at a time (the same per-matrix products as one [L*K, n, k+1] bmm, without that copy)
    W_l = W_out.view(L, K, *W_out.shape[1:])
    scores = torch.stack([torch.bmm(torch.cat([Zout[i], torch.ones(K, n, 1)], dim=-1), W_l[i].transpose(1, 2))
                          for i in range(L)]).view(L, K, n, inner_folds + 1, nC)
    del Zout
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
    # final probe back to residual units: score = (x - mean)/std @ w_std + b
    rows = torch.arange(L)
    beta = W_fin[rows, final_c]  # [L, k+1]
    weight, bias = [], []
    for i in range(L):
        w_std = beta[i, :-1] if bases[i] is None else bases[i] @ beta[i, :-1]
        w = w_std / stds[i][K]
        weight.append(w)
        bias.append(beta[i, -1] - (w * means[i][K]).sum())
    return ProbeSweep(
        auroc=auroc(oof, yt).float(), accuracy=accuracy(oof, yt).float(),
        mm_auroc=auroc(mm_oof, yt).float(), mm_accuracy=accuracy(mm_oof, yt).float(),
        weight=torch.stack(weight), bias=torch.stack(bias),
        mm_direction=torch.stack([t[K] for t in thetas]), mm_bias=torch.stack([b[K] for b in mm_biases]),
        mean=torch.stack([m[K] for m in means]), std=torch.stack([s[K] for s in stds]),
        C=Cs_t[final_c], oof=oof, fold_C=Cs_t[choice],
        info={"n": n, "n_folds": K, "inner_folds": inner_folds, "Cs": Cs_t.tolist(), "reduced_dim": k
              if bases[0] is not None else None, "n_groups": int(len(np.unique(g_np))), "seed": seed},
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
