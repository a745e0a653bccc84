"""``SteeringVector``: a direction in a model's residual stream, with everything needed to apply it safely.

A vector is saved as two files written atomically: ``NAME.safetensors`` (the tensors; the manifest is also
embedded in its header, which is the copy that counts) and ``NAME.json`` (the same manifest, for people and
tools). Loading reads only safetensors and JSON, never pickle, and validates the manifest, the tensors'
shapes, dtypes and finiteness and, given a model, its hidden size and layer count.

The manifest (format version 2) records: ``method``, ``model`` and ``model_revision``, ``hidden_size``,
``n_layers``, ``hook``, ``layer_convention`` (:data:`LAYER_CONVENTION`), ``layers``, ``alpha``,
``positions``, ``phase``, ``haltrace_version``, ``data_fingerprint`` and free-form ``provenance``.
Version-1 files (written before ``model_revision``, ``layer_convention``, ``haltrace_version`` and
``data_fingerprint`` existed) still load: those keys read as ``None``, and ``data_fingerprint`` falls back
to ``provenance["data_fingerprint"]``. :meth:`SteeringVector.save` always writes version 2.

Directions point from label 0 to label 1 of the data they came from (``provenance["positive"]`` names
label 1). Layer indices follow :mod:`haltrace.conventions` (``resid_post.i`` = output of block ``i``).
Fingerprint the fit data with :func:`haltrace.trace.harvest.dataset_fingerprint` (the function activation
stores use), so a vector and a store built from the same rows carry the same fingerprint.

Example
-------
>>> import torch
>>> pos, neg = torch.randn(8, 16) + 1, torch.randn(8, 16)
>>> vec = SteeringVector.from_mass_mean(pos, neg, layers=[2], hidden_size=16, model="demo")
>>> vec.direction.shape, vec.layers
(torch.Size([16]), [2])
>>> _ = vec.save("demo_vec")
>>> SteeringVector.load("demo_vec", hidden_size=16).method
'mass_mean'
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from haltrace._version import __version__
from haltrace.errors import HaltraceError
from haltrace.steering.engine import STEERABLE

FORMAT_NAME = "haltrace.steering_vector"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
PHASES = ("prompt", "generation", "both")
METHODS = ("probe", "mass_mean", "pca_diff", "sae", "custom")
#: How ``layers`` are numbered; written into every manifest and checked on load (see haltrace.conventions).
LAYER_CONVENTION = ("resid_post.i = output of decoder block i = HF hidden_states[i+1]; resid_pre.i = input of "
                    "block i = HF hidden_states[i] (haltrace.conventions)")
# keys every manifest has; version 2 adds _V2_KEYS
_V1_KEYS = ("hook", "layers", "alpha", "positions", "phase", "method", "model", "hidden_size", "n_layers",
            "provenance", "per_layer")
_V2_KEYS = ("model_revision", "layer_convention", "haltrace_version", "data_fingerprint")
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


class VectorError(HaltraceError):
    """A steering vector file is missing, corrupt, or does not fit the model."""


def _paths(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".safetensors", ".json") else p
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def describe_model(model: Any) -> dict[str, Any]:
    """``model``, ``model_revision``, ``hidden_size`` and ``n_layers`` of a haltrace model, as constructor kwargs.

    The revision is the one the model was loaded at, else the HF config's ``_commit_hash`` (set for Hub
    checkpoints), else ``None`` (a local folder has no revision).

    >>> describe_model(model)
    {'model': 'tiny-llava', 'model_revision': None, 'hidden_size': 32, 'n_layers': 2}
    """
    config = getattr(getattr(model, "hf", None), "config", None)
    name = getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", None) or ""
    revision = getattr(model, "revision", None) or getattr(config, "_commit_hash", None)
    return {"model": str(name), "model_revision": revision, "hidden_size": int(model.hidden_size),
            "n_layers": int(model.n_layers)}


@dataclass
class SteeringVector:
    """A residual-stream direction (one ``[d]`` for all ``layers``, or ``{layer: [d]}``) plus how to apply it.

    ``alpha`` scales the direction when applied; ``positions`` is a rule such as ``"all"``, ``"last"`` or
    ``{"from": "instruction_end"}``; ``phase`` is ``"prompt"``, ``"generation"`` or ``"both"``.
    ``haltrace_version`` is the version that built the vector (``None`` for version-1 files).
    """

    direction: torch.Tensor | dict[int, torch.Tensor]
    layers: list[int]
    hidden_size: int
    hook: str = "resid_post"
    alpha: float = 1.0
    positions: Any = "all"
    phase: str = "both"
    method: str = "custom"
    model: str = ""
    n_layers: int | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    model_revision: str | None = None
    data_fingerprint: str | None = None
    haltrace_version: str | None = __version__

    def __post_init__(self) -> None:
        if isinstance(self.direction, dict):
            self.direction = {int(k): v.detach().float().cpu().contiguous() for k, v in self.direction.items()}
            if sorted(self.direction) != sorted(self.layers):
                raise VectorError(f"direction has layers {sorted(self.direction)} but layers={self.layers}")
        else:
            self.direction = self.direction.detach().float().cpu().contiguous()
        self.layers = [int(x) for x in self.layers]
        if self.phase not in PHASES:
            raise VectorError(f"phase must be one of {PHASES}, got {self.phase!r}")
        if self.hook not in STEERABLE:
            raise VectorError(f"hook must be one of {STEERABLE} (a kind, without '.<layer>'), got {self.hook!r}")
        if len(set(self.layers)) != len(self.layers):
            raise VectorError(f"layers {self.layers} repeat a layer")
        if self.data_fingerprint is None and isinstance(self.provenance.get("data_fingerprint"), str):
            # probes.directions records the store's fingerprint in provenance: lift it to the manifest
            self.data_fingerprint = self.provenance["data_fingerprint"]
        self.validate()

    # ------------------------------------------------------------------------------------------- access
    def for_layer(self, layer: int) -> torch.Tensor:
        """The ``[d]`` direction applied at ``layer`` (unscaled by ``alpha``)."""
        if layer not in self.layers:
            raise KeyError(f"layer {layer} is not steered by this vector; its layers are {self.layers}")
        return self.direction[layer] if isinstance(self.direction, dict) else self.direction

    def interventions(self, alpha: float | None = None) -> list[Any]:
        """One engine ``Add`` per layer at ``<hook>.<layer>``, with this vector's positions and phase; ``alpha``
        overrides the saved strength."""
        from haltrace.steering.engine import Add

        scale = self.alpha if alpha is None else float(alpha)
        return [Add(f"{self.hook}.{layer}", self.for_layer(layer), alpha=scale, positions=self.positions,
                    phase=self.phase) for layer in self.layers]

    @contextmanager
    def apply(self, model: Any, alpha: float | None = None) -> Iterator[Any]:
        """Steer ``model`` with this vector for the block (checked against the model first); hooks are removed
        on exit, also on error.

        >>> vec = SteeringVector.from_mass_mean(torch.ones(4, 32), torch.zeros(4, 32), layers=[1],
        ...                                     **describe_model(model))
        >>> with vec.apply(model, alpha=2.0):
        ...     _ = model.hf.generate(**inputs, max_new_tokens=2, do_sample=False)
        """
        from haltrace.steering.engine import steer

        self.validate(model)
        with steer(model, *self.interventions(alpha)) as handle:
            yield handle

    def validate(self, model: Any = None, *, hidden_size: int | None = None, n_layers: int | None = None) -> None:
        """Check shapes and finiteness, and (given a model or sizes) that it fits; raise :class:`VectorError`."""
        tensors = self.direction.values() if isinstance(self.direction, dict) else [self.direction]
        for t in tensors:
            if t.dim() != 1 or t.shape[0] != self.hidden_size:
                raise VectorError(f"direction has shape {tuple(t.shape)}, expected [{self.hidden_size}] "
                                  f"(hidden_size)")
            if not bool(torch.isfinite(t).all()):
                raise VectorError("direction holds NaN or inf values; the vector is corrupt, rebuild it")
        if not self.layers:
            raise VectorError("a steering vector needs at least one layer")
        if not math.isfinite(float(self.alpha)):
            raise VectorError(f"alpha is {self.alpha}; it must be a finite number")
        if model is not None:
            hidden_size, n_layers = getattr(model, "hidden_size", hidden_size), getattr(model, "n_layers", n_layers)
        name = getattr(model, "name_or_path", None) or "the model"
        made_for = self.model or "another model"
        if hidden_size is not None and hidden_size != self.hidden_size:
            raise VectorError(f"vector hidden size {self.hidden_size} (made for {made_for}) "
                              f"does not match {name}'s hidden size {hidden_size}; build the vector on this model")
        if n_layers is not None and self.n_layers is not None and n_layers != self.n_layers:
            raise VectorError(f"vector was made for a model with {self.n_layers} layers ({made_for}), but "
                              f"{name} has {n_layers} layers; layer indices would point at other blocks")
        limit = n_layers if n_layers is not None else self.n_layers
        if limit is not None and any(not 0 <= x < limit for x in self.layers):
            raise VectorError(f"vector layers {self.layers} are out of range for {name if n_layers else 'its model'} "
                              f"with {limit} layers (0..{limit - 1})")

    # --------------------------------------------------------------------------------------------- I/O
    def manifest(self) -> dict[str, Any]:
        """The JSON manifest written by :meth:`save` (format version 2)."""
        data = {
            "hook": self.hook, "layers": self.layers, "alpha": self.alpha, "positions": self.positions,
            "phase": self.phase, "method": self.method, "model": self.model, "hidden_size": self.hidden_size,
            "n_layers": self.n_layers, "provenance": self.provenance, "model_revision": self.model_revision,
            "layer_convention": LAYER_CONVENTION, "haltrace_version": self.haltrace_version,
            "data_fingerprint": self.data_fingerprint,
        }
        data.update(format=FORMAT_NAME, format_version=FORMAT_VERSION, per_layer=isinstance(self.direction, dict))
        return data

    def save(self, path: str | Path) -> Path:
        """Write ``path.safetensors`` + ``path.json`` atomically; returns the safetensors path."""
        from safetensors.torch import save_file

        from haltrace.trace.store import atomic_write, atomic_write_text

        tensor_path, json_path = _paths(path)
        if isinstance(self.direction, dict):
            tensors = {f"direction.{k}": v for k, v in self.direction.items()}
        else:
            tensors = {"direction": self.direction}
        text = json.dumps(self.manifest(), indent=1, sort_keys=True, allow_nan=False)
        atomic_write(tensor_path, lambda tmp: save_file(tensors, tmp, metadata={"haltrace": text}))
        atomic_write_text(json_path, text + "\n")
        for p in (tensor_path, json_path):  # the atomic temp file is created 0600; a vector is meant to be shared
            p.chmod(0o644)
        return tensor_path

    @classmethod
    def load(cls, path: str | Path, model: Any = None, *, hidden_size: int | None = None,
             n_layers: int | None = None) -> SteeringVector:
        """Read a saved vector (safetensors + JSON only) and validate it, against ``model`` when given.

        Raises :class:`VectorError` for a missing, truncated or non-safetensors file (a pickle is recognised
        and refused without being run), a manifest that is not JSON or lacks keys, NaN/inf values, and a
        vector whose hidden size or layer count differs from ``model``'s (or the given sizes).

        >>> _ = SteeringVector.from_mass_mean(torch.ones(4, 32), torch.zeros(4, 32), layers=[1],
        ...                                   **describe_model(model)).save("vectors/entity")
        >>> SteeringVector.load("vectors/entity", model=model).layers
        [1]
        """
        from safetensors import SafetensorError, safe_open

        tensor_path, json_path = _paths(path)
        if not tensor_path.is_file():
            raise VectorError(f"steering vector {tensor_path} not found")
        _check_container(tensor_path)  # before safetensors parses anything: clear words for pickles/truncation
        try:
            with safe_open(str(tensor_path), framework="pt") as fh:
                meta = (fh.metadata() or {}).get("haltrace")
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        except (SafetensorError, OSError) as err:
            raise VectorError(f"{tensor_path} is not a readable safetensors file ({err})") from None
        manifest = _parse_manifest(meta, tensor_path)
        _check_json_twin(json_path, manifest)
        try:
            vec = cls(direction=_directions(tensors, manifest, tensor_path), **_fields(manifest))
        except VectorError as err:  # shape, NaN, phase, hook...: say which file
            raise VectorError(f"{tensor_path}: {err}") from None
        vec.validate(model, hidden_size=hidden_size, n_layers=n_layers)
        return vec

    def __repr__(self) -> str:
        shape = "per-layer" if isinstance(self.direction, dict) else f"[{self.hidden_size}]"
        return (f"SteeringVector({self.method}, {self.hook} layers={self.layers}, {shape}, alpha={self.alpha}, "
                f"phase={self.phase!r}, model={self.model!r})")

    # ------------------------------------------------------------------------------------- constructors
    @classmethod
    def from_probe(cls, weight: torch.Tensor, *, layers: list[int], pos: torch.Tensor | None = None,
                   neg: torch.Tensor | None = None, **kw: Any) -> SteeringVector:
        """From a probe weight in residual units (``score = x @ weight + b``): unit direction, scaled by the
        class-mean gap along it when class means/rows ``pos``/``neg`` are given (Marks & Tegmark).

        ``weight`` may be ``[d]`` or ``{layer: [d]}``; ``pos``/``neg`` then ``[n, d]`` or ``{layer: [n, d]}``.
        """
        def one(w: torch.Tensor, p: torch.Tensor | None, q: torch.Tensor | None) -> torch.Tensor:
            unit = w.float() / w.float().norm().clamp_min(1e-12)
            if p is None or q is None:
                return unit
            gap = (_mean(p) - _mean(q)) @ unit
            return unit * gap

        direction = _per_layer(weight, pos, neg, one)
        kw.setdefault("hidden_size", _width(direction))
        kw.setdefault("method", "probe")
        return cls(direction=direction, layers=layers, **kw)

    @classmethod
    def from_mass_mean(cls, pos: torch.Tensor, neg: torch.Tensor, *, layers: list[int], **kw: Any) -> SteeringVector:
        """``mean(pos) - mean(neg)`` in residual units (CAA / ITI style); rows ``[n, d]`` or ``{layer: [n, d]}``."""
        direction = _per_layer(pos, neg, None, lambda p, q, _: _mean(p) - _mean(q))
        kw.setdefault("hidden_size", _width(direction))
        kw.setdefault("method", "mass_mean")
        return cls(direction=direction, layers=layers, **kw)

    @classmethod
    def from_pca_pairs(cls, pos: torch.Tensor, neg: torch.Tensor, *, layers: list[int], seed: int = 0,
                       **kw: Any) -> SteeringVector:
        """RepE: first principal component of paired differences ``pos[i] - neg[i]`` with random sign flips.

        Flipping each pair's sign at random (as RepE shuffles its pairs) keeps PCA's centring from removing
        the contrast itself (repeng issue #28). The unit component is signed towards ``pos`` and scaled by the
        mean difference's projection on it, so it is in residual units like the other methods.
        """
        def one(p: torch.Tensor, q: torch.Tensor, _: Any) -> torch.Tensor:
            if p.shape != q.shape or p.dim() != 2:
                raise ValueError(f"pos and neg must be paired [n, d] rows, got {tuple(p.shape)} and {tuple(q.shape)}")
            diffs = (p - q).float()
            gen = torch.Generator().manual_seed(seed)
            signs = torch.randint(0, 2, (diffs.shape[0], 1), generator=gen).float() * 2 - 1
            flipped = diffs * signs
            flipped = flipped - flipped.mean(0)
            component = torch.linalg.svd(flipped, full_matrices=False).Vh[0]
            gap = diffs.mean(0) @ component
            return component * gap  # sign and scale from the unflipped mean difference
        direction = _per_layer(pos, neg, None, one)
        kw.setdefault("hidden_size", _width(direction))
        kw.setdefault("method", "pca_diff")
        return cls(direction=direction, layers=layers, **kw)


def _mean(x: torch.Tensor) -> torch.Tensor:
    return x.float().mean(0) if x.dim() == 2 else x.float()


def _width(direction: Any) -> int:
    return int(next(iter(direction.values())).shape[0] if isinstance(direction, dict) else direction.shape[0])


def _per_layer(a: Any, b: Any, c: Any, fn: Any) -> Any:
    if isinstance(a, dict):
        return {k: fn(a[k], b[k] if isinstance(b, dict) else b, c[k] if isinstance(c, dict) else c) for k in a}
    return fn(a, b, c)


# ------------------------------------------------------------------------------------------ load checks
_NO_PICKLE = "haltrace never unpickles files, because loading a pickle can run arbitrary code"


def _check_container(path: Path) -> None:
    """Refuse in plain words what safetensors would only call a bad header: pickles, ``torch.save`` zips and
    truncated files. Only bytes are read; nothing in the file is executed."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(9)
        fh.seek(8)
        # A safetensors file starts with a u64 header length followed by the JSON header's "{". Its length
        # bytes can look like a pickle's PROTO opcode (0x80 0x02..0x05, e.g. a 1152-byte header), so only a
        # file that is not laid out as safetensors is checked for pickle and zip signatures.
        looks_safetensors = len(head) == 9 and head[8:9] == b"{"
        if not looks_safetensors and len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # pickle PROTO
            raise VectorError(f"{path} is a Python pickle, not a safetensors file; {_NO_PICKLE}. Save vectors "
                              "with SteeringVector.save (safetensors + JSON)")
        if not looks_safetensors and head[:4] == b"PK\x03\x04":  # torch.save's zip format holds a pickle
            raise VectorError(f"{path} is a zip archive (torch.save format, which holds a pickle), not a "
                              f"safetensors file; {_NO_PICKLE}")
        if len(head) < 8:
            raise VectorError(f"{path} is truncated or empty ({size} bytes): not a safetensors file")
        n = struct.unpack("<Q", head[:8])[0]
        if n > _MAX_HEADER:
            raise VectorError(f"{path} is not a safetensors file (its first 8 bytes do not hold a header length); "
                              f"{_NO_PICKLE}")
        if 8 + n > size:
            raise VectorError(f"{path} is truncated: its header should be {n} bytes but only {size - 8} follow; "
                              "copy or save the vector again")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise VectorError(f"{path} is not a safetensors file (its header is not JSON); {_NO_PICKLE}") from None
    ends = [v["data_offsets"][1] for k, v in (header.items() if isinstance(header, dict) else [])
            if k != "__metadata__" and isinstance(v, dict) and isinstance(v.get("data_offsets"), list)]
    need = 8 + n + max((int(e) for e in ends), default=0)
    if size < need:
        raise VectorError(f"{path} is truncated: its header describes {need} bytes but the file holds {size}; "
                          "copy or save the vector again")


def _parse_manifest(meta: str | None, path: Path) -> dict[str, Any]:
    if meta is None:
        raise VectorError(f"{path} is not a haltrace steering vector (no {FORMAT_NAME} manifest in its header)")
    try:
        manifest = json.loads(meta)
    except json.JSONDecodeError as err:
        raise VectorError(f"{path}: the embedded manifest is not valid JSON ({err}); the file is corrupt") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise VectorError(f"{path} is not a haltrace steering vector (no {FORMAT_NAME} manifest)")
    version = manifest.get("format_version")
    if version not in READABLE_VERSIONS:
        hint = "; upgrade haltrace" if isinstance(version, int) and version > FORMAT_VERSION else ""
        raise VectorError(f"{path} has vector format {version!r}, this haltrace reads versions "
                          f"{list(READABLE_VERSIONS)}{hint}")
    missing = [k for k in _V1_KEYS + (_V2_KEYS if version >= 2 else ()) if k not in manifest]
    if missing:
        raise VectorError(f"{path}: manifest lacks keys {missing}; the file is corrupt or hand-edited")
    if version >= 2 and manifest["layer_convention"] != LAYER_CONVENTION:
        raise VectorError(f"{path} numbers layers as {manifest['layer_convention']!r}, but this haltrace uses "
                          f"{LAYER_CONVENTION!r}; convert the layer indices before loading")
    _check_types(manifest, path)
    return manifest


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_types(m: dict[str, Any], path: Path) -> None:
    checks = {
        "hook": isinstance(m["hook"], str),
        "layers": isinstance(m["layers"], list) and all(_is_int(x) for x in m["layers"]),
        "alpha": isinstance(m["alpha"], (int, float)) and not isinstance(m["alpha"], bool),
        "phase": isinstance(m["phase"], str),
        "positions": isinstance(m["positions"], (str, list, dict)),
        "method": isinstance(m["method"], str),
        "model": isinstance(m["model"], str),
        "hidden_size": _is_int(m["hidden_size"]) and m["hidden_size"] > 0,
        "n_layers": m["n_layers"] is None or (_is_int(m["n_layers"]) and m["n_layers"] > 0),
        "provenance": isinstance(m["provenance"], dict),
        "per_layer": isinstance(m["per_layer"], bool),
    }
    checks.update({k: m.get(k) is None or isinstance(m[k], str) for k in _V2_KEYS})
    bad = {k: m.get(k) for k, ok in checks.items() if not ok}
    if bad:
        raise VectorError(f"{path}: manifest values of the wrong type: {bad}")


def _check_json_twin(json_path: Path, manifest: dict[str, Any]) -> None:
    """The JSON beside the tensors must say what the embedded manifest says (that one is authoritative)."""
    if not json_path.is_file():
        return  # optional: the safetensors file alone is a complete vector
    try:
        twin = json.loads(json_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise VectorError(f"{json_path} is not valid JSON ({err}); delete it or save the vector again") from None
    if twin != manifest:
        keys = sorted(k for k in set(twin) | set(manifest) if twin.get(k) != manifest.get(k)) \
            if isinstance(twin, dict) else ["(not an object)"]
        raise VectorError(f"{json_path} disagrees with the manifest inside its .safetensors file on {keys}; "
                          "the embedded one is authoritative: delete the JSON or save the vector again")


def _directions(tensors: dict[str, torch.Tensor], manifest: dict[str, Any], path: Path) -> Any:
    bad = [k for k, t in tensors.items() if not t.is_floating_point()]
    if bad:
        raise VectorError(f"{path}: tensors {bad} are not floating point")
    if not manifest["per_layer"]:
        if set(tensors) != {"direction"}:
            raise VectorError(f"{path} holds tensors {sorted(tensors)}; a single-direction vector holds only "
                              "'direction'")
        return tensors["direction"]
    direction = {}
    for key, value in tensors.items():
        name, _, index = key.partition(".")
        if name != "direction" or not index.lstrip("-").isdigit():
            raise VectorError(f"{path} holds an unexpected tensor {key!r}; a per-layer vector holds "
                              "'direction.<layer>' only")
        direction[int(index)] = value
    if not direction:
        raise VectorError(f"{path} holds no 'direction.<layer>' tensor")
    return direction


def _fields(manifest: dict[str, Any]) -> dict[str, Any]:
    keys = ("hook", "layers", "alpha", "positions", "phase", "method", "model", "hidden_size", "n_layers",
            "provenance")
    fields = {k: manifest[k] for k in keys}
    # version 1 had no such keys: unknown, not "this version"
    fields.update({k: manifest.get(k) for k in ("model_revision", "data_fingerprint", "haltrace_version")})
    return fields
