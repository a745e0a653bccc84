"""The probe run behind ``haltrace probe``, and its files.

:func:`run_probe` harvests a probe set through the activation store (``OUT/store``, reused when it matches),
fits per-layer probes with the batched solver, and writes::

    OUT/probes.safetensors     weight/bias (logistic, residual units), mm_direction/mm_bias (mass-mean),
                               mean/std, layers, oof (out-of-fold scores), labels
    OUT/probes.json            model, hook, layer convention, position rule, label map, metrics per layer,
                               baselines, protocol, data fingerprint, timings
    OUT/vectors/{probe,mass_mean}.{safetensors,json}   per-layer SteeringVectors
    OUT/report.html            self-contained plotly report

Example
-------
>>> model = haltrace.load("shapes-llava")                                        # doctest: +SKIP
>>> manifest = run_probe(model, build_task("entity", model), out="runs/entity")  # doctest: +SKIP
>>> manifest["best_layer"], manifest["best_auroc"]                               # doctest: +SKIP
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from haltrace import conventions
from haltrace._version import __version__
from haltrace.probes.datasets import ProbeSet
from haltrace.probes.linear import DEFAULT_CS, bag_of_tokens, fit_probes, majority_baseline

FORMAT_NAME = "haltrace.probes"
FORMAT_VERSION = 1
#: hook kinds whose per-token activation is a [d] vector a linear probe can read
PROBE_HOOKS = ("resid_pre", "resid_post", "attn_out", "mlp_out")


def parse_layers(spec: str | Sequence[int], n_layers: int) -> list[int]:
    """``"all"``, ``"2"``, ``"0,2,-1"``, ``"1-3"`` -> sorted distinct layer indices (negative from the end).

    >>> parse_layers("0,2-3,-1", 6)
    [0, 2, 3, 5]
    """
    if not isinstance(spec, str):
        items = [int(x) for x in spec]
    elif spec.strip() == "all":
        return list(range(n_layers))
    else:
        items = []
        for part in spec.split(","):
            part = part.strip()
            try:
                if "-" in part[1:]:
                    a, b = part[0] + part[1:].split("-", 1)[0], part[1:].split("-", 1)[1]
                    items += list(range(int(a), int(b) + 1))
                else:
                    items.append(int(part))
            except ValueError:
                raise ValueError(f"bad --layers {spec!r}: use 'all', 'i', 'i,j,k' or 'i-j'") from None
    out = sorted({x + n_layers if x < 0 else x for x in items})
    if not out or out[0] < 0 or out[-1] >= n_layers:
        raise ValueError(f"layers {spec!r} out of range: this model has layers 0..{n_layers - 1}")
    return out


def layer_convention(kind: str) -> str:
    """The layer-index convention of ``kind`` in words, from :mod:`haltrace.conventions`' table."""
    line = next((ln.strip() for ln in (conventions.__doc__ or "").splitlines()
                 if ln.strip().startswith(f"``{kind}.i``")), f"``{kind}.i``")
    return ("haltrace numbers decoder blocks 0..n_layers-1 as model.layers[i]; " + " ".join(line.split())
            .replace("``", "") + " (haltrace.conventions)")


class _Layers:
    """Lazy ``[n, d]`` per-layer view of a store (one layer read at a time)."""

    def __init__(self, store: Any, hooks: list[str]):
        self.store, self.hooks = store, hooks

    def __len__(self) -> int:
        return len(self.hooks)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.store.load_last(self.hooks[i])


def _store(model: Any, pset: ProbeSet, hooks: list[str], root: Path, batch_size: int, overwrite: bool,
           progress: bool) -> Any:
    """Harvest into ``root``; reuse a finished store that holds these hooks for this model and data."""
    from haltrace.trace.harvest import dataset_fingerprint, harvest
    from haltrace.trace.store import MANIFEST, ActivationStore, StoreError, read_manifest

    rows = [{k: v for k, v in r.items()} for r in pset.rows]
    if (root / MANIFEST).exists() and not overwrite:
        try:
            old = read_manifest(root)
        except StoreError:
            old = None
        if (old and old.get("complete") and old["positions"] == "last" and set(hooks) <= set(old["hooks"])
                and old["model"].get("name_or_path") == model.name_or_path
                and old.get("dataset_fingerprint") == dataset_fingerprint(rows)):
            return ActivationStore.open(root)
    return harvest(model, rows, hooks, "last", out=root, batch_size=batch_size, overwrite=overwrite,
                   progress=progress)


