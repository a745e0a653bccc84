"""``SteeringVector``: a direction in a model's residual stream, with everything needed to apply it safely.

A vector is saved as two files written atomically: ``NAME.safetensors`` (the tensors; the manifest is also
embedded in its header) and ``NAME.json`` (the same manifest, for people and tools). Loading reads only
safetensors and JSON, never pickle, and validates shapes, finiteness and, given a model, its size.

Directions point from label 0 to label 1 of the data they came from (``provenance["positive"]`` names
label 1). Layer indices follow :mod:`haltrace.conventions` (``resid_post.i`` = output of block ``i``).

Example
-------
>>> import torch
>>> pos, neg = torch.randn(8, 16) + 1, torch.randn(8, 16)
>>> vec = SteeringVector.from_mass_mean(pos, neg, layers=[2], hidden_size=16, model="demo")
>>> vec.direction.shape, vec.layers
(torch.Size([16]), [2])
>>> vec.save("/tmp/demo_vec")                                             # doctest: +SKIP
>>> SteeringVector.load("/tmp/demo_vec", hidden_size=16).method           # doctest: +SKIP
'mass_mean'
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

FORMAT_NAME = "haltrace.steering_vector"
FORMAT_VERSION = 1
PHASES = ("prompt", "generation", "both")
METHODS = ("probe", "mass_mean", "pca_diff", "sae", "custom")


class VectorError(ValueError):
    """A steering vector file is missing, corrupt, or does not fit the model."""


def _paths(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".safetensors", ".json") else p
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


@dataclass
class SteeringVector:
    """A residual-stream direction (one ``[d]`` for all ``layers``, or ``{layer: [d]}``) plus how to apply it.

    ``alpha`` scales the direction when applied; ``positions`` is a rule such as ``"all"``, ``"last"`` or
    ``{"from": "instruction_end"}``; ``phase`` is ``"prompt"``, ``"generation"`` or ``"both"``.
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
        self.validate()

    # ------------------------------------------------------------------------------------------- access
    def for_layer(self, layer: int) -> torch.Tensor:
        """The ``[d]`` direction applied at ``layer`` (unscaled by ``alpha``)."""
        if layer not in self.layers:
            raise KeyError(f"layer {layer} is not steered by this vector; its layers are {self.layers}")
        return self.direction[layer] if isinstance(self.direction, dict) else self.direction

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
        if model is not None:
            hidden_size, n_layers = getattr(model, "hidden_size", hidden_size), getattr(model, "n_layers", n_layers)
        name = getattr(model, "name_or_path", None) or "the model"
        if hidden_size is not None and hidden_size != self.hidden_size:
            raise VectorError(f"vector hidden size {self.hidden_size} (made for {self.model or 'another model'}) "
                              f"does not match {name}'s hidden size {hidden_size}; build the vector on this model")
        limit = n_layers if n_layers is not None else self.n_layers
        if limit is not None and any(not 0 <= x < limit for x in self.layers):
            raise VectorError(f"vector layers {self.layers} are out of range for {name if n_layers else 'its model'} "
                              f"with {limit} layers (0..{limit - 1})")

    # --------------------------------------------------------------------------------------------- I/O
    def manifest(self) -> dict[str, Any]:
        data = {
            "hook": self.hook, "layers": self.layers, "alpha": self.alpha, "positions": self.positions,
            "phase": self.phase, "method": self.method, "model": self.model, "hidden_size": self.hidden_size,
            "n_layers": self.n_layers, "provenance": self.provenance,
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

        >>> vec = SteeringVector.load("vectors/entity", model=model)  # doctest: +SKIP
        """
        from safetensors import SafetensorError, safe_open

        tensor_path, _ = _paths(path)
        if not tensor_path.is_file():
            raise VectorError(f"steering vector {tensor_path} not found")
        try:
            with safe_open(str(tensor_path), framework="pt") as fh:
                meta = (fh.metadata() or {}).get("haltrace")
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        except (SafetensorError, OSError) as err:
            raise VectorError(f"{tensor_path} is not a readable safetensors file ({err})") from None
        try:
            manifest = json.loads(meta) if meta else None
        except json.JSONDecodeError:
            manifest = None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
            raise VectorError(f"{tensor_path} is not a haltrace steering vector (no {FORMAT_NAME} manifest)")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise VectorError(f"{tensor_path} has vector format {manifest.get('format_version')}, this haltrace "
                              f"reads {FORMAT_VERSION}")
        if manifest.get("per_layer"):
            direction: Any = {int(k.split(".", 1)[1]): v for k, v in tensors.items() if k.startswith("direction.")}
        elif "direction" in tensors:
            direction = tensors["direction"]
        else:
            raise VectorError(f"{tensor_path} holds no 'direction' tensor")
        keys = ("hook", "layers", "alpha", "positions", "phase", "method", "model", "hidden_size", "n_layers",
                "provenance")
        try:
            vec = cls(direction=direction, **{k: manifest[k] for k in keys})
        except KeyError as err:
            raise VectorError(f"{tensor_path}: manifest lacks {err}") from None
        vec.validate(model, hidden_size=hidden_size, n_layers=n_layers)
        return vec

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

    def __repr__(self) -> str:
        shape = "per-layer" if isinstance(self.direction, dict) else f"[{self.hidden_size}]"
        return (f"SteeringVector({self.method}, {self.hook} layers={self.layers}, {shape}, alpha={self.alpha}, "
                f"phase={self.phase!r}, model={self.model!r})")


def _mean(x: torch.Tensor) -> torch.Tensor:
    return x.float().mean(0) if x.dim() == 2 else x.float()


def _width(direction: Any) -> int:
    return int(next(iter(direction.values())).shape[0] if isinstance(direction, dict) else direction.shape[0])


def _per_layer(a: Any, b: Any, c: Any, fn: Any) -> Any:
    if isinstance(a, dict):
        return {k: fn(a[k], b[k] if isinstance(b, dict) else b, c[k] if isinstance(c, dict) else c) for k in a}
    return fn(a, b, c)
