"""Files and folders on disk. Folders written whole or not at all: what a run publishes (final models, plain-CLIP
exports) is written beside its place as `<folder>.partial` and swapped in by renames, so that an error or a kill while
writing leaves the previous complete folder where it was, and a complete folder is at every moment under one of two
names. Files hashed by content (`file_hash`), for checksums and content ids."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path


def write_whole(folder: str | Path, write: Callable[[Path], object]) -> Path:
    """Call `write(partial)` to fill `<folder>.partial` (created empty first), then swap it in for `folder`: the old
    folder, if any, is renamed to `<folder>.previous`, the new one renamed into place, the old one removed. An
    exception from `write`, or from the swap (the old folder is put back), propagates with `folder` as it was; a
    swap killed half-way is finished by the next call before it writes (the new folder, else the old, put in place).
    Returns `folder`."""
    folder = Path(folder)
    partial, previous = folder.with_name(folder.name + ".partial"), folder.with_name(folder.name + ".previous")
    if not folder.exists() and previous.is_dir():  # an earlier swap killed half-way: finish it first
        # the swap starts once the new folder is written whole, so `.partial` is complete where it is there
        (partial if partial.is_dir() else previous).rename(folder)
    _remove(partial)
    partial.mkdir(parents=True)
    write(partial)
    if folder.exists():
        _remove(previous)
        folder.rename(previous)
    try:
        partial.rename(folder)
    except BaseException:
        if previous.exists() and not folder.exists():  # the swap failed half-way: the old folder back in place
            previous.rename(folder)
        raise
    _remove(previous)
    return folder


def _remove(path: Path) -> None:
    """Remove a folder or a file at `path`, if there is one."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def file_hash(path: str | Path, algorithm: str = "sha256"):
    """A `hashlib` object (`algorithm`) fed with the file's bytes, read 1 MiB at a time (never whole in memory); the
    caller may feed it more before taking its digest."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest
