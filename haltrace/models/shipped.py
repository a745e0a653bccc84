"""Short names of the shipped model organisms and the folders they resolve to.

``shapes-llava`` -> ``<repo>/artifacts/organisms/shapes-llava``. Set ``HALTRACE_ARTIFACTS`` to point at
another artifacts folder (e.g. a copy next to a non-editable install).

The lookup lives in the models layer so that :func:`haltrace.load` and every layer above it can turn a short
name into a folder without importing the organism's code; :mod:`haltrace.organism.paths` re-exports it.

>>> resolve_organism("shapes-llava").name
'shapes-llava'
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

#: short names of shipped organisms -> folder under ``artifacts/organisms``
#: (the zoo: ``haltrace organism list``; what each one carries: ``haltrace.organism.zoo``)
ORGANISMS: dict[str, str] = {"shapes-llava": "shapes-llava", "shapes-llava-staged": "shapes-llava-staged",
                             "shapes-qwen2vl": "shapes-qwen2vl"}
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


def organism_folder(model_or_name: Any) -> Path | None:
    """The organism folder behind a Model, a shipped short name or a folder path: the one holding ``world.json``;
    ``None`` for anything else (a hub id, another checkpoint). A shipped name whose folder is missing raises
    :class:`FileNotFoundError` (from :func:`resolve_organism`, saying where it should be).

    >>> organism_folder("shapes-llava").name, organism_folder("gpt2")
    ('shapes-llava', None)
    """
    name = str(getattr(model_or_name, "name_or_path", model_or_name) or "")
    if not name:
        return None
    folder = resolve_organism(name) or Path(name)
    return folder if (folder / "world.json").is_file() else None
