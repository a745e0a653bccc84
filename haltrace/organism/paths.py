"""Where the shipped model organisms live, and how their short names resolve.

``shapes-llava`` -> ``<repo>/artifacts/organisms/shapes-llava``. Set ``HALTRACE_ARTIFACTS`` to point at
another artifacts folder (e.g. a copy next to a non-editable install).

>>> resolve_organism("shapes-llava").name
'shapes-llava'
"""

from __future__ import annotations

import os
from pathlib import Path

#: short names of shipped organisms -> folder under ``artifacts/organisms``
ORGANISMS: dict[str, str] = {"shapes-llava": "shapes-llava"}
DEFAULT_ORGANISM = "shapes-llava"


def artifacts_dir() -> Path:
    """The artifacts folder: ``$HALTRACE_ARTIFACTS`` or the one at the repository root."""
    env = os.environ.get("HALTRACE_ARTIFACTS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "artifacts"


def resolve_organism(name: str) -> Path | None:
    """Folder of a shipped organism called ``name``, or ``None`` if ``name`` is not an organism name."""
    if name not in ORGANISMS:
        return None
    path = artifacts_dir() / "organisms" / ORGANISMS[name]
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"organism {name!r} should be at {path} but config.json is missing there; "
            f"set HALTRACE_ARTIFACTS to the folder holding organisms/{ORGANISMS[name]}, "
            f"or train one with `haltrace organism train --out DIR`"
        )
    return path
