"""On-disk activation store: activations streamed to safetensors shards, read back lazily.

Peers (TransformerLens, nnsight) keep cached activations in memory, so a large data set runs out of memory.
haltrace writes one shard at a time with :func:`harvest` and reads it back with :class:`ActivationStore`
without ever loading the whole store.

Layout of a store directory::

    DIR/manifest.json                     format version, model id + revision, hooks, positions, dtype,
                                          per-hook row shapes, data set fingerprint, completed shards
    DIR/metadata.jsonl                    one JSON object per example (prompt + JSON-serialisable extras)
    DIR/shards/shard-00000.safetensors    one tensor per hook; rows = examples [start, stop)

Two layouts, chosen by ``positions``:

* ``"fixed"`` (``positions="last"``, an int, a list of ints, ``"image"``): every example gives the same number
  of positions P, so a hook's tensor in a shard is ``[rows, P, ...]`` exactly as ``Model.capture`` returns it.
* ``"ragged"`` (``positions=None`` / ``"all"``): examples have different lengths, so padding is dropped and a
  hook's tensor is the flat ``[sum of lengths, ...]``; the shard also holds ``__offsets__`` (``[rows + 1]``,
  int64) so row ``i`` is ``flat[offsets[i]:offsets[i+1]]``. :meth:`ActivationStore.lengths` gives the lengths.
  Image-level hooks (``vision_out``, ``projector_out``) have no text positions and stay fixed-layout rows
  ``[rows, n_image_tokens, ...]`` even here; ``manifest["layouts"]`` names each hook's layout.

Every file is written to a temporary file in the same directory and then ``os.replace``-d, so a crash never
leaves a half-written file under its final name. Only safetensors and JSON are used, never pickle.

Example
-------
>>> from haltrace.trace.harvest import harvest
>>> data = [{"prompt": p} for p in ("a red circle", "a blue star", "the green square")]
>>> _ = harvest(model, data, ["resid_post.1"], positions="last", out="acts/", progress=False)
>>> store = ActivationStore.open("acts/")
>>> store.load("resid_post.1").shape                              # [n_examples, 1, d_model] for "last"
torch.Size([3, 1, 32])
>>> [batch.shape[0] for batch in store.iter_batches("resid_post.1", 2)]   # streams shard slices
[2, 1]
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from haltrace.conventions import GLOBAL_HOOKS
from haltrace.errors import FILE_MODE, HaltraceError, share

FORMAT_NAME = "haltrace.activation_store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
METADATA = "metadata.jsonl"
SHARD_DIR = "shards"
OFFSETS_KEY = "__offsets__"
TMP_PREFIX = ".tmp-"
LOCK_FILE = ".haltrace-lock"  # advisory lock held by a harvest writing into the folder


class StoreError(HaltraceError):
    """A store directory is missing, corrupt, incomplete or incompatible."""


# ----------------------------------------------------------------------------------------------- file helpers
def shard_name(index: int) -> str:
    """Relative path of shard ``index``, e.g. ``shards/shard-00000.safetensors``."""
    return f"{SHARD_DIR}/shard-{index:05d}.safetensors"


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temp file next to ``path``, fsync it, then ``os.replace`` it into place.

    The temp file lives in the same directory so the rename is atomic (same file system); readers see the
    old file or the new one, never a torn one. On any error the temp file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        share(tmp)  # mkstemp makes 0600; everything haltrace writes is 0644 (under the usual umask)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


@contextmanager
def store_lock(root: str | os.PathLike, *, wait: bool = True) -> Iterator[None]:
    """Hold an advisory lock (``flock``) on the store folder ``root`` for the duration of the block.

    A second writer into the same folder waits until the first has finished (a line on stderr says whom it
    waits for) or, with ``wait=False``, raises :class:`StoreError`. The lock file ``.haltrace-lock`` stays
    in the folder; the lock itself goes away with the process, also when it is killed.
    """
    import fcntl
    import sys

    path = Path(root) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            if not wait:
                raise StoreError(f"another harvest (pid {holder}) is writing to {root}; wait for it to finish or "
                                 "choose another folder") from None
            print(f"haltrace: waiting for another harvest (pid {holder}) writing to {root} to finish ...",
                  file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically replace ``path`` with ``text`` (UTF-8)."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    atomic_write(path, write)


def write_manifest(root: str | os.PathLike, manifest: dict[str, Any]) -> None:
    """Atomically rewrite ``root/manifest.json``."""
    atomic_write_text(Path(root) / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def read_manifest(root: str | os.PathLike) -> dict[str, Any]:
    """Read and sanity-check ``root/manifest.json``; raise :class:`StoreError` saying what is wrong."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise StoreError(f"{root} is not a haltrace activation store: {MANIFEST} is missing. "
                         f"Create one with haltrace.harvest(model, dataset, hooks, out={str(root)!r}).")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StoreError(f"{path} is corrupt ({err}); rerun harvest with overwrite=True to rebuild the store") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise StoreError(f"{path} is not a haltrace activation store manifest (no format={FORMAT_NAME!r})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise StoreError(f"{path} has store format version {version}; this haltrace reads version "
                         f"{FORMAT_VERSION}. Rebuild the store with harvest(..., overwrite=True).")
    missing = [k for k in ("hooks", "layouts", "dtype", "shapes", "n_examples", "shards") if k not in manifest]
    if missing:
        raise StoreError(f"{path} is corrupt: missing keys {missing}; rebuild with harvest(..., overwrite=True)")
    return manifest


