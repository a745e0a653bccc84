"""haltrace's error base class and the plain-language description of the errors a user's input can cause.

Every error haltrace raises about its input (a file, an option, a store, a saved fit) derives from
:class:`HaltraceError`, which is a ``ValueError`` so that code catching ``ValueError`` keeps working::

    try:
        fitted = load_fitted("runs/pvp")
    except HaltraceError as err:          # StoreError, VectorError, DataFormatError, ... all land here
        print(err)

:func:`describe` turns an exception into the one message the command line prints (the error boundary in
:mod:`haltrace.cli`), and :func:`share` / :data:`FILE_MODE` give every file haltrace writes the same
permissions (``0644`` / ``0755`` under the usual umask). This module uses only the standard library so that
:mod:`haltrace.deploy` can import it without the rest of haltrace.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

DEBUG_ENV = "HALTRACE_DEBUG"
DEBUG_HINT = f"run with --debug (haltrace --debug ...) or {DEBUG_ENV}=1 for the full traceback"


class HaltraceError(ValueError):
    """Base class of every error haltrace raises about its input (files, options, stores, saved fits)."""


class InputError(HaltraceError):
    """A file or option given by the user cannot be used; the message names it and the fix."""


class ModelLoadError(HaltraceError):
    """A model name or folder cannot be loaded (missing folder, corrupt weights, unreadable config)."""


# --------------------------------------------------------------------------------------------- permissions
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open() gives a new file: 0644 under the usual umask 022
DIR_MODE = 0o777 & ~_umask()  # what mkdir() gives a new folder: 0755


def share(path: str | os.PathLike) -> None:
    """Give ``path`` the permissions of an ordinarily created file or folder (mkstemp / mkdtemp make them
    private, 0600 / 0700, so a shared store or model folder would be unreadable to a colleague)."""
    path = Path(path)
    os.chmod(path, DIR_MODE if path.is_dir() else FILE_MODE)


def share_tree(root: str | os.PathLike) -> None:
    """:func:`share` for ``root`` and everything under it."""
    root = Path(root)
    share(root)
    if root.is_dir():
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                share(Path(dirpath) / name)


def check_writable(path: str | os.PathLike, option: str = "--out") -> None:
    """Raise :class:`InputError` when ``path`` (a file or folder to be created) cannot be written: a part of it
    is a file, or its nearest existing folder is read-only or not writable. Run before any expensive work."""
    target = Path(path).expanduser()
    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe != target and not probe.is_dir():
        raise InputError(f"{option} {path}: {probe} is a file, so nothing can be created under it; choose "
                         f"another {option}")
    folder = probe if probe.is_dir() else probe.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"{option} {path}: {folder} is not writable (read-only file system or no permission); "
                         f"choose another {option}")


# ------------------------------------------------------------------------------------------------ messages
_OS_HINTS = {
    errno.EROFS: "the file system is read-only; choose another --out",
    errno.ENOSPC: "the disk is full; free space or choose another --out",
    errno.EDQUOT: "the disk quota is exceeded; free space or choose another --out",
    errno.EACCES: "check the permissions, or choose another path",
    errno.EPERM: "check the permissions, or choose another path",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "give a file, not a folder",
    errno.EEXIST: "the path already exists",
}


def _os_message(exc: OSError) -> str:
    where = exc.filename if exc.filename is not None else None
    if exc.filename2 is not None:
        where = f"{exc.filename} -> {exc.filename2}"
    what = exc.strerror or str(exc)
    hint = _OS_HINTS.get(exc.errno or -1)
    text = f"{what}: {where}" if where else what
    return f"{text} ({hint})" if hint else text


def describe(exc: BaseException) -> tuple[str, int] | None:
    """``(message, exit code)`` for an error caused by the user's input, else ``None`` (a bug: the caller
    prints one line and :data:`DEBUG_HINT`). Exit code 2 = usage or input error."""
    name = type(exc).__name__
    module = type(exc).__module__ or ""
    if isinstance(exc, HaltraceError) or name == "DeployError":  # deploy.py imports no haltrace module
        return str(exc), 2
    if name == "SafetensorError" or module.startswith("safetensors"):
        return (f"a file is not a valid safetensors file ({exc}); it may be truncated, or a pickle "
                "(haltrace never loads pickles)"), 2
    if isinstance(exc, json.JSONDecodeError):
        return f"a JSON file is invalid ({exc})", 2
    if isinstance(exc, UnicodeDecodeError):
        return f"a file is not UTF-8 text ({exc}); save it as UTF-8", 2
    if name in ("UnidentifiedImageError", "DecompressionBombError"):
        return f"{exc} (not a readable image; re-save it as PNG or JPEG)", 2
    if name in ("HFValidationError", "RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError",
                "EntryNotFoundError", "LocalEntryNotFoundError", "OfflineModeIsEnabled"):
        return f"cannot load the model: {exc}", 2
    if isinstance(exc, OSError):
        return _os_message(exc), 2
    return None
