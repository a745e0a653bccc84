"""What every export module shares: :class:`ExportError` and :class:`ExportResult`. No torch here, so the command
line reads them (and :data:`haltrace.export.formats.FORMATS`) without loading it; the modules above
(``gguf_read`` -> ``convert`` -> ``gguf`` -> ``formats``) import from here, never the other way round.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from haltrace.errors import HaltraceError


class ExportError(HaltraceError):
    """A steering artifact cannot be converted or exported; the message says why."""


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
