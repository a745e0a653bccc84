"""``harvest``: run a model over a data set and stream the chosen activations to an on-disk store.

Memory stays flat in the data set size: the data set is read lazily, one shard of activations is held at a
time, and each shard is written (atomically) before the next starts. A killed run resumes where it stopped.
See :mod:`haltrace.trace.store` for the store layout and the reader.

Example
-------
>>> import haltrace
>>> store = haltrace.harvest(model, [{"prompt": "the capital of france is", "label": 1}],
...                          hooks=["resid_post.1"], positions="last", out="acts/", progress=False)
>>> store.load("resid_post.1").shape
torch.Size([1, 1, 32])
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from haltrace import conventions
from haltrace._version import __version__
from haltrace.trace.store import (
    FORMAT_NAME,
    FORMAT_VERSION,
    LOCK_FILE,
    MANIFEST,
    METADATA,
    OFFSETS_KEY,
    SHARD_DIR,
    TMP_PREFIX,
    ActivationStore,
    StoreError,
    atomic_write,
    atomic_write_text,
    check_shard_file,
    dtype_name,
    hook_layouts,
    read_manifest,
    shard_name,
    store_lock,
    write_manifest,
)

#: Target bytes of activations per shard when ``shard_size`` is not given (bounds peak memory).
DEFAULT_SHARD_BYTES = 256 * 2**20


# ------------------------------------------------------------------------------------------- data set helpers
def _check_reiterable(dataset: Any) -> None:
    if isinstance(dataset, Mapping) or isinstance(dataset, str | bytes):
        raise TypeError("dataset must be a sequence of examples like [{'prompt': ..., 'label': ...}, ...], "
                        f"got {type(dataset).__name__}")
    if not isinstance(dataset, Iterable):
        raise TypeError(f"dataset must be a sequence of example dicts, got {type(dataset).__name__}")
    if iter(dataset) is dataset:
        # harvest reads the data set twice (fingerprint, then activations); a one-shot iterator can't do that
        raise TypeError("dataset is a one-shot iterator; harvest reads it twice (fingerprint, then model). "
                        "Pass a list, a HF datasets.Dataset, or any re-iterable sequence.")


def _random_access(dataset: Any) -> bool:
    return hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")


def _split_example(example: Any, row: int, dropped: set[str]) -> tuple[dict[str, Any], Any]:
    """-> (JSON metadata row with prompt + serialisable extras, image or None). Unserialisable keys go to ``dropped``."""
    if not isinstance(example, Mapping) or not isinstance(example.get("prompt"), str):
        raise ValueError(f"dataset row {row} must be a dict with a 'prompt' string (and optional 'image' and "
                         f"extra keys), got {type(example).__name__}"
                         + (f" with keys {sorted(example)}" if isinstance(example, Mapping) else ""))
    meta: dict[str, Any] = {}
    for key, value in example.items():
        if key == "image":
            continue
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            dropped.add(str(key))
            continue
        meta[str(key)] = value
    return meta, example.get("image")


def _hash_image(hasher: Any, image: Any) -> None:
    # mode + size + raw pixels: identical pixels -> identical fingerprint, whatever file format they came from
    if hasattr(image, "tobytes") and hasattr(image, "mode"):
        hasher.update(f"image:{image.mode}:{image.size}:".encode())
        hasher.update(image.tobytes())
    elif isinstance(image, torch.Tensor):
        hasher.update(f"image:tensor:{tuple(image.shape)}:{image.dtype}:".encode())
        hasher.update(image.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    else:
        raise TypeError(f"example 'image' must be a PIL image, got {type(image).__name__}")


def _scan(dataset: Iterable[Any], metadata_path: str | None) -> tuple[str, int]:
    """One streaming pass: sha256 fingerprint and row count; writes metadata JSONL lines if a path is given."""
    hasher = hashlib.sha256(b"haltrace-dataset-v1\n")
    dropped: set[str] = set()
    n = 0
    with open(metadata_path or os.devnull, "w", encoding="utf-8") as fh:
        for n, example in enumerate(dataset, start=1):
            meta, image = _split_example(example, n - 1, dropped)
            line = json.dumps(meta, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
            hasher.update(line.encode() + b"\n")
            fh.write(line + "\n")
            if image is not None:
                _hash_image(hasher, image)
    if dropped:
        warnings.warn(f"harvest: extra keys {sorted(dropped)} are not JSON-serialisable; they are left out of "
                      f"metadata.jsonl and the data set fingerprint", stacklevel=3)
    return "sha256:" + hasher.hexdigest(), n


def dataset_fingerprint(dataset: Iterable[Any]) -> str:
    """sha256 over the canonical JSON of each example's prompt + extras, and its image pixels.

    >>> dataset_fingerprint([{"prompt": "hi", "label": 0}])[:7]
    'sha256:'
    """
    _check_reiterable(dataset)
    return _scan(dataset, None)[0]


class _Rows:
    """Serve dataset rows ``[start, stop)`` in increasing order, by index if possible, else by one iterator."""

    def __init__(self, dataset: Any):
        self.dataset = dataset
        self.indexed = _random_access(dataset)
        self._it: Iterator[Any] | None = None if self.indexed else iter(dataset)
        self._pos = 0

    def take(self, start: int, stop: int) -> list[Any]:
        if self.indexed:
            return [self.dataset[i] for i in range(start, stop)]
        assert self._it is not None and start >= self._pos, "rows must be requested in increasing order"
        rows = list(islice(self._it, start - self._pos, stop - self._pos))  # skips rows of finished shards
        self._pos = stop
        return rows


# ---------------------------------------------------------------------------------------------- capture side
def _normalise_positions(positions: Any) -> tuple[Any, bool]:
    """-> (JSON-able positions rule, ragged?)."""
    if positions is None or positions == "all":
        return "all", True
    if positions in ("last", "image"):
        return positions, False
    if isinstance(positions, int) and not isinstance(positions, bool):
        return positions, False
    if isinstance(positions, Sequence) and not isinstance(positions, str) and positions and all(
            isinstance(p, int) and not isinstance(p, bool) for p in positions):
        return [int(p) for p in positions], False
    raise ValueError(f"positions must be 'last', 'all'/None, 'image', an int or a non-empty list of ints; "
                     f"got {positions!r}")


def _run_batch(model: Any, examples: list[Any], layouts: dict[str, str], positions: Any, ragged: bool,
               dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], int, torch.Tensor | None]:
    """Capture one batch -> ({hook: cpu tensor}, rows, per-row token counts if ``ragged`` else None)."""
    prompts = [ex["prompt"] for ex in examples]
    images = [ex.get("image") for ex in examples]
    if all(im is None for im in images):
        images = None
    elif any(im is None for im in images):
        raise ValueError("some examples in a batch have an 'image' and others don't; split the data set into "
                         "text-only and image examples and harvest them into separate stores")
    inputs = model.prepare(prompts, images=images) if images is not None else model.prepare(prompts)
    from haltrace.models.base import has_meta_weights

    # load(..., remote=True): the forward runs on NDIF; ship back the selected rows only, not the logits
    remote = {"backend": "nnsight", "output": False} if has_meta_weights(model) else {}
    with torch.no_grad():
        captured = model.capture(inputs, hooks=list(layouts), positions=None if ragged else positions, **remote)
    out: dict[str, torch.Tensor] = {}
    lengths = None
    if ragged:
        mask = inputs["attention_mask"].to("cpu").bool()
        lengths = mask.sum(dim=1)
    for hook, layout in layouts.items():
        t = captured[hook].detach()
        if layout == "fixed" and t.shape[0] != len(examples):
            raise ValueError(f"hook {hook!r} returned shape {tuple(t.shape)} for a batch of {len(examples)} "
                             f"examples; a store needs one leading row per example")
        if layout == "ragged":
            if t.shape[:2] != mask.shape:
                raise ValueError(f"hook {hook!r} returned shape {tuple(t.shape)}, which does not line up with the "
                                 f"attention mask {tuple(mask.shape)}; positions='all' needs [B, T, ...] outputs")
            t = t.to("cpu")[mask]  # drop left padding: rows concatenated in order -> [sum of lengths, ...]
        out[hook] = t.to("cpu", dtype).contiguous()
    del captured  # the Capture may hold logits; free them before the next batch
    return out, len(examples), lengths


class _ShardBuffer:
    """Collects one shard's batches. Fixed layout: a preallocated [rows, P, ...] buffer (no concat copy)."""

    def __init__(self, rows: int, layouts: dict[str, str], shapes: dict[str, list[int]]):
        self.rows, self.layouts, self.shapes = rows, layouts, shapes
        self.ragged = "ragged" in layouts.values()
        self.filled = 0
        self.fixed: dict[str, torch.Tensor] = {}
        self.parts: dict[str, list[torch.Tensor]] = {}
        self.lengths: list[torch.Tensor] = []

    def add(self, batch: dict[str, torch.Tensor], n: int, lengths: torch.Tensor | None) -> None:
        for hook, t in batch.items():
            shape = list(t.shape[1:])
            known = self.shapes.setdefault(hook, shape)
            if known != shape:
                raise ValueError(f"hook {hook!r} gave per-row shape {shape} here but {known} earlier; a store "
                                 f"needs one shape per hook (hooks whose size depends on the sequence length, "
                                 f"like attn_pattern, can't be stored; image positions must be the same count)")
            if self.layouts[hook] == "ragged":
                self.parts.setdefault(hook, []).append(t)
            else:
                if hook not in self.fixed:
                    self.fixed[hook] = torch.empty((self.rows, *shape), dtype=t.dtype)
                self.fixed[hook][self.filled:self.filled + n] = t
        if self.ragged:
            self.lengths.append(lengths.to(torch.int64))
        self.filled += n

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {hook: torch.cat(parts) for hook, parts in self.parts.items()}
        out.update(self.fixed)
        if not self.ragged:
            return out
        out[OFFSETS_KEY] = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cat(self.lengths).cumsum(0)])
        return out


