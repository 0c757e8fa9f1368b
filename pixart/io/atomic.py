"""Writing files so that a failure leaves nothing behind: a temporary name beside the target, renamed into place once
complete. On any error (a full disk, a read-only file system, no permission, Ctrl+C) the partial file is removed and
the error raised, so the previous file of that name, if any, is intact and the caller can say so in one line."""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path


def remove_quietly(*paths) -> None:
    """Remove files or folders that may not exist (cleaning up after a failed write must not raise a second error)."""
    for path in paths:
        path = Path(path)
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        except OSError:
            pass


def temporary_name(path, suffix: str = "") -> Path:
    """The name a write of `path` goes to first: beside it (same file system, so the rename is atomic), hidden,
    unique to this process (concurrent writers of one file never share it); `suffix` for writers that insist on
    one (MindSpore's `.ckpt`, NumPy's `.npz`)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix}")


@contextlib.contextmanager
def atomic_path(path, suffix: str = "", also_remove=()):
    """`with atomic_path(final) as tmp: write(tmp)`: `tmp` renamed to `final` when the block ends, or removed (with
    `also_remove`, files a writer makes beside its target) when it raises."""
    tmp = temporary_name(path, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp, *also_remove)
        raise


def write_bytes(path, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_text(path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))
