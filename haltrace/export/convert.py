"""Turn what haltrace saves into a plain additive :class:`~haltrace.steering.vector.SteeringVector`, or say why not.

Export formats such as llama.cpp control vectors apply one thing only: ``x <- x + v`` on the
residual stream, at every token, while reading the prompt and while generating. Three kinds of input reach
the exporters:

- a saved ``SteeringVector`` (``NAME.safetensors`` + ``NAME.json``), the source of truth;
- a folder written by ``haltrace steer --out`` (``intervention.safetensors`` + ``intervention.json``), turned
  into a vector by :func:`vector_from_fitted` when every intervention is a plain residual ``Add``;
- a llama.cpp ``.gguf`` control vector, read back by :func:`haltrace.export.gguf.read_gguf`.

Several ``Add``\\ s are merged per layer. When each layer has one ``Add`` and all share one ``alpha``, the
vector keeps that ``alpha`` and the raw directions; otherwise each layer's direction is ``sum(alpha_i * v_i)``
and ``alpha`` is 1, so the effect is unchanged either way.

Example
-------
>>> import torch
>>> from haltrace.export.convert import load_vector
>>> from haltrace.steering import Add
>>> from haltrace.steering.registry import FittedIntervention
>>> from haltrace.steering.results import save_fitted
>>> _ = save_fitted(FittedIntervention("dummy", [Add("resid_post.1", torch.ones(128), alpha=16.0)]), "runs/dummy")
>>> load_vector("runs/dummy")    # a `haltrace steer --out` folder with one Add at resid_post.1
SteeringVector(dummy, resid_post layers=[1], [128], alpha=16.0, phase='both', model=...)
>>> _ = save_fitted(FittedIntervention("caa", [Add("resid_post.1", torch.ones(128), positions="last")]), "runs/caa")
>>> load_vector("runs/caa")      # CAA steers the last prompt token, then every generated one
Traceback (most recent call last):
haltrace.export.base.ExportError: cannot convert caa into a plain additive vector: Add at resid_post.1 applies only at positions='last'; ...
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from haltrace.conventions import HookPoint, hidden_states_index, hook_from_hidden_states_index, parse_hook
from haltrace.export.base import ExportError
from haltrace.steering.interventions import RESIDUAL, placement_refusals  # noqa: F401  (gguf uses both)
from haltrace.steering.vector import SteeringVector, VectorError

# what a plain additive vector is, said once for every refusal message
_PLAIN = ("only a plain residual add exports: one fixed vector added to the residual stream after a block, at "
          "every token, in the prompt and during generation (what a llama.cpp control vector does)")




# ------------------------------------------------------------------------------------------- refusals
def intervention_refusals(item: Any) -> list[str]:
    """Why one engine intervention is not a plain residual add (empty list when it is). Each intervention type
    answers for itself (:meth:`~haltrace.steering.interventions.Intervention.export_refusals`): only an exact
    ``Add`` can be a control vector, so a new type is refused until it says otherwise.

    >>> from haltrace.steering import Add
    >>> intervention_refusals(Add("resid_post.2", torch.ones(4), positions="last"))
    ["Add at resid_post.2 applies only at positions='last'; llama.cpp adds a control vector at every token position (it has no position masks)"]
    """
    refusals = getattr(item, "export_refusals", None)
    if refusals is None:
        return [f"{type(item).__name__} is not an engine intervention; llama.cpp only adds a fixed vector"]
    return list(refusals())


def fitted_refusals(fitted: Any) -> list[str]:
    """Why a :class:`~haltrace.steering.registry.FittedIntervention` is not a plain additive vector."""
    reasons = []
    if getattr(fitted, "generate_kwargs", None):
        reasons.append(f"{fitted.method} is a decoding strategy (generate() arguments "
                       f"{sorted(fitted.generate_kwargs)}), not an activation edit; there is no vector to export")
    for item in fitted.interventions:
        reasons += [r for r in intervention_refusals(item) if r not in reasons]
    if not fitted.interventions and not reasons:
        reasons.append(f"{fitted.method} has no interventions: nothing to export")
    return reasons


# ------------------------------------------------------------------------------------------ conversion
def _resid_post_layer(hook: str) -> HookPoint:
    """``resid_pre.i`` is the same tensor as ``resid_post.{i-1}``: convert through haltrace.conventions."""
    point = parse_hook(hook)
    if point.kind == "resid_pre":
        return hook_from_hidden_states_index(hidden_states_index(point))  # resid_pre.0 stays resid_pre.0
    return point


def vector_from_fitted(fitted: Any, *, model: str = "", model_revision: str | None = None,
                       n_layers: int | None = None, hidden_size: int | None = None,
                       data_fingerprint: str | None = None) -> SteeringVector:
    """A :class:`SteeringVector` with the same effect as ``fitted``, or :class:`ExportError` listing every reason
    it has none (projections, norm-preserving adds, head edits, position masks, phases, custom hooks, decoding
    strategies).

    >>> from haltrace.steering import Add
    >>> from haltrace.steering.registry import FittedIntervention
    >>> vec = vector_from_fitted(FittedIntervention("demo", [Add("resid_post.2", torch.ones(4), alpha=3.0)]))
    >>> vec.hook, vec.layers, vec.alpha
    ('resid_post', [2], 3.0)
    """
    reasons = fitted_refusals(fitted)
    if reasons:
        raise ExportError(f"cannot convert {fitted.method} into a plain additive vector: " + "; ".join(reasons)
                          + f". ({_PLAIN})")
    points = [parse_hook(item.hook) for item in fitted.interventions]
    if len({p.kind for p in points}) > 1:  # mixed resid_pre/resid_post: express all as resid_post
        points = [_resid_post_layer(item.hook) for item in fitted.interventions]
        if any(p.kind == "resid_pre" for p in points):
            raise ExportError("resid_pre.0 (the embeddings) cannot be merged with resid_post hooks into one vector")
    per_layer: dict[int, list[tuple[float, torch.Tensor]]] = {}
    for item, point in zip(fitted.interventions, points, strict=True):
        per_layer.setdefault(point.layer, []).append((float(item.alpha), item.vector.float()))
    widths = {v.shape[0] for terms in per_layer.values() for _, v in terms}
    if len(widths) != 1:
        raise ExportError(f"{fitted.method}'s vectors have different sizes {sorted(widths)}")
    width = widths.pop()
    if hidden_size is not None and hidden_size != width:
        raise ExportError(f"{fitted.method}'s vectors have size {width} but {model or 'the model'} has hidden size "
                          f"{hidden_size}")
    alphas = {a for terms in per_layer.values() for a, _ in terms}
    if len(alphas) == 1 and all(len(terms) == 1 for terms in per_layer.values()):
        alpha = alphas.pop()  # one shared alpha: keep it visible, directions stay as fitted
        direction = {layer: terms[0][1] for layer, terms in per_layer.items()}
    else:
        alpha = 1.0  # fold: the per-layer sums are what gets added
        direction = {layer: sum((a * v for a, v in terms), torch.zeros(width))
                     for layer, terms in per_layer.items()}
    layers = sorted(direction)
    prov = dict(getattr(fitted, "provenance", {}) or {})
    try:
        return SteeringVector(direction=direction[layers[0]] if len(layers) == 1 else direction, layers=layers,
                              hidden_size=width, hook=points[0].kind, alpha=alpha, method=fitted.method,
                              model=model, model_revision=model_revision, n_layers=n_layers,
                              data_fingerprint=data_fingerprint or _data_fingerprint(prov),
                              provenance={"converted_from": "FittedIntervention",
                                          "interventions": [f"{type(i).__name__}({i.hook}, alpha={float(i.alpha)})"
                                                            for i in fitted.interventions],
                                          "method_provenance": _json_safe(prov)})
    except VectorError as err:
        raise ExportError(f"{fitted.method}: {err}") from None


def _data_fingerprint(provenance: Mapping[str, Any]) -> str | None:
    """The fit data's fingerprint where methods record it (``data_fingerprint``, or ``data.fingerprint``)."""
    if isinstance(provenance.get("data_fingerprint"), str):
        return provenance["data_fingerprint"]
    data = provenance.get("data")
    if isinstance(data, Mapping) and isinstance(data.get("fingerprint"), str):
        return data["fingerprint"]
    return None


