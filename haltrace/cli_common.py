"""What every ``haltrace`` command module shares: one way to fail, the consoles, JSON output and model loading.

Imports only typer and the standard library at module level (rich, haltrace's model code and torch load inside
the functions), so command modules can import it without slowing ``haltrace --help``.

>>> import typer
>>> try:
...     fail("no such file: x.jsonl")
... except typer.Exit as exit_:
...     exit_.exit_code
2
"""

from __future__ import annotations

import json
from typing import Any, NoReturn

import typer


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``Error: message`` on stderr and exit with ``code`` (2 = usage or input error, 1 = a bug)."""
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(code)


def console(quiet: bool = False) -> Any:
    """A rich console on stderr for progress, status lines and tables: with ``--json`` stdout stays exactly one
    JSON object (``quiet=True`` silences it altogether)."""
    from rich.console import Console

    return Console(stderr=True, quiet=quiet)


def stdout_console() -> Any:
    """A rich console on stdout, for a command's result table."""
    from rich.console import Console

    return Console()


def echo_json(value: Any, **kwargs: Any) -> None:
    """Print ``value`` as one JSON line on stdout (``json.dumps`` keyword arguments pass through).

    >>> echo_json({"ok": True, "n": 3})
    {"ok": true, "n": 3}
    """
    typer.echo(json.dumps(value, **kwargs))


def load_model(name: str, status: Any = None, *, eager: bool = False, remote: bool = False,
               param_hint: str = "--model") -> Any:
    """``haltrace.load(name)`` behind a status line on ``status`` (a console); a model that cannot be loaded
    (missing folder or organism, unknown architecture) is a ``--model`` usage error. ``eager`` loads eager
    attention (attention weights); ``remote`` builds the model on the meta device for NDIF."""
    import haltrace

    status = status if status is not None else console()
    with status.status(f"loading {name} ..."):
        try:
            return haltrace.load(name, attn_implementation="eager" if eager else None, remote=remote)
        except (OSError, ValueError) as exc:
            raise typer.BadParameter(f"cannot load {name!r}: {exc}", param_hint=param_hint) from None
