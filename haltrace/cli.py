"""The ``haltrace`` command line. Each command group lives next to the code it drives and is registered here.

Example::

    haltrace --version
    haltrace organism eval --json
    haltrace --debug trace --prompt "..."      # a failure prints the full traceback (or HALTRACE_DEBUG=1)

Every command runs inside one error boundary (:class:`HaltraceGroup`): haltrace's own errors
(:class:`haltrace.errors.HaltraceError`) and the library errors a user's input causes (corrupt safetensors,
invalid JSON, non-UTF-8 text, unreadable images, file-system errors, Hugging Face loading errors) print one
``Error:`` message and exit with code 2; anything else prints one line and how to get the traceback (exit 1).
"""

from __future__ import annotations

import importlib
import os
import warnings
from typing import Any

import typer
import typer.exceptions as _typer_exceptions
from typer.core import TyperGroup

from haltrace._version import __version__
from haltrace.cli_common import fail
from haltrace.errors import DEBUG_ENV, DEBUG_HINT, describe

# exits, aborts and click's usage errors already print their own short message
_PASS_THROUGH: tuple[type[BaseException], ...] = (typer.Exit, _typer_exceptions.Exit, _typer_exceptions.Abort,
                                                  _typer_exceptions.TyperException)


def _debug_requested(ctx: Any) -> bool:
    env = os.environ.get(DEBUG_ENV, "").strip().lower()
    return bool(ctx.meta.get("haltrace.debug")) or env not in ("", "0", "false", "no", "off")


def _short_warning(message: Any, category: type[Warning], filename: str, lineno: int, line: Any = None) -> str:
    return f"Warning: {message}\n"


class HaltraceGroup(TyperGroup):
    """The error boundary of every command: see the module docstring."""

    def invoke(self, ctx: Any) -> Any:
        previous = warnings.formatwarning
        warnings.formatwarning = _short_warning  # a warning is one line, not a source excerpt
        try:
            return super().invoke(ctx)
        except _PASS_THROUGH:
            raise
        except Exception as exc:  # noqa: BLE001 - this is the boundary
            if _debug_requested(ctx):
                raise
            known = describe(exc)
            if known is not None:
                fail(known[0], known[1])
            text = str(exc).strip().splitlines()
            fail(f"unexpected {type(exc).__name__}: {text[0] if text else ''} ({DEBUG_HINT}; please report "
                 "it if the input looks right)", 1)
        finally:
            warnings.formatwarning = previous

    def get_help_option(self, ctx: Any) -> Any:
        # The group's own --help flag defaults to None, which typer coerces through pydantic (imported for it:
        # about half the start-up time of `haltrace probe --help`); False is the same "not asked" without that.
        option = super().get_help_option(ctx)
        if option is not None and option.default is None:
            option.default = False
        return option


app = typer.Typer(
    name="haltrace",
    help="Find where and why LLMs and VLMs hallucinate, and steer them at inference time.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    cls=HaltraceGroup,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"haltrace {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                 help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help=f"Print the full traceback when a command fails "
                                                      f"(also {DEBUG_ENV}=1)."),
) -> None:
    """haltrace: trace, probe, steer and evaluate hallucinations in HF LLMs and VLMs."""
    ctx.meta["haltrace.debug"] = debug


# (module, attribute, group name or None to merge its commands at top level)
_COMMAND_MODULES: list[tuple[str, str, str | None]] = [
    ("haltrace.organism.cli", "app", "organism"),
    ("haltrace.trace.cli", "app", None),
    ("haltrace.probes.cli", "app", None),
    ("haltrace.probes.sae_cli", "app", "sae"),
    ("haltrace.steering.cli", "app", None),
    ("haltrace.evals.cli", "app", None),
    ("haltrace.export.cli", "app", None),
    ("haltrace.demo_cli", "app", None),
    ("haltrace.explain.cli", "app", None),
]

# Every command module imports only typer, rich, the standard library and light haltrace modules at module level
# (torch, transformers and the optional packages load inside the commands), so `haltrace --help` stays fast;
# tests/unit/test_cli_imports.py checks it. A module that fails to import is a bug and fails loudly.
for _module_name, _attr, _group in _COMMAND_MODULES:
    _module = importlib.import_module(_module_name)
    _sub = getattr(_module, _attr)
    _sub.rich_markup_mode = None  # rich markup would eat "[objects]" and "[split=]" in help texts
    if _group is None:
        for _command in _sub.registered_commands:
            app.registered_commands.append(_command)
    else:
        app.add_typer(_sub, name=_group)

