"""Bad inputs, tried as a user would: every one ends in a short message that names the file or option, exit
code 2, no traceback, and nothing changed in the working folder, the inputs or the repository.

Most cases run in-process through the ``haltrace`` app (the same error boundary as the console script); a few
run the installed ``haltrace`` script in a subprocess. Read-only and full file systems are simulated by making
``os.open`` / ``os.mkdir`` / ``open`` fail with EROFS / ENOSPC under one folder (root ignores permissions).
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from haltrace.cli import app
from haltrace.errors import HaltraceError
from haltrace.steering.engine import Add
from haltrace.steering.registry import _REGISTRY, FittedIntervention, Method, register_method

REPO = Path(__file__).resolve().parents[2]
ORGANISM = REPO / "artifacts" / "organisms" / "shapes-llava"
HALTRACE = Path(sys.executable).parent / "haltrace"
runner = CliRunner()


class _Tiny(Method):
    """Adds alpha * e_0 after block ``layer``: a fit that costs nothing, so steer cases stay fast."""

    name = "bad-inputs-tiny"
    summary = "test only"

    def fit(self, model, data=None, *, alpha: float = 1.0, layer: int = 0):
        vec = torch.zeros(model.hidden_size)
        vec[0] = 1.0
        return FittedIntervention(self.name, [Add(f"resid_post.{layer}", vec, alpha=alpha)], {"alpha": alpha})


@pytest.fixture(scope="module", autouse=True)
def tiny_method():
    register_method(_Tiny)
    yield
    _REGISTRY.pop(_Tiny.name, None)


# ------------------------------------------------------------------------------------------ the bad files
def _pickle_bytes() -> bytes:
    return pickle.dumps({"weight": [1.0, 2.0]}, protocol=4)


def _model_copy(root: Path, name: str, weights: bytes | None = None, config: str | None = None) -> None:
    folder = root / name
    shutil.copytree(ORGANISM, folder, ignore=shutil.ignore_patterns("model.safetensors"))
    (folder / "model.safetensors").write_bytes(weights if weights is not None else
                                               (ORGANISM / "model.safetensors").read_bytes())
    if config is not None:
        (folder / "config.json").write_text(config)


def _fit_dir(root: Path, name: str, tensors: bytes, manifest: str | None = None) -> None:
    folder = root / name
    folder.mkdir()
    (folder / "intervention.json").write_text(manifest or json.dumps(
        {"format": "haltrace.fitted_intervention", "format_version": 1, "method": "caa", "model": "shapes-llava",
         "interventions": [{"type": "Add", "hook": "resid_post.2", "positions": "all", "phase": "all",
                            "alpha": 1.0, "vector": "interventions.0.vector"}]}))
    (folder / "intervention.safetensors").write_bytes(tensors)


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bad")
    weights = (ORGANISM / "model.safetensors").read_bytes()
    _model_copy(d, "model-truncated", weights[: len(weights) // 3])
    _model_copy(d, "model-pickled", _pickle_bytes())
    _model_copy(d, "model-badconfig", config="{\"model_type\": ")
    _fit_dir(d, "fit-pickled", _pickle_bytes())
    from safetensors.torch import save

    good = save({"interventions.0.vector": torch.ones(128)})
    _fit_dir(d, "fit-truncated", good[: len(good) - 100])
    _fit_dir(d, "fit-badjson", good, manifest="{\"format\": ")
    for name, cfg, w in (("sae-pickled", json.dumps({"d_in": 128, "d_sae": 8, "architecture": "standard"}),
                          _pickle_bytes()), ("sae-badcfg", "{not json", good)):
        (d / name).mkdir()
        (d / name / "cfg.json").write_text(cfg)
        (d / name / "sae_weights.safetensors").write_bytes(w)
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    Image.new("RGB", (8, 8)).save(d / "ok.png")
    rows = [{"prompt": f"the shape is {c}", "label": i % 2} for i, c in enumerate("abcdef")]

    def jsonl(name: str, extra: list[dict]) -> None:
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in rows + extra))

    jsonl("img-corrupt.jsonl", [{"prompt": "<image> a", "label": 1, "image": "corrupt.png"}])
    jsonl("label-list.jsonl", [{"prompt": "x", "label": [1, 0]}])
    jsonl("label-dict.jsonl", [{"prompt": "x", "label": {"yes": 1}}])
    jsonl("prompt-empty.jsonl", [{"prompt": "", "label": 1}])
    (d / "latin1.jsonl").write_bytes(json.dumps({"prompt": "caf\u00e9", "label": 1}, ensure_ascii=False).encode("latin-1") + b"\n")
    (d / "questions.jsonl").write_text(json.dumps({"question_id": 1, "image": "ok.png", "text": "is there a cube ?",
                                                   "label": "yes"}) + "\n")
    (d / "answers-latin1.jsonl").write_bytes(json.dumps({"question_id": 1, "text": "s\u00ed"}, ensure_ascii=False)
                                             .encode("latin-1") + b"\n")
    (d / "captions.jsonl").write_text(json.dumps({"image_id": "ok.png", "caption": "a red cube"}) + "\n")
    (d / "objects-latin1.json").write_bytes(json.dumps({"ok.png": ["caf\u00e9"]}, ensure_ascii=False)
                                            .encode("latin-1"))
    (d / "objects-broken.json").write_text("{\"ok.png\": [")
    (d / "a-file").write_text("not a folder\n")
    (d / "probe-run" / "store").mkdir(parents=True)
    (d / "probe-run" / "store" / "notes.txt").write_text("mine, not a store\n")
    (d / "store-corrupt").mkdir()
    (d / "store-corrupt" / "manifest.json").write_text("{\"format\": ")
    (d / "vector.safetensors").write_bytes(_pickle_bytes())
    return d


@pytest.fixture(scope="module")
def good_store(tmp_path_factory) -> Path:
    """A small real activation store on the organism (for sae train cases that fail only when writing)."""
    import haltrace

    out = tmp_path_factory.mktemp("store") / "acts"
    model = haltrace.load(str(ORGANISM))
    data = [{"prompt": f"what colour is the {s} ? answer :"} for s in ("cube", "ball", "cone", "star") * 8]
    haltrace.harvest(model, data, ["resid_post.2"], out=out, progress=False)
    return out


# ------------------------------------------------------------------------------- simulated file systems
@contextmanager
def failing_fs(root: Path, code: int):
    """Every attempt to create or write a file or folder under ``root`` fails with ``code`` (EROFS, ENOSPC)."""
    prefix = str(root)
    real_open, real_mkdir, real_builtin_open = os.open, os.mkdir, builtins.open

    def under(path) -> bool:
        try:
            return os.path.abspath(os.fspath(path)).startswith(prefix)
        except TypeError:
            return False

    def fail(path):
        raise OSError(code, os.strerror(code), os.fspath(path))

    def fake_open(path, flags, *args, **kwargs):
        if under(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            fail(path)
        return real_open(path, flags, *args, **kwargs)

    def fake_mkdir(path, *args, **kwargs):
        if under(path):
            fail(path)
        return real_mkdir(path, *args, **kwargs)

    def fake_builtin_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and under(file) and any(c in mode for c in "wax+"):
            fail(file)
        return real_builtin_open(file, mode, *args, **kwargs)

    os.open, os.mkdir, builtins.open, io.open = fake_open, fake_mkdir, fake_builtin_open, fake_builtin_open
    try:
        yield
    finally:
        os.open, os.mkdir, builtins.open, io.open = real_open, real_mkdir, real_builtin_open, real_builtin_open


# ------------------------------------------------------------------------------------------- the table
@dataclass
class Case:
    id: str
    args: list[str]
    says: list[str]  # every one must appear in the output ({d} = the bad-files folder, {w} = working folder)
    code: int = 2
    fs: int | None = None  # errno simulated for everything under {w}/ro
    store: bool = False  # needs the good_store fixture ({s})
    env: dict = field(default_factory=dict)


ORG = str(ORGANISM)
T = _Tiny.name
CASES = [
    # corrupt model weights / config, missing model folder
    Case("trace-model-truncated", ["trace", "--model", "{d}/model-truncated", "--prompt", "a"],
         ["model-truncated", "model.safetensors", "truncated"]),
    Case("probe-model-pickled", ["probe", "--model", "{d}/model-pickled", "--task", "entity", "--out", "{w}/o"],
         ["model-pickled", "model.safetensors"]),
    Case("steer-model-truncated", ["steer", "--method", T, "--model", "{d}/model-truncated", "--eval", "refusal"],
         ["model-truncated", "model.safetensors"]),
    Case("lens-model-pickled", ["lens", "--model", "{d}/model-pickled", "--prompt", "a"],
         ["model-pickled", "model.safetensors"]),
    Case("eval-model-truncated", ["eval", "--model", "{d}/model-truncated", "--eval", "refusal"],
         ["model-truncated", "model.safetensors"]),
    Case("trace-model-bad-config", ["trace", "--model", "{d}/model-badconfig", "--prompt", "a"],
         ["model-badconfig", "JSON"]),
    Case("trace-model-missing-folder", ["trace", "--model", "./no/such/model", "--prompt", "a"],
         ["no such folder", "no/such/model"]),
    Case("probe-model-missing-folder", ["probe", "--model", "{w}/missing-model/", "--task", "entity",
                                        "--out", "{w}/o"], ["no such folder", "missing-model"]),
    # saved fits and vectors
    Case("steer-from-pickled", ["steer", "--from", "{d}/fit-pickled", "--eval", "refusal"],
         ["fit-pickled", "intervention.safetensors", "pickle"]),
    Case("steer-from-truncated", ["steer", "--from", "{d}/fit-truncated", "--eval", "refusal"],
         ["fit-truncated", "truncated"]),
    Case("steer-from-bad-json", ["steer", "--from", "{d}/fit-badjson"], ["fit-badjson", "intervention.json"]),
    Case("export-run-pickled", ["export", "{d}/fit-pickled", "--out", "{w}/x.gguf"],
         ["fit-pickled", "intervention.safetensors", "pickle"]),
    Case("export-run-truncated", ["export", "{d}/fit-truncated", "--format", "safetensors", "--out", "{w}/v"],
         ["fit-truncated", "truncated"]),
    Case("export-vector-pickled", ["export", "{d}/vector.safetensors", "--out", "{w}/x.gguf"],
         ["vector.safetensors", "pickle"]),
    Case("export-missing", ["export", "{d}/nothing-here", "--out", "{w}/x.gguf"], ["nothing-here"]),
    Case("export-bad-format", ["export", "{d}/fit-pickled", "--format", "onnx", "--out", "{w}/x"], ["onnx"]),
    # SAEs and stores
    Case("sae-latents-pickled", ["sae", "latents", "--sae", "{d}/sae-pickled", "--model", ORG],
         ["sae-pickled", "sae_weights.safetensors", "pickle"]),
    Case("sae-latents-bad-cfg", ["sae", "latents", "--sae", "{d}/sae-badcfg", "--model", ORG],
         ["sae-badcfg", "cfg.json"]),
    Case("sae-train-missing-store", ["sae", "train", "--store", "{w}/nope", "--hook", "resid_post.2",
                                     "--d-sae", "8", "--out", "{w}/sae"], ["nope"]),
    Case("sae-train-corrupt-store", ["sae", "train", "--store", "{d}/store-corrupt", "--hook", "resid_post.2",
                                     "--d-sae", "8", "--out", "{w}/sae"], ["store-corrupt", "manifest.json"]),
    Case("probe-out-not-a-store", ["probe", "--model", ORG, "--task", "entity", "--out", "{d}/probe-run"],
         ["probe-run/store", "not empty"]),
    # steer options: refused before the baseline evaluation
    Case("steer-layer-out-of-range", ["steer", "--method", "pvp", "--model", ORG, "--layer", "99",
                                      "--eval", "counterfactual"], ["--layer", "99", "out of range"]),
    Case("steer-alpha-nan", ["steer", "--method", "pvp", "--model", ORG, "--alpha", "nan"], ["--alpha", "nan"]),
    Case("steer-unknown-opt", ["steer", "--method", "pvp", "--model", ORG, "--opt", "colour=red",
                               "--eval", "refusal"], ["colour", "pvp"]),
    Case("steer-all-scoped-layer", ["steer", "--method", "all", "--model", ORG, "--opt", "caa.layer=99",
                                    "--eval", "refusal"], ["layer", "99", "out of range"]),
    Case("steer-unknown-method", ["steer", "--method", "nosuch", "--model", ORG], ["nosuch", "pvp"]),
    Case("steer-pope-file-missing", ["steer", "--method", "pvp", "--eval", "pope={w}/q.jsonl"], ["q.jsonl"]),
    # prompts and images
    Case("trace-empty-prompt", ["trace", "--model", ORG, "--prompt", ""], ["--prompt", "empty"]),
    Case("trace-image-token-no-image", ["trace", "--model", ORG, "--prompt", "<image> what colour ?"],
         ["<image>", "--image"]),
    Case("trace-corrupt-image", ["trace", "--model", ORG, "--prompt", "<image> a", "--image", "{d}/corrupt.png"],
         ["corrupt.png"]),
    Case("lens-unknown-task", ["lens", "--task", "bogus"], ["bogus", "counterfactual-color"]),
    Case("lens-no-prompt-no-task", ["lens", "--model", ORG], ["--prompt", "--task"]),
    # probe JSONL files
    Case("probe-jsonl-corrupt-image", ["probe", "--model", ORG, "--data", "{d}/img-corrupt.jsonl", "--out", "{w}/o"],
         ["img-corrupt.jsonl:7", "corrupt.png"]),
    Case("probe-jsonl-label-list", ["probe", "--model", ORG, "--data", "{d}/label-list.jsonl", "--out", "{w}/o"],
         ["label-list.jsonl:7", "label"]),
    Case("probe-jsonl-label-dict", ["probe", "--model", ORG, "--data", "{d}/label-dict.jsonl", "--out", "{w}/o"],
         ["label-dict.jsonl:7", "label"]),
    Case("probe-jsonl-empty-prompt", ["probe", "--model", ORG, "--data", "{d}/prompt-empty.jsonl",
                                      "--out", "{w}/o"], ["prompt-empty.jsonl:7", "prompt"]),
    Case("probe-jsonl-not-utf8", ["probe", "--model", ORG, "--data", "{d}/latin1.jsonl", "--out", "{w}/o"],
         ["latin1.jsonl", "UTF-8"]),
    # eval files
    Case("eval-pope-answers-not-utf8", ["eval", "--pope-questions", "adv={d}/questions.jsonl", "--pope-answers",
                                        "adv={d}/answers-latin1.jsonl"], ["answers-latin1.jsonl", "UTF-8"]),
    Case("eval-objects-not-utf8", ["eval", "--captions", "{d}/captions.jsonl", "--objects",
                                   "{d}/objects-latin1.json"], ["objects-latin1.json", "UTF-8"]),
    Case("eval-objects-broken-json", ["eval", "--captions", "{d}/captions.jsonl", "--objects",
                                      "{d}/objects-broken.json"], ["objects-broken.json", "JSON"]),
    Case("eval-json-true", ["eval", "--json", "true"], ["true"]),
    Case("eval-pope-file-missing", ["eval", "--model", ORG, "--pope", "{w}/none.jsonl"], ["none.jsonl"]),
    # organism
    Case("organism-eval-unknown", ["organism", "eval", "{w}/no-organism"], ["no-organism"]),
    Case("organism-write-sets-under-file", ["organism", "eval", "--write-sets", "{d}/a-file/sets"],
         ["a-file", "--write-sets"]),
    # outputs on a read-only or full file system
    Case("trace-out-read-only", ["trace", "--model", ORG, "--prompt", "a", "--out", "{w}/ro/acts"],
         ["ro", "read-only"], fs=errno.EROFS),
    Case("trace-out-disk-full", ["trace", "--model", ORG, "--prompt", "a", "--out", "{w}/ro/acts"],
         ["ro", "disk is full"], fs=errno.ENOSPC),
    Case("probe-out-read-only", ["probe", "--model", ORG, "--task", "entity", "--out", "{w}/ro/p"],
         ["ro", "read-only"], fs=errno.EROFS),
    Case("steer-out-read-only", ["steer", "--method", T, "--model", ORG, "--eval", "refusal", "--out", "{w}/ro/s"],
         ["ro", "read-only"], fs=errno.EROFS),
    Case("lens-html-disk-full", ["lens", "--model", ORG, "--prompt", "a", "--html", "{w}/ro/lens.html"],
         ["ro", "disk is full"], fs=errno.ENOSPC),
    Case("organism-write-sets-read-only", ["organism", "eval", "--write-sets", "{w}/ro/sets"],
         ["ro", "read-only"], fs=errno.EROFS),
    Case("sae-train-out-read-only", ["sae", "train", "--store", "{s}", "--hook", "resid_post.2", "--d-sae", "32",
                                     "--steps", "3", "--batch-size", "8", "--out", "{w}/ro/sae"],
         ["ro", "read-only"], fs=errno.EROFS, store=True),
    Case("trace-out-under-a-file", ["trace", "--model", ORG, "--prompt", "a", "--out", "{d}/a-file/acts"],
         ["a-file", "--out"]),
]


def _snapshot(*roots: Path) -> dict[str, tuple]:
    out = {}
    for root in roots:
        for dirpath, _dirs, files in os.walk(root):
            for name in [*files, "."]:
                p = Path(dirpath) / name
                st = p.stat()
                out[str(p)] = (st.st_size, st.st_mtime_ns, st.st_mode)
    return out


@pytest.fixture(scope="module")
def repo_unchanged():
    before = _snapshot(REPO / "artifacts")
    had_out = (REPO / "out").exists()
    yield
    assert _snapshot(REPO / "artifacts") == before
    assert (REPO / "out").exists() == had_out


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, bad, tmp_path, monkeypatch, request, repo_unchanged):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # a user's project folder: defaults such as out/ would land here
    store = request.getfixturevalue("good_store") if case.store else None
    args = [a.format(d=bad, w=work, s=store) for a in case.args]
    watched = [work, bad] + ([store] if store else [])
    before = _snapshot(*watched)
    if case.fs is not None:
        with failing_fs(work / "ro", case.fs):
            result = runner.invoke(app, args, env=case.env)
    else:
        result = runner.invoke(app, args, env=case.env)
    output = result.output
    flat = " ".join(output.split())
    assert result.exit_code == case.code, f"exit {result.exit_code}: {output[-3000:]}"
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # nothing escaped the boundary
    assert "Traceback" not in output, output[-3000:]
    for word in case.says:
        word = word.format(d=bad, w=work)
        assert word in flat, f"{word!r} not in: {flat[-2000:]}"
    assert _snapshot(*watched) == before, "the failed command changed files"


def test_the_table_covers_every_command_and_40_cases():
    assert len(CASES) >= 40
    assert {c.args[0] for c in CASES} >= {"trace", "lens", "probe", "sae", "steer", "eval", "export", "organism"}


# ----------------------------------------------------------------------------- the Python loaders
def test_python_loaders_raise_haltrace_errors_naming_the_file(bad):
    import haltrace
    from haltrace.probes.datasets import load_jsonl
    from haltrace.probes.sae import load_sae
    from haltrace.steering.results import load_fitted
    from haltrace.steering.vector import SteeringVector

    for call, word in ((lambda: load_fitted(bad / "fit-pickled"), "pickle"),
                       (lambda: load_fitted(bad / "fit-truncated"), "truncated"),
                       (lambda: load_fitted(bad / "fit-badjson"), "intervention.json"),
                       (lambda: load_sae(bad / "sae-pickled"), "sae_weights.safetensors"),
                       (lambda: load_sae(bad / "sae-badcfg"), "cfg.json"),
                       (lambda: SteeringVector.load(bad / "vector"), "pickle"),
                       (lambda: load_jsonl(bad / "label-list.jsonl"), "label-list.jsonl:7"),
                       (lambda: load_jsonl(bad / "latin1.jsonl"), "latin1.jsonl"),
                       (lambda: haltrace.load(str(bad / "model-truncated")), "model.safetensors"),
                       (lambda: haltrace.load(str(bad / "nope") + "/"), "no such folder")):
        with pytest.raises(HaltraceError) as info:
            call()
        assert word in str(info.value), str(info.value)


def test_unexpected_error_is_one_line_and_debug_shows_the_traceback(monkeypatch):
    import haltrace.organism.cli as organism_cli

    def boom(model):
        raise ZeroDivisionError("a bug, not your input")

    monkeypatch.setattr(organism_cli, "_resolve", boom)
    res = runner.invoke(app, ["organism", "eval"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "ZeroDivisionError: a bug" in res.output and "--debug" in res.output and "HALTRACE_DEBUG=1" in res.output
    assert len(res.output.strip().splitlines()) == 1
    res = runner.invoke(app, ["--debug", "organism", "eval"])
    assert isinstance(res.exception, ZeroDivisionError)
    res = runner.invoke(app, ["organism", "eval"], env={"HALTRACE_DEBUG": "1"})
    assert isinstance(res.exception, ZeroDivisionError)


# ------------------------------------------------------------------------------------ strength warnings
def test_destructive_strengths_warn_but_run(tiny_llama, tmp_path):
    from haltrace.deploy import steered
    from haltrace.steering.cli import warn_strength
    from haltrace.steering.vector import SteeringVector

    vec = SteeringVector(direction=torch.ones(tiny_llama.hidden_size) / tiny_llama.hidden_size ** 0.5,
                         hidden_size=tiny_llama.hidden_size, hook="resid_post", layers=[1], alpha=1e38,
                         model=tiny_llama.name_or_path)
    path = vec.save(tmp_path / "huge")
    inputs = tiny_llama.prepare(["hello there"])
    with pytest.warns(UserWarning, match="NaN"):
        with steered(tiny_llama.hf, path):
            tiny_llama.hf(**inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an ordinary alpha gives no warning
        with steered(tiny_llama.hf, path, alpha=2.0):
            pass
    fitted = FittedIntervention("x", [Add("resid_post.1", torch.ones(tiny_llama.hidden_size), alpha=1e30)])
    with pytest.warns(UserWarning, match="residual norm"):
        warn_strength(fitted, tiny_llama)


# ---------------------------------------------------------------------------------- as a real user
def test_console_script_prints_no_traceback(bad, tmp_path):
    done = subprocess.run([str(HALTRACE), "trace", "--model", str(bad / "model-pickled"), "--prompt", "a"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr + done.stdout
    assert "model-pickled" in done.stderr and "model.safetensors" in done.stderr
    assert list(tmp_path.iterdir()) == []
