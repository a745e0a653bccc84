"""Export entry points: :func:`export` dispatches to llama.cpp GGUF (:func:`haltrace.export.gguf.export_gguf`) or
haltrace's own safetensors + JSON format (:func:`export_haltrace`, the source of truth), and both return an
:class:`ExportResult` saying what went where.

Example
-------
>>> import torch
>>> from haltrace.export import export
>>> from haltrace.steering.vector import SteeringVector
>>> vec = SteeringVector.from_mass_mean(torch.ones(4, 32), torch.zeros(4, 32), layers=[1], hidden_size=32)
>>> export(vec, "dummy.gguf", format="gguf", model_hint="llava")
ExportResult(format='gguf', path=PosixPath('dummy.gguf'), ..., layers={'resid_post.1': 'direction.1'}, ...)
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from haltrace.export.base import ExportError, ExportResult

# haltrace.export.convert (torch) is imported inside the functions: the command line reads FORMATS and
# ExportResult from here without loading torch


def export_haltrace(vector: Any, path: str | Path, *, n_layers: int | None = None) -> ExportResult:
    """Write ``vector`` in haltrace's own format (``path.safetensors`` + ``path.json``), the source of truth.

    >>> import torch
    >>> from haltrace.steering.vector import SteeringVector
    >>> vec = SteeringVector.from_mass_mean(torch.ones(4, 32), torch.zeros(4, 32), layers=[1], hidden_size=32)
    >>> export_haltrace(vec, "vectors/dummy").files
    [PosixPath('vectors/dummy.safetensors'), PosixPath('vectors/dummy.json')]
    """
    from haltrace.export.convert import as_vector

    vec = as_vector(vector, n_layers=n_layers)
    if n_layers is not None and vec.n_layers is None:
        vec = replace(vec, n_layers=n_layers)  # a copy: never change the caller's vector
    tensor_path = vec.save(path)
    json_path = tensor_path.with_suffix(".json")
    names = {f"{vec.hook}.{x}": (f"direction.{x}" if isinstance(vec.direction, dict) else "direction")
             for x in vec.layers}
    return ExportResult("safetensors", tensor_path, [tensor_path, json_path], names, vec.hidden_size,
                        vec.n_layers, float(vec.alpha), vec.method, vec.model)


#: export formats the CLI offers
FORMATS = ("gguf", "safetensors")


def export(vector: Any, path: str | Path, *, format: str = "gguf", model_hint: str | None = None,
           n_layers: int | None = None) -> ExportResult:
    """Export to ``format`` (``"gguf"`` or ``"safetensors"``); see :func:`export_gguf` / :func:`export_haltrace`."""
    if format == "gguf":
        from haltrace.export.gguf import export_gguf  # imports the optional gguf package only when asked

        return export_gguf(vector, path, model_hint=model_hint, n_layers=n_layers)
    if format == "safetensors":
        if model_hint is not None:
            raise ExportError("model_hint is a GGUF key; the safetensors format records the model in its manifest")
        return export_haltrace(vector, path, n_layers=n_layers)
    raise ExportError(f"unknown export format {format!r}; choose from {', '.join(FORMATS)}")


