"""Where the shipped model organisms live, and how their short names resolve.

``shapes-llava`` -> ``<repo>/artifacts/organisms/shapes-llava``. Set ``HALTRACE_ARTIFACTS`` to point at
another artifacts folder (e.g. a copy next to a non-editable install).

The lookup itself is :mod:`haltrace.models.shipped` (one copy, in the models layer, so that
:func:`haltrace.load` resolves short names without importing the organism); this module re-exports it.

>>> resolve_organism("shapes-llava").name
'shapes-llava'

:func:`organism_world` is the one lookup of the ShapesWorld behind a model, a short name or a folder (every
command, data-source hook and evaluation that needs the organism's world goes through it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from haltrace.models.shipped import (
    DEFAULT_ORGANISM,
    ORGANISMS,
    artifacts_dir,
    organism_folder,
    resolve_organism,
)

if TYPE_CHECKING:
    from haltrace.organism.world import ShapesWorld

__all__ = ["DEFAULT_ORGANISM", "ORGANISMS", "artifacts_dir", "organism_folder", "organism_world", "resolve_organism"]


def organism_world(model_or_name: Any) -> ShapesWorld | None:
    """The ShapesWorld behind a Model, a shipped short name or an organism folder (its ``world.json``); ``None``
    for any other model (see :func:`~haltrace.models.shipped.organism_folder`).

    >>> organism_world("shapes-llava").config.kinds[:2]
    ('strawberry', 'banana')
    >>> organism_world("gpt2") is None
    True
    """
    folder = organism_folder(model_or_name)
    if folder is None:
        return None
    from haltrace.organism.train import load_world

    return load_world(folder)
