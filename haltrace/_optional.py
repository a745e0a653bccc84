"""The one gate to haltrace's optional packages: each is an extra of ``pip install haltrace``.

- ``nnsight`` (extra ``nnsight``): ``capture_with(..., backend="nnsight")``, remote (NDIF) tracing
- ``transformer_lens`` (extra ``tl``): ``capture_with(..., backend="transformer_lens")``
- ``sae_lens`` (extra ``sae``): ``haltrace sae ...``, :mod:`haltrace.probes.sae`
- ``gguf`` (extra ``gguf``): ``haltrace export --format gguf``, reading ``.gguf`` control vectors

``haltrace[all]`` installs the four. Every import of these packages goes through :func:`require`, which names
the extra when the package is absent, and lets every other import error through unchanged (a dependency
missing *inside* an installed package is a broken install, not a missing extra)::

    >>> sae_lens = require("sae_lens", extra="sae", feature="training an SAE")   # doctest: +SKIP
    MissingExtraError: training an SAE needs the sae-lens package, which is not installed:
    pip install 'haltrace[sae]'

Standard library and :mod:`haltrace.errors` only, so that importing this module costs nothing.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from haltrace.errors import InputError

#: extra name -> the packages it installs (kept in step with pyproject.toml's optional-dependencies)
EXTRAS: dict[str, tuple[str, ...]] = {
    "nnsight": ("nnsight",),
    "tl": ("transformer-lens",),
    "sae": ("sae-lens",),
    "gguf": ("gguf",),
}

#: top-level module -> (extra, distribution name)
_MODULES: dict[str, tuple[str, str]] = {
    "nnsight": ("nnsight", "nnsight"),
    "transformer_lens": ("tl", "transformer-lens"),
    "sae_lens": ("sae", "sae-lens"),
    "gguf": ("gguf", "gguf"),
}


class MissingExtraError(InputError, ImportError):
    """An optional package is not installed; the message names the extra to install.

    An :class:`~haltrace.errors.InputError` (the command line prints it as one ``Error:`` line, exit code 2) and
    an ``ImportError`` (code that catches a failed import keeps working)."""


def install_hint(extra: str) -> str:
    """The command that installs ``extra``: ``pip install 'haltrace[sae]'``."""
    return f"pip install 'haltrace[{extra}]'"


def require(module: str, *, extra: str | None = None, feature: str | None = None) -> ModuleType:
    """Import ``module`` (``"sae_lens"``, ``"nnsight.modeling.transformers"``, ...) of an optional package.

    Raises :class:`MissingExtraError` naming ``pip install 'haltrace[<extra>]'`` when the package (or, for an
    installed package of another version, the submodule) does not exist; any other error raised while importing
    it propagates unchanged. ``extra`` defaults to the package's own extra; ``feature`` says what needed it.
    """
    top = module.partition(".")[0]
    default_extra, dist = _MODULES.get(top, (extra, top))
    extra = extra or default_extra
    if extra not in EXTRAS:
        raise ValueError(f"unknown haltrace extra {extra!r}; choose from {', '.join(EXTRAS)}")
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        who = f"{feature} needs" if feature else "this needs"
        if exc.name == top:
            raise MissingExtraError(f"{who} the {dist} package, which is not installed: "
                                    f"{install_hint(extra)}") from None
        if exc.name is not None and f"{module}.".startswith(f"{exc.name}.") and exc.name.startswith(f"{top}."):
            raise MissingExtraError(f"{who} {module}, which the installed {dist} does not have (another version); "
                                    f"install the supported one: {install_hint(extra)}") from exc
        raise  # something missing inside the package: a broken install, shown as it is


__all__ = ["EXTRAS", "MissingExtraError", "install_hint", "require"]
