"""Small helpers shared across the package: atomic, durable file writes."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
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


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to `path`; on success it is flushed to disk and renamed to
    `path`, else deleted.

    A reader never sees a half-written file, and a crash (or a full disk) leaves the previous version
    in place. The file gets the permissions of a normally created one (mkstemp would leave it 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        yield temporary
        with open(temporary, "rb+") as written:
            os.fsync(written.fileno())
        os.chmod(temporary, _default_file_mode())
        os.replace(temporary, path)
        fsync_directory(path.parent)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as temporary:
        Path(temporary).write_text(text, encoding="utf-8")
