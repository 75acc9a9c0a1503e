"""
Streamed training with precomputed teacher targets: a `datasets.IterableDataset` of the training split (`--streaming`)
finds each row's targets among `examples/compute_targets.py`'s shards by a key of its `image_id` and caption
(`dclip.shards.row_keys`), so the stream may be split by node or resumed mid-way without counting rows.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .columns import CAPTION, IMAGE_ID, TEACHER_TARGETS
from .shards import ROW_KEY, file_sha256, read_manifest, row_keys


class TargetLookup:
    """
    The targets under `targets_dir` by row key (`row_keys`), for a streamed training split: the keys of every shard
    are held in memory (16 bytes a row), the vectors read a shard at a time and kept for the last `cache_shards`
    shards (a stream in the data's order reads each shard once). Checksums are verified as each shard is read.
    """

    def __init__(self, targets_dir: str | os.PathLike, cache_shards: int = 4):
        import pyarrow.parquet as pq

        self.targets_dir = Path(targets_dir)
        self.manifest = read_manifest(targets_dir)
        self.cache_shards, self._cache = cache_shards, {}
        keys = []
        for shard in self.manifest["shards"]:
            schema = pq.read_schema(self.targets_dir / shard["file"])
            if ROW_KEY not in schema.names:
                raise ValueError(f"{self.targets_dir / shard['file']}: no `{ROW_KEY}` column, so streamed rows cannot "
                                 "find their targets: compute them on data with an `image_id` column (every loader "
                                 "of dclip.data.loaders gives one)")
            keys.append(pq.read_table(self.targets_dir / shard["file"], columns=[ROW_KEY])[ROW_KEY].to_numpy())
        keys = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
        self._order = np.argsort(keys, kind="stable")
        self._sorted = keys[self._order]
        self._starts = np.array([shard["start"] for shard in self.manifest["shards"]], dtype=np.int64)

    def _shard(self, number: int) -> dict[str, np.ndarray]:
        import pyarrow.parquet as pq

        if number not in self._cache:
            shard = self.manifest["shards"][number]
            path = self.targets_dir / shard["file"]
            if file_sha256(path) != shard["sha256"]:
                raise ValueError(f"{path}: its checksum differs from the manifest's: rerun the targets job")
            table = pq.read_table(path, columns=list(TEACHER_TARGETS))
            self._cache[number] = {name: np.stack(table[name].to_numpy(zero_copy_only=False)).astype(np.float32)
                                   for name in TEACHER_TARGETS}
            while len(self._cache) > self.cache_shards:
                self._cache.pop(next(iter(self._cache)))
        return self._cache[number]

    def __call__(self, batch: dict) -> dict[str, np.ndarray]:
        """The batch's targets, `{teacher_image_embeds, teacher_text_embeds}`, each `(rows, dim)` float32."""
        keys = row_keys(batch)
        if keys is None:
            raise ValueError("streamed rows need an `image_id` column to find their targets")
        found = np.searchsorted(self._sorted, keys)
        found = np.minimum(found, len(self._sorted) - 1)
        missing = np.flatnonzero(self._sorted[found] != keys) if len(self._sorted) else np.arange(len(keys))
        if len(missing):
            row = int(missing[0])
            raise KeyError(f"{self.targets_dir}: no targets for the streamed row with image_id "
                           f"{batch[IMAGE_ID][row]!r} and caption {batch[CAPTION][row]!r}: the targets were computed "
                           "on other data")
        positions = self._order[found]
        numbers = np.searchsorted(self._starts, positions, side="right") - 1
        rows = {name: [] for name in TEACHER_TARGETS}
        for position, number in zip(positions, numbers):
            shard = self._shard(int(number))
            for name in TEACHER_TARGETS:
                rows[name].append(shard[name][position - self._starts[number]])
        return {name: np.stack(vectors) if vectors else np.zeros((0, 0), np.float32)
                for name, vectors in rows.items()}


def _attach_targets(batch: dict, lookup: TargetLookup) -> dict:
    return {**batch, **{name: list(vectors) for name, vectors in lookup(batch).items()}}


def with_streamed_targets(stream, targets_dir: str | os.PathLike):
    """A streamed training split (`datasets.IterableDataset`) with each row's teacher targets joined by its key."""
    return stream.map(_attach_targets, batched=True, batch_size=256, fn_kwargs={"lookup": TargetLookup(targets_dir)})


def streamed_train(context, teacher, method: str):
    """`--streaming`: the run's (`context`, a `dclip.stages.RunContext`) streamed training split, with `teacher`'s
    targets from `--teacher_targets` joined by row key, when it has a teacher that is not run online. accelerate
    splits it by process when the Trainer prepares its data loader (`IterableDataset.shard`: whole shards where there
    are at least as many as processes, else every process takes its slice of each batch); it must not be split
    here as well (each process would then read a quarter of it with 2 processes)."""
    from .shards import made_by

    train = context.data["train"]
    if teacher is None:
        return train
    if not made_by(context.args.teacher_targets, teacher):
        raise ValueError(f"--teacher_targets {context.args.teacher_targets}: not made by the {method} student's "
                         f"teacher ({teacher.name}); a streamed run computes no targets of its own")
    return with_streamed_targets(train, context.args.teacher_targets)
