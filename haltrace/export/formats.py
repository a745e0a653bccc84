"""Export entry points: :func:`export` dispatches to llama.cpp GGUF (:func:`haltrace.export.gguf.export_gguf`) or
haltrace's own safetensors + JSON format (:func:`export_haltrace`, the source of truth), and both return an
:class:`ExportResult` saying what went where.

Example
-------
>>> from haltrace.export import export
>>> export("runs/dummy", "dummy.gguf", format="gguf", model_hint="llava")      # doctest: +SKIP
ExportResult(format='gguf', path=PosixPath('dummy.gguf'), ..., layers={'resid_post.1': 'direction.1'}, ...)
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from haltrace.export.convert import ExportError, as_vector


@dataclass
class ExportResult:
    """What an export wrote: ``layers`` maps each haltrace hook to the tensor that holds it in the file."""

    format: str
    path: Path
    files: list[Path]
    layers: dict[str, str]
    hidden_size: int
    n_layers: int | None
    alpha: float
    method: str
    model: str
    model_hint: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (paths as strings)."""
        out = dict(self.__dict__)
        out.update(path=str(self.path), files=[str(f) for f in self.files])
        return out


def export_haltrace(vector: Any, path: str | Path, *, n_layers: int | None = None) -> ExportResult:
    """Write ``vector`` in haltrace's own format (``path.safetensors`` + ``path.json``), the source of truth.

    >>> export_haltrace("runs/dummy", "vectors/dummy")   # doctest: +SKIP
    """
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