# ------------------------------------------------------------------------------------------------ store side
def _model_info(model: Any) -> dict[str, Any]:
    hf = getattr(model, "hf", None)
    return {"name_or_path": getattr(model, "name_or_path", None), "revision": getattr(model, "revision", None),
            "class": type(hf).__name__ if hf is not None else type(model).__name__,
            "n_layers": getattr(model, "n_layers", None), "hidden_size": getattr(model, "hidden_size", None),
            "is_vlm": bool(getattr(model, "is_vlm", False))}


def _differences(old: dict[str, Any], new: dict[str, Any], shard_size: int | None) -> list[str]:
    diffs = []
    for key, label in (("name_or_path", "model"), ("revision", "model revision")):
        if old["model"].get(key) != new["model"][key]:
            diffs.append(f"{label}: store has {old['model'].get(key)!r}, now {new['model'][key]!r}")
    if sorted(old["hooks"]) != sorted(new["hooks"]):
        diffs.append(f"hooks: store has {old['hooks']}, now {new['hooks']}")
    for key in ("positions", "dtype"):
        if old.get(key) != new[key]:
            diffs.append(f"{key}: store has {old.get(key)!r}, now {new[key]!r}")
    if old.get("dataset_fingerprint") != new["dataset_fingerprint"]:
        diffs.append(f"data set: store has {old.get('n_examples')} examples with fingerprint "
                     f"{str(old.get('dataset_fingerprint'))[:19]}..., now {new['n_examples']} with "
                     f"{new['dataset_fingerprint'][:19]}...")
    if shard_size is not None and old.get("shard_size") not in (None, shard_size) and old["shards"]:
        diffs.append(f"shard_size: store has {old['shard_size']}, now {shard_size}")
    return diffs


