"""``--help`` of every command shows every word of its docstring and of every option's help text."""

from __future__ import annotations

import re

import typer
from typer.testing import CliRunner

from haltrace.cli import app

runner = CliRunner()


def _commands(command, path=()):
    yield path, command
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        yield from _commands(sub, (*path, name))


def test_help_shows_every_word_of_the_docstrings_and_option_texts():
    root = typer.main.get_command(app)
    checked = 0
    for path, command in _commands(root):
        res = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "100"}, terminal_width=100)
        assert res.exit_code == 0, res.output
        # click's wrapping may break a line after a hyphen ("prior-vs-" / "pixel."): rejoin those
        shown = set(re.sub(r"-\n\s*", "-", res.output).split())
        texts = [(command.help or "").split("\f")[0]]
        texts += [getattr(p, "help", None) or "" for p in command.params]
        for text in texts:
            missing = [w for w in text.split() if w not in shown]
            assert not missing, f"haltrace {' '.join(path)} --help drops {missing}"
        assert "<bool>" not in res.output, f"haltrace {' '.join(path)}: a flag shown as taking a value"
        checked += 1
    assert checked >= 12


def test_eval_help_keeps_brackets():
    out = runner.invoke(app, ["eval", "--help"], terminal_width=200).output
    assert "{image: [objects]}" in " ".join(out.split()) and "(split=path" in out
