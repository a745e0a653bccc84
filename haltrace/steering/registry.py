"""The method registry: every steering method is a class with ``fit(model, data, ...)`` returning a
:class:`FittedIntervention` (engine interventions + provenance), registered under a short name.

>>> from haltrace.steering.registry import get_method, list_methods
>>> "pvp" in list_methods()  # doctest: +SKIP
True
>>> fitted = get_method("pvp").fit(model, direction="pixels")  # doctest: +SKIP
>>> with fitted.apply(model):  # doctest: +SKIP
...     model.hf.generate(**inputs)
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from haltrace.steering.engine import Intervention, SteeringHandle, steer

# Method modules, imported on first registry access (one file per method).
_METHOD_MODULES = (
    "haltrace.steering.pvp",
    "haltrace.steering.truthprint",
    "haltrace.steering.vti",
    "haltrace.steering.erasure",
    "haltrace.steering.vista",
    "haltrace.steering.vhr",
    "haltrace.steering.iti",
    "haltrace.steering.caa",
    "haltrace.steering.dola",
)

_REGISTRY: dict[str, type[Method]] = {}


@dataclass
class FittedIntervention:
    """What a method's ``fit`` returns: engine interventions to install, plus provenance.

    Every registered method's fit is engine interventions only (gated edits, per-prompt detection, decoding-side
    logits edits included), so :func:`haltrace.steering.steer`, :meth:`apply`, ``save_fitted`` and
    ``load_fitted`` handle every fit whole. ``generate_kwargs`` is for a third-party method that needs
    ``generate()`` arguments: :meth:`apply` cannot pass them (pass ``**fitted.generate_kwargs`` yourself) and
    ``steer(model, fitted)`` refuses such a fit rather than drop them.
    """

    method: str
    interventions: list[Intervention] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)
    generate_kwargs: dict[str, Any] = field(default_factory=dict)

    @contextmanager
    def apply(self, model: Any) -> Iterator[FittedIntervention]:
        """Install everything for the duration of the block; hooks are removed on exit, also on error."""
        from contextlib import ExitStack

        from haltrace.models.base import require_local_weights

        require_local_weights(model, f"applying a fitted {self.method or 'intervention'}")
        with ExitStack() as stack:
            if self.interventions:
                stack.enter_context(steer(model, *self.interventions))
            yield self

    def attach(self, model: Any) -> SteeringHandle:
        """Install like :meth:`apply` but until ``handle.remove()`` (for notebooks); a failed install leaves
        nothing behind.

        >>> handle = fitted.attach(model)        # doctest: +SKIP
        >>> model.hf.generate(**inputs)          # doctest: +SKIP
        >>> handle.remove()                      # doctest: +SKIP
        """
        from contextlib import ExitStack

        with ExitStack() as stack:
            stack.enter_context(self.apply(model))
            installed = stack.pop_all()  # reached only when everything went in
        return SteeringHandle([_Closer(installed)])


class _Closer:
    """Adapts an ``ExitStack`` to the ``remove()`` that :class:`SteeringHandle` calls."""

    def __init__(self, stack: Any):
        self._stack = stack

    def remove(self) -> None:
        self._stack.close()


class Method:
    """Base class: subclasses set ``name``, ``summary`` and implement ``fit`` returning engine interventions
    (a method with edits of its own registers their types with
    :func:`~haltrace.steering.interventions.register_state_type`, so its fits save and load whole).
    """

    name: str = ""
    summary: str = ""
    #: fit options that the paper sets per evaluation (``{"chair": {"task": "caption"}}``): the results table fits
    #: the method once more with them for that evaluation, unless the user set those options
    eval_fit_options: dict[str, dict[str, Any]] = {}

    def fit(self, model: Any, data: Any = None, **kwargs: Any) -> FittedIntervention:  # pragma: no cover
        raise NotImplementedError

    def check_options(self, model: Any, kwargs: dict[str, Any]) -> None:
        """Refuse fit options that cannot work before anything expensive runs: a name ``fit`` does not take, a
        non-finite number, a ``layer``/``layers`` outside the model. Raises :class:`haltrace.errors.InputError`
        naming the option (the methods' own checks stay; this only runs them earlier)."""
        check_fit_options(self, model, kwargs)


def _numbers(value: Any) -> list[Any]:
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for item in value for v in _numbers(item)]
    return []


def check_fit_options(method: Method, model: Any, kwargs: dict[str, Any]) -> None:
    """See :meth:`Method.check_options`."""
    import inspect
    import math

    from haltrace.errors import InputError

    params = inspect.signature(method.fit).parameters
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    named = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    for key, value in kwargs.items():
        option = f"--{key}" if key in ("alpha", "layer") else f"--opt {key}"
        if not open_ended and key not in params:
            raise InputError(f"{option}: {method.name} has no fit option {key!r}; its options: {', '.join(named)}")
        for number in _numbers(value):
            if isinstance(number, float) and not math.isfinite(number):
                raise InputError(f"{option}={value}: must be a finite number")
        n_layers = getattr(model, "n_layers", None)
        if key in ("layer", "layers") and n_layers:
            for layer in _numbers(value):
                if not isinstance(layer, int) or not -n_layers <= layer < n_layers:
                    raise InputError(f"{option}={value}: layer {layer} is out of range; {getattr(model, 'name_or_path', 'the model')} "
                                     f"has layers 0..{n_layers - 1}")


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: add a method to the registry under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty `name` to be registered")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} is already registered by {_REGISTRY[cls.name].__name__}")
    _REGISTRY[cls.name] = cls
    fit = cls.__dict__.get("fit")
    if fit is not None and not getattr(fit, "_refuses_remote", False):
        @functools.wraps(fit)
        def checked_fit(self: Method, model: Any, *args: Any, **kwargs: Any) -> FittedIntervention:
            from haltrace.models.base import require_local_weights

            require_local_weights(model, f"fitting {cls.name} (its fit runs forwards and hooks here)")
            return fit(self, model, *args, **kwargs)

        checked_fit._refuses_remote = True  # type: ignore[attr-defined]
        cls.fit = checked_fit  # type: ignore[method-assign]
    return cls


def _load_all() -> None:
    # every method file ships with the package: a failed import is a packaging bug and must surface
    for module in _METHOD_MODULES:
        importlib.import_module(module)


def list_methods() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get_method(name: str) -> Method:
    """An instance of the registered method ``name``; unknown names list the registry."""
    _load_all()
    if name not in _REGISTRY:
        raise ValueError(f"unknown steering method {name!r}; registered methods: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]()
