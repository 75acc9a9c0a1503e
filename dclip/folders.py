"""Folders written whole or not at all: what a run publishes (final models, plain-CLIP exports) is written beside its
place as `<folder>.partial` and swapped in by renames, so that an error or a kill while writing leaves the previous
complete folder where it was, and a complete folder is at every moment under one of two names."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path


def write_whole(folder: str | Path, write: Callable[[Path], object]) -> Path:
    """Call `write(partial)` to fill `<folder>.partial` (created empty first), then swap it in for `folder`: the old
    folder, if any, is renamed to `<folder>.previous`, the new one renamed into place, the old one removed. An
    exception from `write`, or from the swap (the old folder is put back), propagates with `folder` as it was.
    Returns `folder`."""
    folder = Path(folder)
    partial, previous = folder.with_name(folder.name + ".partial"), folder.with_name(folder.name + ".previous")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    write(partial)
    if folder.exists():
        shutil.rmtree(previous, ignore_errors=True)
        folder.rename(previous)
    try:
        partial.rename(folder)
    except BaseException:
        if previous.exists() and not folder.exists():  # the swap failed half-way: the old folder back in place
            previous.rename(folder)
        raise
    shutil.rmtree(previous, ignore_errors=True)
    return folder
