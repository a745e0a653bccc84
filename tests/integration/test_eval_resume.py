"""Acceptance: ``kill -9`` of ``haltrace eval`` half-way, then the same command again: the answers file is identical
to an uninterrupted run's (and so are the metrics it prints)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

N_QUESTIONS = 600  # the organism's POPE adversarial split
BATCH_SIZE = 4


def _haltrace() -> list[str]:
    """The venv's ``haltrace`` console script (next to this interpreter), else the same app through ``-c``."""
    exe = Path(sys.executable).with_name("haltrace")
    if exe.is_file():
        return [str(exe)]
    return [sys.executable, "-c", "import sys; from haltrace.cli import app; sys.argv[0] = 'haltrace'; app()"]


@pytest.fixture(scope="module")
def sets(organism_folder, tmp_path_factory) -> Path:
    from haltrace.organism.export_sets import write_eval_sets
    from haltrace.organism.train import load_world

    return write_eval_sets(load_world(organism_folder), tmp_path_factory.mktemp("sets"))


def _command(organism: str, sets: Path, out: Path) -> list[str]:
    return [*_haltrace(), "eval", "--model", organism, "--pope", str(sets / "pope" / "pope_adversarial.jsonl"),
            "--images", str(sets / "images"), "--out", str(out), "--batch-size", str(BATCH_SIZE), "--json"]


def _answers(out: Path) -> Path:
    return out / "pope" / "pope_adversarial.answers.jsonl"


def _complete_rows(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _finish(cmd: list[str], env: dict, log: Path) -> dict:
    with open(log, "wb") as err:
        done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=err, timeout=300)
    assert done.returncode == 0, log.read_text()[-3000:]
    return json.loads(done.stdout)


def _kill_then_resume(cmd: list[str], env: dict, answers: Path, tmp_path: Path) -> tuple[int, bytes, dict]:
    """Start ``cmd``, SIGKILL it once a third of the answers are written, check the file is partial, run ``cmd``
    again to the end; returns the rows at the kill, the partial file and the second run's JSON output."""
    with open(tmp_path / "killed.err", "wb") as err:
        child = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 240  # a safety net only: a loaded CI machine can take a minute to import torch
    try:
        # kill in the first half of the run (a third of the rows written), wherever in a batch that lands
        while _complete_rows(answers) < N_QUESTIONS // 3:
            if child.poll() is not None:
                pytest.fail(f"haltrace eval exited ({child.returncode}) before the kill: "
                            f"{(tmp_path / 'killed.err').read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail("haltrace eval wrote no third of its answers within 240 s")
            time.sleep(0.005)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    at_kill = _complete_rows(answers)
    assert 0 < at_kill < N_QUESTIONS, "the kill landed after the run finished: use a smaller --batch-size"
    assert not (answers.parents[1] / "report.json").exists()  # the killed run never got to its report
    partial = answers.read_bytes()
    return at_kill, partial, _finish(cmd, env, tmp_path / "resumed.err")  # the same command again


@pytest.mark.slow
def test_kill_9_then_same_command_equals_uninterrupted_run(organism_folder, sets, tmp_path):
    assert sum(1 for _ in open(sets / "pope" / "pope_adversarial.jsonl")) == N_QUESTIONS
    # one torch thread per process: the organism is tiny, and two runs go at once (on 2 shared cores a second
    # thread per run made it 3x slower)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    killed_out, reference_out = tmp_path / "killed", tmp_path / "reference"
    killed_cmd = _command(organism_folder, sets, killed_out)

    # the uninterrupted run goes alongside the one to kill (it only slows that one down: easier to catch)
    with open(tmp_path / "reference.err", "wb") as reference_err:
        reference = subprocess.Popen(_command(organism_folder, sets, reference_out), env=env,
                                     stdout=subprocess.PIPE, stderr=reference_err)
    try:
        at_kill, partial, resumed = _kill_then_resume(killed_cmd, env, _answers(killed_out), tmp_path)
        stdout, _ = reference.communicate(timeout=300)
    finally:
        reference.kill()  # only does something when the test failed before the reference run finished
        reference.wait()
    assert reference.returncode == 0, (tmp_path / "reference.err").read_text()[-3000:]
    uninterrupted = json.loads(stdout)
    answers = _answers(killed_out)
    assert (killed_out / "report.json").is_file() and (reference_out / "report.json").is_file()

    final = answers.read_bytes()
    assert final == _answers(reference_out).read_bytes()
    assert final.count(b"\n") == N_QUESTIONS
    kept = at_kill // BATCH_SIZE * BATCH_SIZE  # whole batches written before the kill are kept as they were
    assert final.splitlines()[:kept] == partial.splitlines()[:kept]
    rows = [json.loads(line) for line in final.splitlines()]
    assert [r["question_id"] for r in rows] == list(range(1, N_QUESTIONS + 1))
    assert set(rows[0]) == {"question_id", "prompt", "text", "answer", "model_id"}
    assert (answers.with_name(answers.name + ".run.json").read_bytes()
            == _answers(reference_out).with_name(answers.name + ".run.json").read_bytes())

    assert resumed["metrics"] == uninterrupted["metrics"]
    assert set(resumed["metrics"]) >= {f"pope.pope_adversarial.{k}" for k in ("accuracy", "precision", "recall",
                                                                              "f1", "yes_ratio")}
    report, reference_report = resumed["report"]["pope"]["pope_adversarial"], \
        uninterrupted["report"]["pope"]["pope_adversarial"]
    assert report.pop("answers_file") == str(answers)
    reference_report.pop("answers_file")
    assert report == reference_report and report["n"] == N_QUESTIONS
