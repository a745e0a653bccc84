"""The ``haltrace`` command line. Each command group lives next to the code it drives and is registered here.

Example::

    haltrace --version
    haltrace organism eval --json
"""

from __future__ import annotations

import importlib

import typer

from haltrace._version import __version__

app = typer.Typer(
    name="haltrace",
    help="Find where and why LLMs and VLMs hallucinate, and steer them at inference time.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"haltrace {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """haltrace: trace, probe, steer and evaluate hallucinations in HF LLMs and VLMs."""


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
]

for _module_name, _attr, _group in _COMMAND_MODULES:
    try:
        _module = importlib.import_module(_module_name)
    except ModuleNotFoundError as exc:  # a command group not written yet must not break the others
        if exc.name != _module_name:
            raise
        continue
    _sub = getattr(_module, _attr)
    if _group is None:
        for _command in _sub.registered_commands:
            app.registered_commands.append(_command)
    else:
        app.add_typer(_sub, name=_group)
