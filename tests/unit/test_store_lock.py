"""Two harvests into one store folder, and the permissions of what haltrace writes."""

from __future__ import annotations

import stat
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from haltrace.trace.harvest import harvest
from haltrace.trace.store import LOCK_FILE, StoreError, store_lock

HOOKS = ["resid_post.0", "resid_post.1"]


def _data(n: int = 12) -> list[dict]:
    return [{"prompt": f"item number {i} is here", "i": i} for i in range(n)]


def _store_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != LOCK_FILE and "shards" not in p.parts}


def test_second_harvest_waits_for_the_first_and_the_store_equals_a_single_run(tiny_llama, tmp_path):
    folder, reference = tmp_path / "shared", tmp_path / "single"
    started, release, second_done = threading.Event(), threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def first_shard_pause(index: int) -> None:
        started.set()
        release.wait(60)  # hold the lock, mid-harvest, until the second harvest has had time to barge in

    def run(**kwargs) -> None:
        try:
            harvest(tiny_llama, _data(), HOOKS, out=folder, batch_size=4, shard_size=4, progress=False, **kwargs)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    first = threading.Thread(target=run, kwargs={"_after_shard": first_shard_pause})
    first.start()
    assert started.wait(60)
    second = threading.Thread(target=lambda: (run(), second_done.set()))
    second.start()
    time.sleep(1.0)
    assert not second_done.is_set()  # waiting on the lock, not writing into the half-built store
    release.set()
    first.join(60)
    second.join(60)
    assert not errors, errors
    harvest(tiny_llama, _data(), HOOKS, out=reference, batch_size=4, shard_size=4, progress=False)
    assert _store_files(folder) == _store_files(reference)
    shards = sorted(p.name for p in (folder / "shards").iterdir())
    assert shards == sorted(p.name for p in (reference / "shards").iterdir())
    for name in shards:
        a, b = load_file(str(folder / "shards" / name)), load_file(str(reference / "shards" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not [p for p in folder.rglob(".tmp-*")]


def test_lock_refuses_without_waiting(tmp_path):
    with store_lock(tmp_path):
        with pytest.raises(StoreError, match="another harvest"):
            with store_lock(tmp_path, wait=False):
                pass
    with store_lock(tmp_path, wait=False):  # released when the first block ended
        pass


def test_store_files_and_folders_are_readable_by_others(tiny_llama, tmp_path):
    from haltrace.errors import DIR_MODE, FILE_MODE

    root = tmp_path / "acts"
    harvest(tiny_llama, _data(4), HOOKS, out=root, progress=False)
    for p in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (DIR_MODE if p.is_dir() else FILE_MODE), (p, oct(mode))
