"""Before/after comparisons and saved interventions. (The all-methods results table, which evaluates every method,
is :mod:`haltrace.evals.results_table`: it sits above steering.)

A saved intervention is ``DIR/intervention.safetensors`` (every tensor of its engine interventions and of its
provenance) plus ``DIR/intervention.json`` (method, provenance, and each intervention's type, hook, positions,
phase and scalars, naming its tensors). :func:`load_fitted` rebuilds the engine interventions from them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from haltrace.errors import HaltraceError

FORMAT_NAME = "haltrace.fitted_intervention"


class FitFileError(HaltraceError):
    """A saved fit (``intervention.json`` / ``intervention.safetensors``) is corrupt, truncated or a pickle."""

FORMAT_VERSION = 2  # 2: each intervention row carries its registered state

_SKIP = {"n", "tp", "fp", "tn", "fn", "mentions", "hallucinated", "n_known", "n_unknown_heldout",
         "n_prior", "n_pixel"}
#: after-only flip rates (:func:`haltrace.evals.counterfactual.counterfactual_flips`), reported as counterfactual.KEY
FLIP_KEYS = ("prior_to_pixel", "pixel_to_prior", "most_prior_to_pixel", "most_pixel_to_prior")


# ------------------------------------------------------------------------------------------ flattening
def flatten_metrics(report: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a :func:`haltrace.evals.suite.evaluate` report as ``{"pope.adversarial.f1": 0.8}``.

    Counts, per-item lists and examples are left out; ``pope.mean_f1`` is added when POPE splits are present.

    >>> flatten_metrics({"chair": {"chair_i": 0.2, "n": 5, "examples": []}})
    {'chair.chair_i': 0.2}
    """
    out: dict[str, float] = {}
    for key, value in report.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            if key in ("hallucinated_words", "by_kind"):
                continue
            out.update(flatten_metrics(value, name + "."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key not in _SKIP:
            out[name] = float(value)
    if not prefix and isinstance(report.get("pope"), Mapping):
        f1 = [v["f1"] for v in report["pope"].values() if isinstance(v, Mapping) and "f1" in v]
        if f1:
            out["pope.mean_f1"] = sum(f1) / len(f1)
    return out


def compare(before: Mapping[str, Any], after: Mapping[str, Any],
            flips: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Rows ``{metric, before, after, change, relative}`` for every metric in both reports.

    ``relative`` is ``change / before`` (None when before is 0). ``flips`` (from
    :func:`haltrace.evals.counterfactual.flip_rates`) adds the flip rates as after-only rows.
    """
    b, a = flatten_metrics(before), flatten_metrics(after)
    rows = []
    for key in [k for k in b if k in a]:
        change = a[key] - b[key]
        rows.append({"metric": key, "before": b[key], "after": a[key], "change": change,
                     "relative": change / b[key] if b[key] else None})
    for key in FLIP_KEYS:
        if flips and flips.get(key) is not None:
            rows.append({"metric": f"counterfactual.{key}", "before": 0.0, "after": float(flips[key]),
                         "change": float(flips[key]), "relative": None})
    return rows


# ------------------------------------------------------------------------------- saving interventions
def _jsonable(value: Any, tensors: dict[str, torch.Tensor], key: str) -> Any:
    """JSON-safe copy of ``value``; tensors/arrays go to ``tensors`` and are replaced by a reference."""
    if isinstance(value, torch.Tensor) or type(value).__module__ == "numpy" and hasattr(value, "shape"):
        t = torch.as_tensor(value).detach().cpu().contiguous()
        if t.dim() == 0:
            return t.item()
        tensors[key] = t
        return {"tensor": key, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, tensors, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, tensors, f"{key}.{i}") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else str(value)
    return repr(value)  # callables, configs...: recorded, not restorable


def _describe(item: Any, i: int, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """One manifest row: the type, site and placement for readers, and the registered state that rebuilds it
    (its tensors go into the safetensors file)."""
    from haltrace.steering.interventions import to_state

    positions = item.positions if isinstance(item.positions, str) else [int(p) for p in item.positions]
    return {"type": type(item).__name__, "hook": item.hook, "positions": positions, "phase": item.phase,
            "state": _jsonable(to_state(item), tensors, f"interventions.{i}")}


def save_fitted(fitted: Any, out: str | Path, *, extra: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """Write ``out/intervention.safetensors`` + ``out/intervention.json`` atomically; returns both paths.

    Each intervention is written as its registered state (:func:`~haltrace.steering.interventions.to_state`:
    tensors into the safetensors file, everything else into the JSON), so every method's fit, gated and
    per-prompt edits included, loads back whole; ``generate_kwargs`` (third-party methods) are stored as JSON.
    """
    from safetensors.torch import save_file

    from haltrace.trace.store import atomic_write, atomic_write_text

    out = Path(out)
    tensors: dict[str, torch.Tensor] = {}
    items = [_describe(item, i, tensors) for i, item in enumerate(fitted.interventions)]
    manifest = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "method": fitted.method,
        "interventions": items,
        "provenance": _jsonable(dict(fitted.provenance), tensors, "provenance"),
        "generate_kwargs": _jsonable(dict(fitted.generate_kwargs), tensors, "generate_kwargs"),
        "layer_convention": "resid_post.i = output of block i (haltrace.conventions)",
    }
    if extra:
        manifest.update(_jsonable(dict(extra), tensors, "extra"))
    text = json.dumps(manifest, indent=1, sort_keys=True, allow_nan=False)
    paths = {"safetensors": out / "intervention.safetensors", "json": out / "intervention.json"}
    if not tensors:  # safetensors refuses an empty dict; keep the pair of files anyway
        tensors["empty"] = torch.zeros(0)
    atomic_write(paths["safetensors"], lambda tmp: save_file(tensors, tmp, metadata={"haltrace": text}))
    atomic_write_text(paths["json"], text + "\n")
    for p in paths.values():
        p.chmod(0o644)
    return paths


def _resolve(value: Any, tensors: Mapping[str, torch.Tensor], where: Path) -> Any:
    """Inverse of :func:`_jsonable`: tensor references back to the tensors of the safetensors file."""
    if isinstance(value, Mapping):
        if set(value) == {"tensor", "shape", "dtype"}:
            if value["tensor"] not in tensors:
                raise ValueError(f"{where} names tensor {value['tensor']!r}, which the safetensors file lacks")
            return tensors[value["tensor"]]
        return {k: _resolve(v, tensors, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, tensors, where) for v in value]
    return value


def load_fitted(folder: str | Path) -> Any:
    """Rebuild a :class:`FittedIntervention` from :func:`save_fitted` files: every engine intervention (through
    the registry of intervention types: a file names a registered type, it never chooses what is imported),
    provenance and ``generate_kwargs``.

    >>> fitted = load_fitted("runs/truthprint")      # doctest: +SKIP
    >>> with fitted.apply(model):                     # doctest: +SKIP
    ...     model.hf.generate(**inputs)
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from haltrace.steering.vector import VectorError, _check_container

    folder = Path(folder)
    json_path, tensor_path = folder / "intervention.json", folder / "intervention.safetensors"
    if not json_path.is_file() or not tensor_path.is_file():
        raise FileNotFoundError(f"{folder} lacks intervention.json / intervention.safetensors; "
                                "write them with `haltrace steer --out DIR`")
    try:
        manifest = json.loads(json_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FitFileError(f"{json_path} is not valid JSON ({err}); write the folder again with "
                           "`haltrace steer --out DIR`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        manifest = manifest if isinstance(manifest, dict) else {}
        raise FitFileError(f"{json_path} is not a haltrace fitted intervention (format={manifest.get('format')!r})")
    method = str(manifest.get("method"))
    if manifest.get("custom_hooks"):  # format 1: a method that installed hooks of its own (before the engine ran all)
        raise FitFileError(f"{json_path} holds a {method} fit written by an older haltrace, whose {method} ran hooks "
                           f"outside the engine; refit it with `haltrace steer --method {method} --out DIR`")
    try:
        _check_container(tensor_path)  # pickles, torch.save zips and truncated files, in plain words
        tensors = load_file(str(tensor_path))
    except VectorError as err:
        raise FitFileError(str(err)) from None
    except SafetensorError as err:
        raise FitFileError(f"{tensor_path} is not a readable safetensors file ({err})") from None
    try:
        return _rebuild(manifest, tensors, json_path)
    except (KeyError, TypeError, IndexError) as err:
        raise FitFileError(f"{json_path} is incomplete or does not match {tensor_path} (missing or wrong "
                           f"entry {err}); write the folder again with `haltrace steer --out DIR`") from None


def _registered_add(name: str) -> Any:
    """A registered ``Add`` subclass by name (format 1 stored them like an Add: vector and alpha)."""
    from haltrace.steering.interventions import _STATE_TYPES, Add

    cls = _STATE_TYPES.get(name)
    return cls if isinstance(cls, type) and issubclass(cls, Add) else None


def _rebuild(manifest: dict, tensors: dict, json_path: Path) -> Any:
    from haltrace.steering.interventions import Add, NormPreservingAdd, Project, ScaleHeads, from_state
    from haltrace.steering.registry import FittedIntervention, list_methods

    list_methods()  # methods register their own intervention types: import them before rebuilding
    method = str(manifest.get("method"))
    # format 1 files (no "state" per row): a fixed table of the plain types; the file names a type, it never
    # chooses what gets imported
    kinds = {"Add": Add, "NormPreservingAdd": NormPreservingAdd, "Project": Project, "ScaleHeads": ScaleHeads}
    items = []
    for row in manifest["interventions"]:
        if "state" in row:
            items.append(from_state(_resolve(row["state"], tensors, json_path)))
            continue
        cls = kinds.get(row["type"]) or _registered_add(row["type"])
        if cls is None:
            raise ValueError(f"unknown intervention type {row['type']!r} in {json_path}")
        common = {"positions": row["positions"], "phase": row["phase"]}
        if cls is ScaleHeads:
            items.append(cls(row["hook"], heads=row["heads"], factor=row["factor"], **common))
        elif cls is Project:
            items.append(cls(row["hook"], directions=tensors[row["directions"]], weight=row["weight"], **common))
        else:
            items.append(cls(row["hook"], vector=tensors[row["vector"]], alpha=row["alpha"], **common))
    provenance = _resolve(manifest.get("provenance", {}), tensors, json_path)
    return FittedIntervention(method, items, provenance,
                              generate_kwargs=_resolve(manifest.get("generate_kwargs") or {}, tensors, json_path))