def _json_safe(value: Any) -> Any:
    """Provenance as plain JSON for the vector's manifest; tensors are summarised (the vector is what counts)."""
    if isinstance(value, torch.Tensor) or (type(value).__module__ == "numpy" and hasattr(value, "shape")):
        if len(value.shape) == 0:
            return _json_safe(value.item())
        return f"<tensor {list(value.shape)} {value.dtype}, not stored>"
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else str(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return repr(value)


def model_facts(name: str) -> dict[str, Any]:
    """``n_layers``, ``hidden_size`` and ``model_revision`` of a model name or folder from its config alone
    (local files only, no weights); ``{}`` when the config cannot be found.

    >>> model_facts("shapes-llava")["n_layers"]   # the shipped organism's config.json
    4
    """
    if not name:
        return {}
    try:
        from haltrace.models.shipped import resolve_organism

        folder = resolve_organism(name)
    except (FileNotFoundError, ImportError):
        folder = None
    try:
        from transformers import AutoConfig
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        config = AutoConfig.from_pretrained(str(folder or name), local_files_only=True)
        text = config.get_text_config()
        return {"n_layers": int(text.num_hidden_layers), "hidden_size": int(text.hidden_size),
                "model_revision": getattr(config, "_commit_hash", None)}
    except Exception as err:  # an unknown name or an offline Hub id: the facts stay unknown, not fatal
        logging.getLogger(__name__).debug("no config for %s: %s", name, err)
        return {}


def vector_from_steer_folder(folder: str | Path, *, n_layers: int | None = None) -> SteeringVector:
    """The :class:`SteeringVector` of a ``haltrace steer --out`` folder, or :class:`ExportError` saying why not.

    The model name recorded in ``intervention.json`` gives ``n_layers``, hidden size and revision when its
    config is available locally; ``n_layers`` overrides it.

    >>> from haltrace.steering import Add
    >>> from haltrace.steering.registry import FittedIntervention
    >>> from haltrace.steering.results import save_fitted
    >>> _ = save_fitted(FittedIntervention("dummy", [Add("resid_post.1", torch.ones(8))]), "runs/dummy")
    >>> vector_from_steer_folder("runs/dummy").layers
    [1]
    """
    from haltrace.steering.results import load_fitted

    folder = Path(folder)
    json_path = folder / "intervention.json"
    try:
        manifest = json.loads(json_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportError(f"{folder} has no intervention.json; write it with `haltrace steer --out DIR`") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ExportError(f"{json_path} is not valid JSON ({err})") from None
    if not isinstance(manifest, dict):
        raise ExportError(f"{json_path} is not a haltrace fitted intervention")
    method = str(manifest.get("method", "?"))
    # load_fitted rebuilds only the engine interventions: custom hooks and decoding strategies are known
    # from the manifest alone, so refuse them here or they would export as "nothing"
    reasons = []
    if manifest.get("custom_hooks"):
        reasons.append(f"{method} installs custom hooks (gated or stateful edits) that run Python code during "
                       "decoding; a file of fixed vectors cannot hold code")
    if manifest.get("generate_kwargs"):
        reasons.append(f"{method} is a decoding strategy (generate() arguments "
                       f"{sorted(manifest['generate_kwargs'])}), not an activation edit; there is no vector to export")
    if reasons:
        raise ExportError(f"cannot convert {method} into a plain additive vector: " + "; ".join(reasons)
                          + f". In Python it runs whole: haltrace.steering.results.load_fitted({str(folder)!r})"
                          ".apply(model), or `haltrace steer --from DIR`")
    try:
        fitted = load_fitted(folder)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ExportError(f"{folder}: cannot read the saved intervention ({type(err).__name__}: {err})") from None
    model = str(manifest.get("model") or "")
    facts = model_facts(model)
    if n_layers is not None:
        if facts.get("n_layers") not in (None, n_layers):
            raise ExportError(f"--n-layers {n_layers} contradicts {model}'s config, which has "
                              f"{facts['n_layers']} layers")
        facts["n_layers"] = n_layers
    return vector_from_fitted(fitted, model=model, model_revision=facts.get("model_revision"),
                              n_layers=facts.get("n_layers"), hidden_size=facts.get("hidden_size"))


def load_vector(path: str | Path, *, n_layers: int | None = None) -> SteeringVector:
    """Load any exportable input: ``NAME.safetensors`` (SteeringVector), a ``haltrace steer --out`` folder (or its
    ``intervention.*`` file), or a ``.gguf`` control vector. ``n_layers`` fills in (or is checked against) the
    model's layer count.

    >>> from haltrace.steering.vector import SteeringVector
    >>> _ = SteeringVector(torch.ones(8), layers=[2], hidden_size=8).save("vectors/entity")
    >>> load_vector("vectors/entity.safetensors").layers
    [2]
    """
    p = Path(path)
    if p.is_dir():
        if (p / "intervention.json").is_file() or (p / "intervention.safetensors").is_file():
            return vector_from_steer_folder(p, n_layers=n_layers)
        raise ExportError(f"{p} is a folder without intervention.json (written by `haltrace steer --out`); "
                          "pass a SteeringVector's NAME.safetensors instead")
    if p.name in ("intervention.json", "intervention.safetensors"):
        return vector_from_steer_folder(p.parent, n_layers=n_layers)
    if p.suffix == ".gguf":
        from haltrace.export.gguf_read import read_gguf

        vec = read_gguf(p).to_steering_vector()
    else:
        vec = SteeringVector.load(p)
    if n_layers is not None:
        vec.validate(n_layers=n_layers)  # names both counts when they differ
        vec.n_layers = n_layers
    return vec


def as_vector(obj: Any, *, n_layers: int | None = None) -> SteeringVector:
    """``obj`` as a :class:`SteeringVector`: itself, a converted FittedIntervention, or loaded from a path."""
    if isinstance(obj, SteeringVector):
        if n_layers is not None:
            obj.validate(n_layers=n_layers)
        return obj
    if isinstance(obj, (str, Path)):
        return load_vector(obj, n_layers=n_layers)
    if hasattr(obj, "interventions") and hasattr(obj, "method"):
        return vector_from_fitted(obj, n_layers=n_layers)
    raise TypeError(f"cannot export a {type(obj).__name__}; pass a SteeringVector, a FittedIntervention or a path")