def dtype_from_name(name: str) -> torch.dtype:
    """``"float32"`` -> ``torch.float32`` (the manifest stores dtypes by name)."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise StoreError(f"unknown dtype {name!r} in manifest")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dtype).removeprefix("torch.")


def hook_layouts(hooks: Sequence[str], ragged: bool) -> dict[str, str]:
    """Each hook's layout: ``"ragged"`` for token-level hooks when all positions are kept, else ``"fixed"``.

    >>> hook_layouts(["resid_post.0", "projector_out"], ragged=True)
    {'resid_post.0': 'ragged', 'projector_out': 'fixed'}
    """
    return {h: "ragged" if ragged and h.partition(".")[0] not in GLOBAL_HOOKS else "fixed" for h in hooks}


def check_shard_file(root: Path, entry: dict[str, Any], layouts: Mapping[str, str]) -> str | None:
    """Return ``None`` if the shard described by manifest ``entry`` is intact, else a reason string.

    Checks existence, byte size (catches truncation cheaply) and the safetensors header (keys, row count);
    no tensor data is read.
    """
    path = root / entry["file"]
    if not path.is_file():
        return f"{path} is missing"
    size = path.stat().st_size
    if size != entry.get("bytes"):
        return f"{path} has {size} bytes, the manifest says {entry.get('bytes')} (truncated or overwritten)"
    rows = entry["stop"] - entry["start"]
    try:
        with safe_open(str(path), framework="pt") as fh:
            keys = set(fh.keys())
            if not set(layouts) <= keys:
                return f"{path} lacks hooks {sorted(set(layouts) - keys)}"
            if "ragged" in layouts.values():
                n_off = fh.get_slice(OFFSETS_KEY).get_shape()[0]
                if n_off != rows + 1:
                    return f"{path} has {n_off - 1} rows, expected {rows}"
            for hook, layout in layouts.items():
                n = fh.get_slice(hook).get_shape()[0]
                if layout == "fixed" and n != rows:
                    return f"{path}: hook {hook!r} has {n} rows, expected {rows}"
    except (SafetensorError, OSError, KeyError) as err:
        return f"{path} is unreadable ({err})"
    return None


# ----------------------------------------------------------------------------------------------------- reader
def _normalise_rows(rows: Any, n: int) -> list[int]:
    """Turn ``None`` / slice / int sequence / tensor into a list of non-negative row indices (bounds-checked)."""
    if rows is None:
        return list(range(n))
    if isinstance(rows, slice):
        return list(range(n))[rows]
    if isinstance(rows, torch.Tensor):
        if rows.dtype == torch.bool:
            if rows.numel() != n:
                raise IndexError(f"boolean row mask has {rows.numel()} entries, store has {n} rows")
            return rows.nonzero().flatten().tolist()
        rows = rows.flatten().tolist()
    out = []
    for r in rows:
        r = int(r)
        if r < 0:
            r += n
        if not 0 <= r < n:
            raise IndexError(f"row {r} out of range for a store with {n} rows")
        out.append(r)
    return out


class ActivationStore:
    """Lazy reader for a store written by :func:`harvest`. Nothing is loaded until asked for.

    Example
    -------
    >>> from haltrace.trace.harvest import harvest
    >>> data = [{"prompt": f"a red circle {'.' * k}"} for k in range(10)]
    >>> _ = harvest(model, data, ["resid_post.1"], out="acts/", progress=False)
    >>> store = ActivationStore.open("acts/")
    >>> store.hooks, len(store), store.metadata[0]["prompt"]
    (['resid_post.1'], 10, 'a red circle ')
    >>> store.load("resid_post.1", rows=[0, 5, 9]).shape           # [3, P, d]
    torch.Size([3, 1, 32])
    """

    def __init__(self, root: str | os.PathLike, manifest: dict[str, Any]):
        self.root = Path(root)
        self.manifest = manifest
        self._metadata: list[dict[str, Any]] | None = None
        self._offsets: dict[int, torch.Tensor] = {}  # ragged: shard index -> offsets (small, cached)

    # -- construction
    @classmethod
    def open(cls, root: str | os.PathLike, *, verify: bool = True) -> ActivationStore:
        """Open a finished store. ``verify`` checks every shard's size and header (no data is read).

        Raises :class:`StoreError` (a ``ValueError``) if the manifest is missing/corrupt, the store is
        unfinished, or a shard is missing or truncated, with what to do about it.
        """
        root = Path(root)
        manifest = read_manifest(root)
        if not manifest.get("complete"):
            done = len(manifest["shards"])
            total = manifest.get("n_shards")
            raise StoreError(f"store {root} is unfinished ({done}/{total if total is not None else '?'} "
                             f"shards); rerun harvest with the same arguments and out={str(root)!r} to finish it")
        store = cls(root, manifest)
        if verify:
            for entry in store._shards:
                problem = check_shard_file(root, entry, store.manifest["layouts"])
                if problem:
                    raise StoreError(f"store {root} is damaged: {problem}. Rerun harvest with the same "
                                     f"arguments to redo that shard, or overwrite=True to rebuild.")
        return store

    # -- description
    @property
    def hooks(self) -> list[str]:
        return list(self.manifest["hooks"])

    @property
    def positions(self) -> Any:
        return self.manifest["positions"]

    @property
    def ragged(self) -> bool:
        """True for ``positions="all"`` stores (token-level hooks stored flat, plus offsets)."""
        return "ragged" in self.manifest["layouts"].values()

    def is_ragged(self, hook: str) -> bool:
        """Whether ``hook`` is stored flat per token (see :meth:`lengths`) rather than as ``[rows, P, ...]``."""
        self._check_hook(hook)
        return self.manifest["layouts"][hook] == "ragged"

    @property
    def dtype(self) -> torch.dtype:
        return dtype_from_name(self.manifest["dtype"])

    def shape(self, hook: str) -> tuple[int, ...]:
        """Per-row shape of ``hook``: ``(P, ...)`` for fixed hooks, per-token ``(...)`` for ragged ones."""
        self._check_hook(hook)
        return tuple(self.manifest["shapes"][hook])

    @property
    def _shards(self) -> list[dict[str, Any]]:
        return sorted(self.manifest["shards"], key=lambda e: e["start"])

    @property
    def shard_paths(self) -> list[Path]:
        return [self.root / e["file"] for e in self._shards]

    def __len__(self) -> int:
        return int(self.manifest["n_examples"])

    def __repr__(self) -> str:
        return (f"ActivationStore({str(self.root)!r}, n={len(self)}, hooks={self.hooks}, "
                f"positions={self.positions!r}, shards={len(self.manifest['shards'])})")

    # -- metadata
    def iter_metadata(self) -> Iterator[dict[str, Any]]:
        """Stream metadata rows (prompt + extras) without holding them all."""
        with open(self.root / METADATA, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    yield json.loads(line)

    @property
    def metadata(self) -> list[dict[str, Any]]:
        """All metadata rows, row-aligned with the activations (read once, then cached)."""
        if self._metadata is None:
            rows = list(self.iter_metadata())
            if len(rows) != len(self):
                raise StoreError(f"{self.root / METADATA} has {len(rows)} rows, the store has {len(self)}; "
                                 f"rebuild with harvest(..., overwrite=True)")
            self._metadata = rows
        return self._metadata

    # -- activations
    def _check_hook(self, hook: str) -> None:
        if hook not in self.manifest["hooks"]:
            raise KeyError(f"hook {hook!r} is not in this store; it has {self.hooks}")

    def _shard_offsets(self, i: int, fh: Any) -> torch.Tensor:
        if i not in self._offsets:
            self._offsets[i] = fh.get_tensor(OFFSETS_KEY)
        return self._offsets[i]

    def _read(self, i: int, fh: Any, hook: str, lo: int, hi: int) -> torch.Tensor:
        """Rows ``lo:hi`` (shard-local) of ``hook`` from open shard ``fh``; ragged -> flat token rows."""
        if self.is_ragged(hook):
            off = self._shard_offsets(i, fh)
            lo, hi = int(off[lo]), int(off[hi])
        return fh.get_slice(hook)[lo:hi]

    def lengths(self, rows: Any = None) -> torch.Tensor:
        """Per-row token counts (ragged stores); ``load(hook, rows).split(lengths(rows).tolist())`` gives rows."""
        if not self.ragged:
            raise ValueError(f"lengths() is for positions='all' stores; this one has positions={self.positions!r} "
                             f"and every row has shape {self.shape(self.hooks[0])}")
        all_lengths = []
        for i, path in enumerate(self.shard_paths):
            with safe_open(str(path), framework="pt") as fh:
                all_lengths.append(self._shard_offsets(i, fh).diff())
        lengths = torch.cat(all_lengths)
        return lengths[_normalise_rows(rows, len(self))] if rows is not None else lengths

    def iter_batches(self, hook: str, batch_size: int = 1024) -> Iterator[torch.Tensor]:
        """Yield ``hook`` activations in row order, ``batch_size`` rows at a time, reading only those slices.

        Fixed hooks yield ``[b, P, ...]``; ragged hooks yield the flat ``[tokens of b rows, ...]``. A batch
        never spans two shards' files at once, so memory stays at one batch.
        """
        self._check_hook(hook)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        pending: list[torch.Tensor] = []
        n_pending = 0
        for i, (entry, path) in enumerate(zip(self._shards, self.shard_paths, strict=True)):
            rows = entry["stop"] - entry["start"]
            with safe_open(str(path), framework="pt") as fh:
                lo = 0
                while lo < rows:
                    take = min(batch_size - n_pending, rows - lo)
                    pending.append(self._read(i, fh, hook, lo, lo + take))
                    n_pending += take
                    lo += take
                    if n_pending == batch_size:
                        yield pending[0] if len(pending) == 1 else torch.cat(pending)
                        pending, n_pending = [], 0
        if pending:
            yield pending[0] if len(pending) == 1 else torch.cat(pending)

    def load_last(self, hook: str) -> torch.Tensor:
        """``[n, d]``: each example's row at its last harvested position (a ``positions="last"`` store's one
        position); a hook stored without a position axis is returned as it is. What probes and their
        directions read."""
        x = self.load(hook)
        return x[:, -1] if x.dim() == 3 else x

    def load(self, hook: str, rows: Any = None) -> torch.Tensor:
        """Materialise ``hook`` for all rows or a subset (``rows``: ints, slice, bool mask), in that order.

        Fixed hooks return ``[n, P, ...]``; ragged hooks return the flat ``[sum of lengths, ...]`` of the
        requested rows (see :meth:`lengths`). Only the needed range of each shard is read.
        """
        self._check_hook(hook)
        if rows is None:
            parts = list(self.iter_batches(hook, batch_size=max(1, len(self))))
            return parts[0] if parts else torch.empty((0, *self.shape(hook)), dtype=self.dtype)
        wanted = _normalise_rows(rows, len(self))
        ragged = self.is_ragged(hook)
        pieces: dict[int, torch.Tensor] = {}  # global row -> tensor, filled shard by shard
        for i, (entry, path) in enumerate(zip(self._shards, self.shard_paths, strict=True)):
            local = sorted({r - entry["start"] for r in wanted if entry["start"] <= r < entry["stop"]})
            if not local:
                continue
            with safe_open(str(path), framework="pt") as fh:
                # one contiguous read covering the requested rows of this shard, then pick rows from it
                block_lo, block_hi = local[0], local[-1] + 1
                block = self._read(i, fh, hook, block_lo, block_hi)
                if ragged:
                    off = self._shard_offsets(i, fh)
                    base = int(off[block_lo])
                    for r in local:
                        pieces[entry["start"] + r] = block[int(off[r]) - base:int(off[r + 1]) - base]
                else:
                    for r in local:
                        pieces[entry["start"] + r] = block[r - block_lo]
        if not wanted:
            return torch.empty((0, *self.shape(hook)), dtype=self.dtype)
        if ragged:
            return torch.cat([pieces[r] for r in wanted])
        return torch.stack([pieces[r] for r in wanted])