def run_probe(model: Any, pset: ProbeSet, *, out: str | Path, hook: str = "resid_post",
              layers: str | Sequence[int] = "all", n_folds: int = 5, inner_folds: int = 3,
              Cs: Sequence[float] = DEFAULT_CS, max_dim: int = 128, batch_size: int = 64, seed: int = 0,
              overwrite: bool = False, progress: bool = False, exact: bool = False,
              on_layer: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Harvest, fit per-layer probes and baselines, and write every artifact; returns the JSON manifest.

    ``exact``: scikit-learn's LogisticRegression on all features (a spot check) instead of the batched solver,
    which is reduced-rank above ``max_dim`` (the manifest's ``reduced_rank``/``rank``/``max_dim`` say which)."""
    from haltrace.probes.directions import vectors_from_sweep
    from haltrace.probes.report import write_probe_report

    if hook not in PROBE_HOOKS:
        raise ValueError(f"--hook {hook!r}: probes read one vector per token, so use one of {', '.join(PROBE_HOOKS)} "
                         f"(the layer goes in --layers)")
    out = Path(out)
    layer_ids = parse_layers(layers, model.n_layers)
    hooks = [f"{hook}.{i}" for i in layer_ids]
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    store = _store(model, pset, hooks, out / "store", batch_size, overwrite, progress)
    timings["harvest_s"] = time.perf_counter() - t0
    labels = torch.tensor(pset.labels)
    groups = pset.groups
    t0 = time.perf_counter()
    sweep = fit_probes(_Layers(store, hooks), labels, groups, n_folds=n_folds, inner_folds=inner_folds, Cs=Cs,
                       max_dim=max_dim, seed=seed, exact=exact, progress=on_layer)
    # confound baselines on the same folds: token counts of the prompt, and the majority class
    ids = [model.tokenizer(p)["input_ids"] for p in pset.prompts]
    counts, _ = bag_of_tokens(ids)
    bot = fit_probes(counts[None], labels, groups, n_folds=n_folds, inner_folds=inner_folds, Cs=Cs,
                     max_dim=max_dim, seed=seed, exact=exact)
    best = int(torch.nan_to_num(sweep.auroc, nan=0).argmax())
    # control task: the best layer with labels shuffled across groups (a probe that reads anything but the
    # label should drop to ~0.5 here)
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    control = fit_probes(_Layers(store, [hooks[best]]), labels[perm], groups, n_folds=n_folds,
                         inner_folds=inner_folds, Cs=Cs, max_dim=max_dim, seed=seed, exact=exact)
    timings["probe_s"] = time.perf_counter() - t0
    metrics = {str(x): {"logreg": {"auroc": float(sweep.auroc[i]), "accuracy": float(sweep.accuracy[i]),
                                   "C": float(sweep.C[i]), "fold_C": sweep.fold_C[i].tolist()},
                        "mass_mean": {"auroc": float(sweep.mm_auroc[i]), "accuracy": float(sweep.mm_accuracy[i])}}
               for i, x in enumerate(layer_ids)}
    manifest: dict[str, Any] = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "haltrace_version": __version__,
        "model": model.name_or_path, "n_layers": model.n_layers, "hidden_size": model.hidden_size,
        "hook": hook, "layers": layer_ids, "layer_convention": layer_convention(hook),
        "task": pset.name, "source": pset.source, "position_rule": pset.position_rule,
        "label_names": {str(i): name for i, name in enumerate(pset.label_names)}, "positive": pset.label_names[1],
        "n": len(pset), "counts": pset.counts(), "n_groups": len(set(groups)),
        "data_fingerprint": store.manifest.get("dataset_fingerprint"), "notes": pset.notes,
        "metrics": metrics, "best_layer": layer_ids[best], "best_auroc": float(sweep.auroc[best]),
        # the logistic probe's fit: reduced_rank = fitted in a rank-`rank` basis per fold (d > max_dim), not
        # on all d features; `haltrace probe --exact` fits scikit-learn on all features instead
        "solver": sweep.info["solver"], "reduced_rank": sweep.info["reduced_rank"], "rank": sweep.info["rank"],
        "max_dim": max_dim,
        "baselines": {"bag_of_tokens": {"auroc": float(bot.auroc[0]), "accuracy": float(bot.accuracy[0]),
                                        "n_token_types": int(counts.shape[1])},
                      "majority": majority_baseline(pset.labels, groups, n_folds=n_folds, seed=seed),
                      "shuffled_labels": {"auroc": float(control.auroc[0]), "accuracy": float(control.accuracy[0]),
                                          "layer": layer_ids[best]}},
        "protocol": (f"{n_folds}-fold stratified group CV (held-out metrics, out-of-fold scores); C from "
                     f"{list(Cs)} by {inner_folds}-fold group CV inside each training part; standardised on "
                     f"training rows only; L2 logistic regression ("
                     + ("scikit-learn lbfgs on all features" if exact else "batched Newton")
                     + (f", REDUCED RANK: fitted in a {sweep.info['rank']}-dim basis per fold (top principal "
                        f"directions + the fit's own class-mean gap) of the {sweep.info['d']} features" if
                        sweep.info["reduced_rank"] else "") + "); mass-mean with midpoint bias; final probe "
                     "refit on all rows at the C with the best out-of-fold AUROC"),
        "timings": timings,
    }
    save_probe_artifacts(out, sweep, manifest, labels)
    vectors = vectors_from_sweep(sweep, layers=layer_ids, hook=hook, model=model, provenance={
        "task": pset.name, "source": pset.source, "data_fingerprint": manifest["data_fingerprint"],
        "positive": pset.label_names[1], "position_rule": pset.position_rule})
    for name, vec in vectors.items():
        vec.save(out / "vectors" / name)
    write_probe_report(manifest, out / "report.html")
    return manifest


def save_probe_artifacts(out: str | Path, sweep: Any, manifest: dict[str, Any], labels: torch.Tensor) -> None:
    """Write ``probes.safetensors`` + ``probes.json``, each atomically."""
    from safetensors.torch import save_file

    from haltrace.trace.store import atomic_write, atomic_write_text

    out = Path(out)
    tensors = {"weight": sweep.weight, "bias": sweep.bias, "mm_direction": sweep.mm_direction,
               "mm_bias": sweep.mm_bias, "mean": sweep.mean, "std": sweep.std, "C": sweep.C,
               "oof": sweep.oof.float(), "labels": labels.long(),
               "layers": torch.tensor(manifest["layers"], dtype=torch.long)}
    text = json.dumps(manifest, indent=1, sort_keys=True, allow_nan=True)
    atomic_write(out / "probes.safetensors", lambda tmp: save_file(
        {k: v.detach().float().contiguous() if v.is_floating_point() else v.contiguous() for k, v in tensors.items()},
        tmp, metadata={"format": FORMAT_NAME}))
    atomic_write_text(out / "probes.json", text + "\n")
    for name in ("probes.safetensors", "probes.json"):  # atomic temp files are created 0600
        (out / name).chmod(0o644)


def load_probe_artifacts(out: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read ``probes.json`` and ``probes.safetensors`` from a ``haltrace probe`` output folder.

    >>> import json
    >>> from pathlib import Path
    >>> from haltrace.probes.datasets import load_jsonl
    >>> rows = [{"prompt": f"is there a {c} {s} ?", "label": c} for c in ("red", "blue")
    ...         for s in ("circle", "square", "star", "cup", "plate", "fork")]
    >>> _ = Path("data.jsonl").write_text("".join(json.dumps(r) + "\\n" for r in rows))
    >>> _ = run_probe(model, load_jsonl("data.jsonl"), out="runs/demo", n_folds=2, inner_folds=2)  # tiny: 2 layers
    >>> manifest, tensors = load_probe_artifacts("runs/demo")
    >>> x = torch.randn(5, 32)                                            # [n, d] rows of one layer
    >>> scores = x @ tensors["weight"][0] + tensors["bias"][0]
    >>> manifest["layers"], tensors["weight"].shape, scores.shape
    ([0, 1], torch.Size([2, 32]), torch.Size([5]))
    """
    from safetensors.torch import load_file

    out = Path(out)
    if not (out / "probes.json").is_file() or not (out / "probes.safetensors").is_file():
        raise FileNotFoundError(f"{out} holds no probe artifacts (probes.json + probes.safetensors); run "
                                f"`haltrace probe ... --out {out}` first")
    manifest = json.loads((out / "probes.json").read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT_NAME:
        raise ValueError(f"{out / 'probes.json'} is not a haltrace probe manifest")
    return manifest, load_file(str(out / "probes.safetensors"))
