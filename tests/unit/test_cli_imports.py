"""The command line starts light: building the app and rendering ``--help`` of every command imports neither
torch nor transformers (nor any optional package), so ``haltrace --help`` answers at once.

A behavioural check, not a timing test: it runs in a fresh interpreter, where nothing was imported before.
``bench/bench_cli.py`` measures the time.
"""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "transformers", "safetensors", "sklearn", "plotly", "numpy", "PIL", "nltk", "tokenizers",
         "nnsight", "transformer_lens", "sae_lens", "gguf")

_SCRIPT = r"""
import json, sys

import typer
from typer.testing import CliRunner

from haltrace.cli import app

def commands(command, path=()):
    yield path, command
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        yield from commands(sub, (*path, name))

runner = CliRunner()
seen, failed = [], []
for path, _command in commands(typer.main.get_command(app)):
    res = runner.invoke(app, [*path, "--help"])
    seen.append(" ".join(path))
    if res.exit_code != 0:
        failed.append([" ".join(path), res.output])
loaded = sorted(name for name in json.loads(sys.argv[1]) if name in sys.modules)
print(json.dumps({"commands": seen, "failed": failed, "loaded": loaded}))
"""


def test_help_of_every_command_imports_no_heavy_module():
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(HEAVY)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not report["failed"], report["failed"]
    # the top level and every group and command: trace, probe, sae train, steer, eval, export, demo, explain ...
    assert len(report["commands"]) >= 12 and {"trace", "probe", "steer", "sae", "export"} <= set(report["commands"])
    assert report["loaded"] == [], f"--help imported {report['loaded']}: move those imports into the commands"


def test_optional_packages_load_only_through_the_helper():
    """Every import of nnsight, transformer_lens, sae_lens and gguf in haltrace goes through
    haltrace._optional.require, which names the extra to install (``pip install 'haltrace[sae]'``)."""
    import ast
    from pathlib import Path

    import haltrace

    optional = {"nnsight", "transformer_lens", "sae_lens", "gguf"}
    offenders = []
    for path in Path(haltrace.__file__).parent.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        type_only = set()
        for node in ast.walk(tree):  # `if TYPE_CHECKING:` imports never run
            if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING":
                type_only.update(id(n) for child in node.body for n in ast.walk(child))
        for node in ast.walk(tree):
            if id(node) in type_only:
                continue
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            offenders += [f"{path.name}:{node.lineno} {n}" for n in names if n.partition(".")[0] in optional]
    assert not offenders, offenders


def test_missing_extra_names_it(monkeypatch):
    import pytest

    from haltrace._optional import MissingExtraError, require
    from haltrace.errors import InputError, describe

    monkeypatch.setitem(sys.modules, "sae_lens", None)  # `import sae_lens` now fails as if not installed
    with pytest.raises(MissingExtraError, match=r"pip install 'haltrace\[sae\]'") as info:
        require("sae_lens", feature="training an SAE")
    assert isinstance(info.value, InputError) and isinstance(info.value, ImportError)
    assert describe(info.value) == (str(info.value), 2)  # the CLI prints it as one Error: line, exit code 2
    assert "training an SAE needs the sae-lens package" in str(info.value)
