"""Read a llama.cpp control vector (GGUF) back: :func:`read_gguf` applies llama.cpp's own checks and maps
``direction.N`` back to haltrace ``resid_post`` layers (file layout: :mod:`haltrace.export.gguf`, which writes
them). Below :mod:`haltrace.export.convert`, which loads ``.gguf`` inputs through it.

>>> from haltrace.export.gguf import export_gguf
>>> _ = export_gguf(SteeringVector(torch.ones(16), layers=[2], hidden_size=16), "entity.gguf")
>>> cv = read_gguf("entity.gguf")
>>> cv.to_steering_vector().layers
[2]
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from haltrace.conventions import llama_cpp_index_from_tensor_name, resid_post_layer_from_llama_cpp
from haltrace.export.base import ExportError
from haltrace.steering.vector import SteeringVector, VectorError

ARCH = "controlvector"
MANIFEST_KEY = "haltrace.manifest"


def _import_gguf() -> Any:
    """The optional ``gguf`` package (:class:`haltrace._optional.MissingExtraError` naming ``haltrace[gguf]``)."""
    from haltrace._optional import require

    return require("gguf", extra="gguf", feature="GGUF export")


# ------------------------------------------------------------------------------------------------- read
@dataclass
class ControlVector:
    """A llama.cpp control vector read back: what llama.cpp would add, keyed by haltrace ``resid_post`` layer."""

    directions: dict[int, torch.Tensor]
    tensor_names: dict[int, str]
    hidden_size: int
    model_hint: str | None
    layer_count: int | None
    metadata: dict[str, Any]

    @property
    def manifest(self) -> dict[str, Any] | None:
        """The haltrace manifest embedded by :func:`export_gguf` (None for files from other tools)."""
        text = self.metadata.get(MANIFEST_KEY)
        try:
            return json.loads(text) if isinstance(text, str) else None
        except json.JSONDecodeError:
            return None

    def to_steering_vector(self) -> SteeringVector:
        """A ``resid_post`` :class:`SteeringVector` with ``alpha=1`` that adds exactly what the file holds."""
        man = self.manifest or {}
        layers = sorted(self.directions)
        try:
            return SteeringVector(
                direction=dict(self.directions), layers=layers, hidden_size=self.hidden_size, hook="resid_post",
                alpha=1.0, method=str(man.get("method", "custom")),
                model=str(man.get("model") or self.model_hint or ""),
                # controlvector.layer_count is advisory: repeng writes the number of directions there and
                # llama.cpp's cvector-generator n_layer - 1; only haltrace's own manifest states the model's count
                n_layers=self.layer_count if self.manifest else None, model_revision=man.get("model_revision"),
                data_fingerprint=man.get("data_fingerprint"),
                provenance={"from_gguf": True, "alpha_baked_in": man.get("alpha"), "source_manifest": man or None})
        except VectorError as err:
            raise ExportError(f"control vector does not make a valid steering vector: {err}") from None


def _value(field_: Any) -> Any:
    if hasattr(field_, "contents"):  # gguf >= 0.11
        return field_.contents()
    part = field_.parts[field_.data[0]]  # older gguf: decode the raw parts
    return bytes(part).decode("utf-8") if part.dtype == np.uint8 else part.tolist()[0]


def read_gguf(path: str | Path) -> ControlVector:
    """Read a control vector with ``gguf.GGUFReader``, applying llama.cpp's own checks (architecture,
    ``direction.<N>`` names with N >= 1, float32, 1-D, one size) and mapping ``direction.N`` back to
    ``resid_post`` layers through :func:`haltrace.conventions.resid_post_layer_from_llama_cpp`.

    >>> from haltrace.export.gguf import export_gguf
    >>> _ = export_gguf(SteeringVector(torch.ones(4096), layers=[2], hidden_size=4096), "entity.gguf")
    >>> cv = read_gguf("entity.gguf")
    >>> cv.directions[2].shape, cv.tensor_names[2]
    (torch.Size([4096]), 'direction.2')
    """
    gguf = _import_gguf()
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"control vector {path} not found")
    try:
        reader = gguf.GGUFReader(str(path))
        metadata = {name: _value(f) for name, f in reader.fields.items() if not name.startswith("GGUF.")}
        raw = [(t.name, t.tensor_type, [int(s) for s in t.shape], np.array(t.data, dtype=np.float32, copy=True))
               for t in reader.tensors]
    except (ValueError, OSError, IndexError, KeyError, struct.error) as err:
        raise ExportError(f"{path} is not a readable GGUF file ({type(err).__name__}: {err})") from None
    arch = metadata.get("general.architecture")
    if arch != ARCH:
        raise ExportError(f"{path} has general.architecture {arch!r}, not {ARCH!r}: not a control vector")
    directions: dict[int, torch.Tensor] = {}
    names: dict[int, str] = {}
    for name, kind, shape, data in raw:
        try:
            layer = resid_post_layer_from_llama_cpp(llama_cpp_index_from_tensor_name(name))
        except ValueError as err:
            raise ExportError(f"{path}: {err}") from None
        if int(kind) != int(gguf.GGMLQuantizationType.F32):
            raise ExportError(f"{path}: {name} has type {kind!r}; llama.cpp needs float32")
        if len(shape) != 1:
            raise ExportError(f"{path}: {name} has shape {shape}; llama.cpp needs a 1-D tensor")
        if directions and shape[0] != next(iter(directions.values())).shape[0]:
            raise ExportError(f"{path}: {name} has size {shape[0]}, other directions differ; llama.cpp rejects it")
        if layer in directions:
            raise ExportError(f"{path}: {name} appears twice")
        directions[layer], names[layer] = torch.from_numpy(data.reshape(-1)), name
    if not directions:
        raise ExportError(f"{path} holds no direction.<N> tensor")
    count = metadata.get(f"{ARCH}.layer_count")
    hint = metadata.get(f"{ARCH}.model_hint")
    return ControlVector(dict(sorted(directions.items())), dict(sorted(names.items())),
                         int(next(iter(directions.values())).shape[0]), hint if isinstance(hint, str) else None,
                         int(count) if count is not None else None, metadata)

