"""Data-parallel runs: 2 CPU processes (RANK / WORLD_SIZE / MASTER_ADDR=127.0.0.1, gloo) give the answers
file and the activation store of a single-process run; killing one rank and relaunching loses and
duplicates nothing (the parts are reused, one merge at the end).

Launch 1: rank 1 dies after writing its first answer batch; rank 0 is then stopped too (as torchrun tears the
job down). Launch 2: the runner resumes and merges; the harvest runs and rank 1 dies after its first shard.
Launch 3: the answers are already merged (nothing generated); the harvest resumes and merges.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
N_JOBS, BATCH, SHARD = 10, 2, 2  # 5 answer batches (rank 0: 3, rank 1: 2); 5 shards

WORKER = textwrap.dedent('''
    import json, os, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from haltrace.evals import runner
    from haltrace.evals.runner import GenerationSettings, Job, run_jobs
    from haltrace.models import Model
    from haltrace.models.tiny import build_tiny
    from haltrace.trace.harvest import harvest

    out, die, stage = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    rank = int(os.environ.get("RANK", "0"))
    hf, tok = build_tiny("llama")
    model = Model.from_hf(hf, tok, name="tiny-llama")
    jobs = [Job(100 + i, f"is there a thing number {{i}} ?" + " really" * (i % 3)) for i in range({n})]
    inner = runner.generate_texts
    log = out / f"generated-rank{{rank}}.log"

    def logged(model, chunk, *a, **k):
        with open(log, "a") as fh:
            fh.write(" ".join(str(j.key) for j in chunk) + "\\n")
        return inner(model, chunk, *a, **k)

    runner.generate_texts = logged
    written = []

    def row(job, text):
        if die == f"answers{{rank}}" and len(written) == {b}:  # 2nd batch generated, not yet written
            os._exit(3)
        written.append(job.key)
        return {{"question_id": job.key, "text": text}}

    run_jobs(model, jobs, out / "answers.jsonl", row=row, key_field="question_id",
             settings=GenerationSettings(max_new_tokens=3, batch_size={b}), task="dp")
    if stage == "answers":
        sys.exit(0)
    data = [{{"prompt": j.question, "k": j.key}} for j in jobs]
    after = (lambda i: os._exit(4)) if die == f"harvest{{rank}}" else None
    harvest(model, data, ["resid_post.0", "resid_post.1"], positions="last", out=out / "store", batch_size={b},
            shard_size={s}, progress=False, _after_shard=after)
''').format(n=N_JOBS, b=BATCH, s=SHARD)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(script: Path, out: Path, die: str, stage: str, world: int = 2) -> list[int]:
    """Start ``world`` ranks; once one exits non-zero, stop the others (as torchrun would); exit codes."""
    port = _free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONPATH": str(REPO),
               "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(script), str(out), die, stage], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        if any(p.poll() not in (None, 0) for p in procs):
            time.sleep(0.5)
            for p in procs:
                if p.poll() is None:
                    p.kill()
            break
        time.sleep(0.1)
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    codes = [p.returncode for p in procs]
    return codes


def _generated(out: Path) -> list[int]:
    keys = []
    for log in out.glob("generated-rank*.log"):
        keys += [int(k) for line in log.read_text().split("\n") if line for k in line.split()]
        log.unlink()
    return sorted(keys)


def test_two_ranks_match_single_process_and_survive_a_killed_rank(tmp_path, monkeypatch) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    single, dp = tmp_path / "single", tmp_path / "dp"
    single.mkdir()
    dp.mkdir()
    # the single-process reference, in a subprocess too (same code path, no RANK set)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    ref = subprocess.run([sys.executable, str(script), str(single), "-", "all"], capture_output=True, text=True,
                         env={**env, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
                         check=False)
    assert ref.returncode == 0, ref.stdout + ref.stderr

    # launch 1: rank 1 dies in the runner after its first batch
    codes = _launch(script, dp, "answers1", "answers")
    assert codes[1] == 3, codes
    first = _generated(dp)
    part1 = [json.loads(x) for x in (dp / "answers.jsonl.rank1-of-2.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in part1] == [106, 107]  # rank 1's first batch survived
    assert not (dp / "answers.jsonl").exists()

    # launch 2: resume + merge the answers; rank 1 dies in the harvest after its first shard
    codes = _launch(script, dp, "harvest1", "all")
    assert codes[1] == 4, codes
    second = _generated(dp)
    assert (dp / "answers.jsonl").read_bytes() == (single / "answers.jsonl").read_bytes()
    assert not list(dp.glob("answers.jsonl.rank*"))  # merged: the parts are gone
    # nothing answered twice except the batch rank 1 generated but never wrote when it was killed
    assert sorted(first + second) == sorted(list(range(100, 100 + N_JOBS)) + [108, 109]), (first, second)
    kept = dp / "store" / "shards"
    before = {p.name: p.stat().st_mtime_ns for p in kept.iterdir()}
    assert len(before) == 4, sorted(before)  # rank 0: shards 0-2; rank 1: shard 3, then killed

    # launch 3: answers already merged (nothing generated); the harvest resumes from its shards and merges
    codes = _launch(script, dp, "-", "all")
    assert codes == [0, 0], codes
    assert _generated(dp) == []
    from haltrace.trace.store import ActivationStore

    a, b = ActivationStore.open(dp / "store"), ActivationStore.open(single / "store")
    assert len(a) == len(b) == N_JOBS
    for hook in ("resid_post.0", "resid_post.1"):
        assert torch.equal(a.load(hook), b.load(hook)), hook
    assert a.metadata == b.metadata
    # the merged manifest is the single-process one (same shards, rows, sizes; complete)
    assert json.loads((dp / "store" / "manifest.json").read_text()) == \
        json.loads((single / "store" / "manifest.json").read_text())
    after = {p.name: p.stat().st_mtime_ns for p in kept.iterdir()}
    assert len(after) == 5 and all(after[k] == v for k, v in before.items())  # resumed: no shard redone
    assert not (dp / "store" / "parts").exists()
