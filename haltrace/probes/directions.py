"""Steering directions from probe results and from stored activations.

Three recipes (methods-llm-eval.md §2-3), all returned as :class:`~haltrace.steering.vector.SteeringVector`
in residual units, pointing from label 0 to label 1:

* ``probe``: the logistic probe's weight, unstandardised to residual units, as a unit vector scaled by the
  class-mean gap along it (Marks & Tegmark's causal-intervention scaling);
* ``mass_mean``: ``mean(label 1) - mean(label 0)`` (CAA / ITI);
* ``pca_diff``: RepE, the first principal component of paired differences with random sign flips.

Example
-------
>>> import torch
>>> from haltrace.probes import fit_probes
>>> g = torch.Generator().manual_seed(0)
>>> y = torch.arange(40) % 2
>>> X = [torch.randn(40, 8, generator=g) + 2 * y[:, None] for _ in range(3)]   # 3 layers, 40 rows, d=8
>>> sweep = fit_probes(X, y, groups=torch.arange(40) // 2, n_folds=2, inner_folds=2)
>>> vectors = vectors_from_sweep(sweep, layers=[0, 1, 2], hook="resid_post")
>>> sorted(vectors), vectors["mass_mean"].for_layer(2).shape
(['mass_mean', 'probe'], torch.Size([8]))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from haltrace._version import __version__
from haltrace.probes.linear import ProbeSweep
from haltrace.steering.vector import SteeringVector


def vectors_from_sweep(sweep: ProbeSweep, *, layers: Sequence[int], hook: str, model: Any = None,
                       provenance: dict[str, Any] | None = None) -> dict[str, SteeringVector]:
    """``{"probe": ..., "mass_mean": ...}``: per-layer vectors from a :func:`~haltrace.probes.fit_probes` result."""
    layers = [int(x) for x in layers]
    common = {"hook": hook, "model": str(getattr(model, "name_or_path", "") or ""),
              "n_layers": getattr(model, "n_layers", None), "hidden_size": int(sweep.weight.shape[1])}
    base = {"haltrace_version": __version__, **(provenance or {})}
    gaps = {layer: sweep.mm_direction[i] for i, layer in enumerate(layers)}
    weights = {layer: sweep.weight[i] for i, layer in enumerate(layers)}
    zeros = {layer: torch.zeros_like(g) for layer, g in gaps.items()}
    probe = SteeringVector.from_probe(weights, pos=gaps, neg=zeros, layers=layers, **common, provenance={
        **base, "metrics": {str(x): {"auroc": float(sweep.auroc[i]), "C": float(sweep.C[i])}
                            for i, x in enumerate(layers)},
        "scale": "unit probe direction times the class-mean gap along it",
        # reduced_rank: the logistic weights were fitted in a rank-`rank` basis, not on all features
        "fit": {k: sweep.info[k] for k in ("solver", "reduced_rank", "rank", "max_dim") if k in sweep.info}})
    mass = SteeringVector.from_mass_mean(gaps, zeros, layers=layers, **common, provenance={
        **base, "metrics": {str(x): {"auroc": float(sweep.mm_auroc[i])} for i, x in enumerate(layers)},
        "scale": "mean(label 1) - mean(label 0)"})
    return {"probe": probe, "mass_mean": mass}


def vector_from_store(store: Any, hook: str, labels: Sequence[int], *, method: str = "mass_mean",
                      pairs: Sequence[tuple[int, int]] | None = None, model: Any = None,
                      provenance: dict[str, Any] | None = None) -> SteeringVector:
    """A vector for one hook (``"resid_post.3"``) from an :class:`~haltrace.trace.store.ActivationStore`.

    ``method="mass_mean"`` uses ``labels``; ``method="pca_diff"`` needs ``pairs`` of row indices
    ``(label-1 row, label-0 row)``. Reads the store's ``positions="last"`` rows.

    >>> from haltrace.trace.harvest import harvest
    >>> data = [{"prompt": p} for p in ("a red circle", "a blue star", "the red square", "one blue circle")]
    >>> store = harvest(model, data, ["resid_post.1"], out="acts/", progress=False)
    >>> vec = vector_from_store(store, "resid_post.1", [1, 0, 1, 0], method="mass_mean")
    >>> vec.layers, vec.for_layer(1).shape
    ([1], torch.Size([32]))
    """
    from haltrace.conventions import parse_hook

    point = parse_hook(hook)
    x = store.load_last(hook)
    y = torch.as_tensor(list(labels))
    if len(y) != x.shape[0]:
        raise ValueError(f"got {len(y)} labels for a store of {x.shape[0]} rows")
    common = {"hook": point.kind, "model": str(getattr(model, "name_or_path", "") or store.manifest["model"].get(
        "name_or_path") or ""), "n_layers": store.manifest["model"].get("n_layers"),
        "provenance": {"haltrace_version": __version__, "data_fingerprint": store.manifest.get(
            "dataset_fingerprint"), "hook": hook, **(provenance or {})}}
    if method == "mass_mean":
        return SteeringVector.from_mass_mean(x[y == 1], x[y == 0], layers=[point.layer], **common)
    if method == "pca_diff":
        if not pairs:
            raise ValueError("method='pca_diff' needs pairs=[(positive_row, negative_row), ...]")
        pos = x[torch.tensor([p for p, _ in pairs])]
        neg = x[torch.tensor([q for _, q in pairs])]
        return SteeringVector.from_pca_pairs(pos, neg, layers=[point.layer], **common)
    raise ValueError(f"unknown method {method!r}; use 'mass_mean' or 'pca_diff' (probe vectors come from "
                     f"vectors_from_sweep)")


def cosine_table(vectors: dict[str, SteeringVector], layer: int) -> dict[str, float]:
    """Pairwise cosine similarity of several methods' directions at ``layer`` (repeng §2.3 advice: log it)."""
    names = sorted(vectors)
    out = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            va, vb = vectors[a].for_layer(layer), vectors[b].for_layer(layer)
            out[f"{a}~{b}"] = float(torch.nn.functional.cosine_similarity(va, vb, dim=0))
    return out