def _clear_store_files(root: Path) -> None:
    """Remove only files a store consists of (never anything else the user keeps in the directory)."""
    for name in (MANIFEST, METADATA):
        (root / name).unlink(missing_ok=True)
    for pattern_dir in (root, root / SHARD_DIR):
        if pattern_dir.is_dir():
            for p in pattern_dir.iterdir():
                if p.name.startswith(TMP_PREFIX) or (pattern_dir.name == SHARD_DIR and p.suffix == ".safetensors"):
                    p.unlink()


def _refuse_foreign(root: Path) -> None:
    """Raise :class:`StoreError` when ``root`` holds files but no store (someone else's folder)."""
    if not (root / MANIFEST).exists() and [p for p in root.iterdir()
                                           if not p.name.startswith(TMP_PREFIX) and p.name != LOCK_FILE]:
        raise StoreError(f"out directory {root} is not empty and holds no haltrace store; pick an empty or "
                         f"new directory, or pass overwrite=True (it only removes store files)")


def _default_shard_size(batch: dict[str, torch.Tensor], rows: int, batch_size: int, n: int) -> int:
    bytes_per_row = max(1, sum(t.numel() * t.element_size() for t in batch.values()) // max(rows, 1))
    size = max(batch_size, (DEFAULT_SHARD_BYTES // bytes_per_row) // batch_size * batch_size)
    return max(1, min(size, n))


# ----------------------------------------------------------------------------------------------------- harvest
def harvest(model: Any, dataset: Iterable[Mapping[str, Any]], hooks: Sequence[str], positions: Any = "last", *,
            out: str | os.PathLike, batch_size: int = 32, shard_size: int | None = None,
            dtype: torch.dtype = torch.float32, progress: bool = True, overwrite: bool = False,
            _after_shard: Callable[[int], None] | None = None) -> ActivationStore:
    """Capture ``hooks`` at ``positions`` for every example and stream them to the store directory ``out``.

    Args:
        model: a :class:`haltrace.models.Model` (anything with ``prepare``, ``capture``, ``name_or_path``).
        dataset: re-iterable sequence of dicts with ``"prompt"``, optional ``"image"`` (PIL) and any extras;
            JSON-serialisable extras go to ``metadata.jsonl``, row-aligned with the activations.
        hooks: hook names (see :mod:`haltrace.conventions`), e.g. ``["resid_post.3"]``.
        positions: ``"last"``, an int or list of ints, ``"image"`` -> fixed ``[n, P, ...]`` rows;
            ``None``/``"all"`` -> every non-padding token, stored ragged (flat + offsets).
        out: store directory. Rerunning with the same model, hooks, positions, dtype and data set resumes it
            (finished shards are kept); anything else raises ``ValueError`` unless ``overwrite=True``.
        batch_size: examples per forward pass. shard_size: examples per shard file (default: ~256 MiB of
            activations, a multiple of ``batch_size``); peak memory is about one shard.
        dtype: storage dtype. progress: show a rich progress bar on stderr.
        _after_shard: test hook, called with the shard index after each shard is committed.

    Returns:
        The finished :class:`ActivationStore`.

    Example:
        >>> data = [{"prompt": "a red circle", "label": 0}, {"prompt": "a blue star", "label": 1}]
        >>> store = harvest(model, data, ["resid_post.1"], out="acts/", progress=False)
        >>> len(store), store.hooks
        (2, ['resid_post.1'])
    """
    hooks = list(hooks) if not isinstance(hooks, str) else [hooks]
    if not hooks or len(set(hooks)) != len(hooks):
        raise ValueError(f"hooks must be a non-empty list of distinct hook names, got {hooks}")
    valid = set(model.valid_hooks()) if hasattr(model, "valid_hooks") else None
    if valid is not None and (bad := [h for h in hooks if h not in valid]):
        raise ValueError(f"hooks {bad} are not offered by this model; valid hooks: {sorted(valid)}")
    if batch_size < 1 or (shard_size is not None and shard_size < 1):
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size} and {shard_size}")
    rule, ragged = _normalise_positions(positions)
    _check_reiterable(dataset)
    root = Path(out)
    from haltrace.distributed import rank_world

    rank, world = rank_world()
    if world > 1:
        return _harvest_parallel(model, dataset, hooks, root, rule, ragged, rank, world, batch_size=batch_size,
                                 shard_size=shard_size, dtype=dtype, progress=progress, overwrite=overwrite,
                                 _after_shard=_after_shard)
    root.mkdir(parents=True, exist_ok=True)
    if not overwrite:
        _refuse_foreign(root)  # before the lock file is created: a refused folder is left exactly as it was
    with store_lock(root):  # a second harvest into the same folder waits here for the first to finish
        return _harvest_into(model, dataset, hooks, root, rule, ragged, batch_size=batch_size,
                             shard_size=shard_size, dtype=dtype, progress=progress, overwrite=overwrite,
                             _after_shard=_after_shard)


def _harvest_into(model: Any, dataset: Any, hooks: list[str], root: Path, rule: Any, ragged: bool, *,
                  batch_size: int, shard_size: int | None, dtype: torch.dtype, progress: bool, overwrite: bool,
                  _after_shard: Callable[[int], None] | None) -> ActivationStore:
    """The body of :func:`harvest`, run while holding the store folder's lock."""
    manifest, rows, first = _prepare_store(model, dataset, hooks, root, rule, ragged, batch_size=batch_size,
                                           shard_size=shard_size, dtype=dtype, overwrite=overwrite)

    def record(entry: dict[str, Any]) -> None:
        manifest["shards"] = sorted([e for e in manifest["shards"] if e["index"] != entry["index"]] + [entry],
                                    key=lambda e: e["index"])
        manifest["complete"] = len(manifest["shards"]) == manifest["n_shards"]
        write_manifest(root, manifest)

    _write_shards(model, rows, manifest, root, range(manifest["n_shards"]), {e["index"] for e in manifest["shards"]},
                  rule, ragged, dtype, first, record, progress, _after_shard)
    if not manifest["complete"]:  # everything was already done (resume of a finished store)
        manifest["complete"] = True
        write_manifest(root, manifest)
    return ActivationStore.open(root)


def _prepare_store(model: Any, dataset: Any, hooks: list[str], root: Path, rule: Any, ragged: bool, *,
                   batch_size: int, shard_size: int | None, dtype: torch.dtype, overwrite: bool
                   ) -> tuple[dict[str, Any], _Rows, Any]:
    """Check or start the store in ``root`` (under its lock): metadata installed, manifest written with the
    intact shards of an earlier run and the shard size fixed; returns (manifest, rows, first batch or None)."""
    # what is already in ``out``?
    old: dict[str, Any] | None = None
    if overwrite:
        _clear_store_files(root)
    else:
        if (root / MANIFEST).exists():
            try:
                old = read_manifest(root)
            except StoreError as err:
                raise StoreError(f"{err}. Use a new out directory or overwrite=True.") from None
        else:
            _refuse_foreign(root)

    # pass 1: fingerprint + metadata into a temp file, installed only once we know the store is compatible
    meta_tmp = root / f"{TMP_PREFIX}{METADATA}"
    fingerprint, n = _scan(dataset, str(meta_tmp))
    if n == 0:
        meta_tmp.unlink()
        raise ValueError("dataset is empty; nothing to harvest")
    manifest: dict[str, Any] = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "haltrace_version": __version__,
        "model": _model_info(model), "hooks": hooks, "positions": rule,
        "layouts": hook_layouts(hooks, ragged), "dtype": dtype_name(dtype), "shapes": {},
        "n_examples": n, "batch_size": batch_size, "shard_size": shard_size, "n_shards": None,
        "dataset_fingerprint": fingerprint, "shards": [], "complete": False,
        "layer_convention": conventions.__doc__,
    }
    if old is not None:
        if diffs := _differences(old, manifest, shard_size):
            meta_tmp.unlink()
            raise StoreError(f"{root} already holds a store made with different settings: {'; '.join(diffs)}. "
                             f"Use a new out directory, or pass overwrite=True to replace it.")
        manifest["hooks"], manifest["layouts"] = old["hooks"], old["layouts"]  # same set; keep stored order
        manifest["shapes"] = old["shapes"] if old["shards"] else {}
        if old["shards"] or shard_size is None:
            manifest["shard_size"] = old.get("shard_size")
        # keep only shards whose files are intact; anything else is redone
        manifest["shards"] = []
        for entry in old["shards"]:
            if problem := check_shard_file(root, entry, old["layouts"]):
                warnings.warn(f"harvest: redoing shard {entry['index']}: {problem}", stacklevel=2)
            else:
                manifest["shards"].append(entry)
    os.replace(meta_tmp, root / METADATA)
    for p in root.iterdir():  # temp files left by a killed run
        if p.name.startswith(TMP_PREFIX):
            p.unlink()
    (root / SHARD_DIR).mkdir(exist_ok=True)
    for p in (root / SHARD_DIR).iterdir():
        if p.name.startswith(TMP_PREFIX):
            p.unlink()

    rows = _Rows(dataset)
    first: tuple[dict[str, torch.Tensor], torch.Tensor | None] | None = None
    if manifest["shard_size"] is None:  # size the shards from the first batch's bytes per row
        first = _run_batch(model, rows.take(0, min(batch_size, n)), manifest["layouts"], rule, ragged, dtype)
        manifest["shard_size"] = _default_shard_size(first[0], min(batch_size, n), batch_size, n)
    size = manifest["shard_size"]
    manifest["n_shards"] = math.ceil(n / size)
    write_manifest(root, manifest)
    return manifest, rows, first


def _write_shards(model: Any, rows: _Rows, manifest: dict[str, Any], root: Path, indices: Sequence[int],
                  done: set[int], rule: Any, ragged: bool, dtype: torch.dtype, first: Any,
                  record: Callable[[dict[str, Any]], None], progress: bool,
                  _after_shard: Callable[[int], None] | None) -> None:
    """Harvest and commit every shard in ``indices`` not in ``done``; ``record(entry)`` after each."""
    n, size, batch_size = manifest["n_examples"], manifest["shard_size"], manifest["batch_size"]
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("harvest"), BarColumn(), MofNCompleteColumn(), TextColumn("examples"),
                   TimeRemainingColumn(), console=Console(stderr=True), disable=not progress)
    with bar:
        total = sum(min(n, (i + 1) * size) - i * size for i in indices)
        task = bar.add_task("harvest", total=total,
                            completed=sum(min(n, (i + 1) * size) - i * size for i in indices if i in done))
        for index in indices:
            if index in done:
                continue
            start, stop = index * size, min(n, (index + 1) * size)
            buffer = _ShardBuffer(stop - start, manifest["layouts"], manifest["shapes"])
            lo = start
            if first is not None and index == 0:
                buffer.add(*first)
                lo = start + buffer.filled
                bar.advance(task, buffer.filled)
            first = None
            while lo < stop:
                hi = min(stop, lo + batch_size)
                buffer.add(*_run_batch(model, rows.take(lo, hi), manifest["layouts"], rule, ragged, dtype))
                bar.advance(task, hi - lo)
                lo = hi
            path = root / shard_name(index)
            atomic_write(path, lambda tmp, b=buffer, s=start, e=stop: save_file(
                b.tensors(), tmp, metadata={"start": str(s), "stop": str(e), "format": FORMAT_NAME}))
            del buffer  # drop this shard's activations before the next shard starts
            record({"index": index, "file": shard_name(index), "start": start, "stop": stop,
                    "bytes": path.stat().st_size})
            if _after_shard is not None:
                _after_shard(index)


