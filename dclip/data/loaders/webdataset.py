"""The webdataset loader: `.tar` shards read with the standard library (`tarfile`), members sharing a key grouped
into one sample, each sample an entry for the shared pipeline of `common`; non-streaming loads are cached by the
shards' paths, sizes and modification times."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import posixpath
import re
import tarfile
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .common import CAPTION_KEYS, LoadReport, _entry_features, _to_pairs, caption_list


if TYPE_CHECKING:
    from datasets import Dataset, IterableDataset


IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # webdataset members holding the image, in order of preference


def expand_braces(pattern: str) -> list[str]:
    """Shard names as webdataset (and the shell) expand them: `shard-{000..099}.tar` (a range, zero padding kept) and
    `{train,extra}-000.tar` (a list), nested or several in one name, in order."""
    match = re.search(r"\{(\d+)\.\.(\d+)\}|\{([^{}]*,[^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    first, last, listed = match.groups()
    if listed is not None:
        options = listed.split(",")
    else:
        width = len(first) if first.startswith("0") and len(first) > 1 else 0
        options = [str(number).zfill(width) for number in range(int(first), int(last) + 1)]
    head, tail = pattern[:match.start()], pattern[match.end():]
    return [name for option in options for name in expand_braces(head + option + tail)]


def is_url(path: str) -> bool:
    """A remote shard (`https://...`, `s3://...`, ...: read through fsspec), not a local path."""
    return "://" in path and not path.startswith("file://")


def _expand_shards(shards: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    patterns = [os.fspath(shards)] if isinstance(shards, (str, os.PathLike)) else [os.fspath(s) for s in shards]
    paths = []
    for pattern in (name for given in patterns for name in expand_braces(given)):
        if is_url(pattern):
            paths.append(pattern)  # checked when read: an unreadable shard is one counted skip
        elif glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise ValueError(f"No webdataset shard matches {pattern!r}.")
            paths.extend(matches)
        elif os.path.isfile(pattern.removeprefix("file://")):
            paths.append(pattern.removeprefix("file://"))
        else:
            raise FileNotFoundError(f"Webdataset shard {pattern!r} does not exist.")
    if not paths:
        raise ValueError("`shards` is empty: expected .tar paths or a glob of them.")
    return paths


@contextlib.contextmanager
def _open_shard(shard: str):
    """A streaming `tarfile` over a local or remote (fsspec) shard."""
    if not is_url(shard):
        with tarfile.open(shard, mode="r|*") as tar:
            yield tar
        return
    import fsspec

    with fsspec.open(shard, "rb") as handle, tarfile.open(fileobj=handle, mode="r|*") as tar:
        yield tar


def _webdataset_entry(shard: str, key: str, members: dict[str, bytes]) -> dict:
    """One sample (the tar members sharing `key`) as an entry; no image -> an entry with its problem preset."""
    where = f"{shard}: sample {key!r}"
    extension = next((extension for extension in IMAGE_EXTENSIONS if extension in members), None)
    meta = {}
    if "json" in members:
        try:
            meta = json.loads(members["json"])
        except ValueError as error:
            raise ValueError(f"{shard}: member {key}.json is not valid JSON ({error}).") from None
    if "txt" in members:
        captions = members["txt"].decode("utf-8", errors="replace")
    else:
        captions = next((meta[name] for name in CAPTION_KEYS if name in meta), None) if isinstance(meta, dict) else None
    problem = None
    if extension is None:
        problem = f"missing_file\t{where}: no .{'/.'.join(IMAGE_EXTENSIONS)} member (has {sorted(members)})"
    image = {"bytes": members[extension], "path": f"{key}.{extension}"} if extension else None
    # the key names a sample within its shard only (shards written alike reuse keys): the id is the shard's and the key
    image_id = f"{posixpath.basename(shard)}/{key}"
    return {"image": image, "caption": caption_list(captions), "image_id": image_id, "_where": where,
            "_problem": problem}


def _webdataset_entries(shards: list[str]):
    """Entries of webdataset shards, read in order with `tarfile`; a shard that cannot be read is one skip."""
    for shard in shards:
        count = 0
        try:
            with _open_shard(shard) as tar:
                key, members = None, {}
                for member in tar:
                    directory, name = posixpath.split(member.name)
                    if not member.isfile() or "." not in name.lstrip("."):
                        continue
                    stem, extension = name.split(".", 1)
                    if posixpath.join(directory, stem) != key:
                        if key is not None:
                            count += 1
                            yield _webdataset_entry(shard, key, members)
                        key, members = posixpath.join(directory, stem), {}
                    members[extension.lower()] = tar.extractfile(member).read()
                if key is not None:
                    count += 1
                    yield _webdataset_entry(shard, key, members)
        except (tarfile.TarError, OSError, EOFError) as error:
            problem = f"corrupt_shard\t{shard}: unreadable after {count} samples ({type(error).__name__}: {error})"
            yield {"image": None, "caption": [], "image_id": "", "_where": shard, "_problem": problem}


def load_webdataset(
    shards: str | os.PathLike | Sequence[str | os.PathLike], streaming: bool = False, num_proc: int | None = None,
    cache_dir: str | None = None,
) -> tuple[Dataset | IterableDataset, LoadReport]:
    """
    Webdataset `.tar` shards (paths, globs, brace ranges such as `shard-{000..099}.tar`, or remote URLs read through
    fsspec), read with the standard library: members sharing a key (the path
    up to the first dot of the file name) form a sample; the image is the `.jpg`/`.jpeg`/`.png`/`.webp` member, the
    caption(s) the `.txt` member or the `caption`/`text` field of the `.json` member. `image_id` is
    `<shard file name>/<key>` (keys repeat across shards written alike).

    Images are kept as bytes. Non-streaming, the samples are written to the `datasets` cache (`cache_dir`), keyed by
    the shards' paths, sizes and modification times; with `streaming=True`, rows are read lazily, shard by shard.
    """
    from datasets import Dataset, IterableDataset
    from datasets.exceptions import DatasetGenerationError

    paths = _expand_shards(shards)
    report = LoadReport(os.path.basename(paths[0]) + (f" (+{len(paths) - 1} shards)" if len(paths) > 1 else ""))
    kwargs = dict(generator=_webdataset_entries, features=_entry_features(), gen_kwargs={"shards": paths})
    if streaming:
        entries = IterableDataset.from_generator(**kwargs)
    else:
        stats = [(path, None, None) if is_url(path) else (path, os.path.getsize(path), os.path.getmtime(path))
                 for path in paths]
        fingerprint = hashlib.sha256(json.dumps(["webdataset-v2", stats]).encode()).hexdigest()[:16]
        try:
            entries = Dataset.from_generator(**kwargs, cache_dir=cache_dir, fingerprint=fingerprint,
                                             num_proc=min(num_proc, len(paths)) if num_proc else None)
        except DatasetGenerationError as error:  # let our own "malformed metadata" error through unwrapped
            if isinstance(error.__cause__, ValueError):
                raise error.__cause__ from None
            raise
    return _to_pairs(entries, report, streaming, num_proc)
