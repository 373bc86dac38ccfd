"""Writes that a crash cannot leave half done: write a temporary file or folder beside the
target, make it durable, then publish it with one rename.

A folder cannot be swapped in one atomic step on POSIX, so `publish_dir` moves the old one
aside first and the reader (`recover_dir`) puts it back if a crash came between the two
renames: at every moment one complete version exists under the name or under `NAME.old`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Replace `path` with `data` atomically (temp file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def _aside(final: Path) -> Path:
    return final.with_name(final.name + ".old")


def recover_dir(final: str | Path) -> None:
    """Finish or undo an interrupted `publish_dir` of `final`; remove unpublished temps."""
    final = Path(final)
    old = _aside(final)
    for stale in final.parent.glob(f"{final.name}.tmp*"):  # never published, never read
        shutil.rmtree(stale, ignore_errors=True)
    if old.is_dir():
        if final.is_dir():  # the new one is in place: the old one is no longer needed
            shutil.rmtree(old, ignore_errors=True)
        else:  # a crash between the two renames: the old one is the last complete version
            os.rename(old, final)
            fsync_dir(final.parent)


def publish_dir(final: str | Path, fill: Callable[[Path], None]) -> Path:
    """Build a folder with fill(tmp_folder), make its files durable, then swap it in for `final`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(final)
    tmp = final.with_name(f"{final.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    fill(tmp)
    for p in tmp.rglob("*"):  # make the bytes durable before the rename publishes them
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    old = _aside(final)
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)
    return final