# ------------------------------------------------------------------------------------------- data-parallel
PARTS_DIR = "parts"


def _part_dir(root: Path, rank: int, world: int) -> Path:
    return root / PARTS_DIR / f"rank{rank}-of-{world}"


def _harvest_parallel(model: Any, dataset: Any, hooks: list[str], root: Path, rule: Any, ragged: bool, rank: int,
                      world: int, *, batch_size: int, shard_size: int | None, dtype: torch.dtype, progress: bool,
                      overwrite: bool, _after_shard: Callable[[int], None] | None) -> ActivationStore:
    """:func:`harvest` under ``torchrun`` / ``accelerate launch``: rank 0 starts (or checks) the store; rank ``r``
    harvests a contiguous run of shards (:func:`haltrace.distributed.rank_slice`) into ``shards/`` and records
    them in its own ``parts/rank<r>-of-<w>/part.json`` under its own lock (no rank waits on another's lock);
    after a barrier rank 0 merges the parts into ``manifest.json``. Resuming keeps every intact shard a rank
    recorded, so a relaunch after a killed rank redoes only that rank's unfinished shards."""
    from haltrace.distributed import barrier, rank_slice

    first = None
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if not overwrite:
            _refuse_foreign(root)
        with store_lock(root):
            if overwrite and (root / PARTS_DIR).exists():
                import shutil

                shutil.rmtree(root / PARTS_DIR)
            _, _, first = _prepare_store(model, dataset, hooks, root, rule, ragged, batch_size=batch_size,
                                         shard_size=shard_size, dtype=dtype, overwrite=overwrite)
    barrier()  # the store is set up (metadata, shard size): every rank may start
    manifest = read_manifest(root)
    rows = _Rows(dataset)
    indices = rank_slice(manifest["n_shards"], 1, rank, world)
    mine = _part_dir(root, rank, world)
    mine.mkdir(parents=True, exist_ok=True)
    with store_lock(mine):
        part_file = mine / "part.json"
        recorded = json.loads(part_file.read_text()) if part_file.exists() else {"shards": [], "shapes": {}}
        if not manifest["shapes"] and recorded["shapes"]:
            manifest["shapes"] = recorded["shapes"]
        entries = {e["index"]: e for e in manifest["shards"] if e["index"] in indices}
        for entry in recorded["shards"]:
            if entry["index"] in indices and not check_shard_file(root, entry, manifest["layouts"]):
                entries[entry["index"]] = entry

        def record(entry: dict[str, Any] | None = None) -> None:
            if entry is not None:
                entries[entry["index"]] = entry
            atomic_write_text(part_file, json.dumps({"shards": sorted(entries.values(), key=lambda e: e["index"]),
                                                     "shapes": manifest["shapes"]}))

        _write_shards(model, rows, manifest, root, indices, set(entries), rule, ragged, dtype,
                      first if 0 in indices else None, record, progress, _after_shard)
        record()
    barrier()  # every rank's shards are on disk
    if rank == 0:
        with store_lock(root):
            manifest = read_manifest(root)
            merged = {e["index"]: e for e in manifest["shards"]}
            for r in range(world):
                part_file = _part_dir(root, r, world) / "part.json"
                part = json.loads(part_file.read_text()) if part_file.exists() else {"shards": [], "shapes": {}}
                for entry in part["shards"]:
                    merged[entry["index"]] = entry
                manifest["shapes"] = manifest["shapes"] or part["shapes"]
            manifest["shards"] = sorted(merged.values(), key=lambda e: e["index"])
            manifest["complete"] = len(manifest["shards"]) == manifest["n_shards"]
            if not manifest["complete"]:
                raise StoreError(f"data-parallel harvest into {root}: the parts hold {len(manifest['shards'])} of "
                                 f"{manifest['n_shards']} shards")
            write_manifest(root, manifest)
            import shutil

            shutil.rmtree(root / PARTS_DIR, ignore_errors=True)
    barrier()  # the merged manifest is written
    return ActivationStore.open(root)
