"""Small helpers shared across the package: atomic, durable file writes."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path


def _default_file_mode() -> int:
    """The mode a plain `open(path, "w")` would give a new file under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def fsync_directory(folder: str | os.PathLike) -> None:
    """Make a rename inside `folder` durable (where the platform allows opening directories)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


# The renames that `atomic_files` holds back until its block completes; None outside such a block.
_PENDING_RENAMES: ContextVar[list[tuple[str, Path]] | None] = ContextVar("pending_renames", default=None)


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to `path`; on success it is flushed to disk and renamed to
    `path` (inside `atomic_files`, when that block completes), else deleted.

    A reader never sees a half-written file, and a crash (or a full disk) leaves the previous version
    in place. An OSError that names no file (the kernel's "No space left on device") is raised again
    naming `path`. The file gets the permissions of a normally created one (mkstemp would leave it 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    pending = _PENDING_RENAMES.get()
    try:
        try:
            yield temporary
            with open(temporary, "rb+") as written:
                os.fsync(written.fileno())
        except OSError as error:
            if error.filename is None and error.errno is not None:
                raise OSError(error.errno, error.strerror, str(path)) from error
            raise
        os.chmod(temporary, _default_file_mode())
        if pending is None:
            os.replace(temporary, path)
            fsync_directory(path.parent)
        else:
            pending.append((temporary, path))
            temporary = None
    finally:
        if temporary is not None and os.path.exists(temporary):
            os.remove(temporary)


@contextmanager
def atomic_files():
    """Write several files all or none: each `atomic_path` write inside the block is flushed to disk
    as it completes, and all are renamed into place when the block completes. If the block fails (an
    error, a full disk), every file keeps its previous version and no temporary remains. A kill leaves
    the previous versions and hidden `.<name>.<random>.tmp` files; only one during the renames
    themselves (which write no data) leaves some files new and others old."""
    pending: list[tuple[str, Path]] = []
    token = _PENDING_RENAMES.set(pending)
    try:
        yield
    except BaseException:
        for temporary, _ in pending:
            os.remove(temporary)
        raise
    finally:
        _PENDING_RENAMES.reset(token)
    for temporary, path in pending:
        os.replace(temporary, path)
    for folder in dict.fromkeys(path.parent for _, path in pending):
        fsync_directory(folder)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as temporary:
        Path(temporary).write_text(text, encoding="utf-8")


def atomic_write_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """`tensors` as a safetensors file, written atomically. Serialized in memory and written by Python:
    safetensors' own file writer reports a full disk without naming the file."""
    from safetensors.torch import save

    with atomic_path(path) as temporary:
        Path(temporary).write_bytes(save(tensors, metadata=metadata))
