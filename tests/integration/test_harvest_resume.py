"""Crash-safety of harvest: SIGKILL a harvest mid-run in a child process, resume it, and compare the result
with an uninterrupted run (tensors bit-for-bit, metadata, shard count)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from haltrace.trace.harvest import harvest
from haltrace.trace.store import ActivationStore, StoreError

REPO = Path(__file__).resolve().parents[2]
DATA = [{"prompt": f"example number {i} " + "ab" * (i % 5), "label": i % 3} for i in range(12)]
HOOKS = ["resid_pre.0", "resid_post.1"]
SETTINGS = {"positions": "all", "batch_size": 2, "shard_size": 2, "progress": False}


def make_model():
    """The tiny random GPT-2 both the child and this process use (same seed -> same weights)."""
    from haltrace.models import Model
    from haltrace.models.tiny import build_tiny

    hf_model, tokenizer = build_tiny("gpt2", seed=0)
    return Model.from_hf(hf_model, tokenizer)


CHILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    from tests.integration.test_harvest_resume import DATA, HOOKS, SETTINGS, make_model
    from haltrace.trace.harvest import harvest
    # slow each shard down so the parent can kill us between shards (or in the middle of one)
    harvest(make_model(), DATA, HOOKS, out=sys.argv[1], _after_shard=lambda i: time.sleep(0.4), **SETTINGS)
""")


def _finished_shards(out: Path) -> int:
    try:
        return len(json.loads((out / "manifest.json").read_text())["shards"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
    killed = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(repo=str(REPO)), str(killed)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    model = make_model()  # built while the child starts up (overlaps the two imports of transformers)
    deadline = time.monotonic() + 300  # a safety net only: a loaded CI machine can take a minute to import torch
    try:
        while _finished_shards(killed) < 1:
            if child.poll() is not None:
                pytest.fail(f"harvest child exited early ({child.returncode}): {child.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("harvest child finished no shard within 300 s")
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    manifest = json.loads((killed / "manifest.json").read_text())
    done_at_kill = {s["index"] for s in manifest["shards"]}
    assert not manifest["complete"] and 1 <= len(done_at_kill) < 6, "kill landed after the run finished"
    with pytest.raises(StoreError, match="unfinished"):
        ActivationStore.open(killed)

    redone: list[int] = []
    resumed = harvest(model, DATA, HOOKS, out=killed, _after_shard=redone.append, **SETTINGS)
    assert sorted(redone) == sorted(set(range(6)) - done_at_kill)  # finished shards kept, nothing duplicated
    reference = harvest(model, DATA, HOOKS, out=tmp_path / "reference", **SETTINGS)

    assert len(resumed.shard_paths) == len(reference.shard_paths) == 6
    assert resumed.metadata == reference.metadata == DATA
    assert torch.equal(resumed.lengths(), reference.lengths())
    for hook in HOOKS:
        assert torch.equal(resumed.load(hook), reference.load(hook))
    assert not list(killed.rglob(".tmp-*"))  # temp files of the killed write were cleaned up
    assert sorted(p.name for p in (killed / "shards").iterdir()) == sorted(p.name for p in reference.shard_paths)
