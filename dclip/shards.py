"""
Teacher targets as a sharded, resumable job (`examples/compute_targets.py`).

The training rows are cut into contiguous shards of `shard_size` rows. Each process of an `accelerate launch` takes
every `num_processes`-th shard, encodes each *image* of it once and each caption once (a COCO image's five captions
share one vision-tower pass; adjacent rows of one image are found by their `image_id` column, else by their
stored image bytes), fuses
the pairs where the teacher is a DCLIP one, and writes one Parquet file per shard with a JSON sidecar (its settings
key, rows and SHA-256). A rerun skips every shard whose file matches its sidecar and the run's settings, so a killed
job recomputes only what it had not finished. The main process then writes `manifest.json`: the teacher, its
processor, the data, and each shard's rows and checksum. A failure in one process stops every process
(`together`). A student run reads the targets by sample id (`load_target_shards`), or by row key when it streams
(`dclip.streaming`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from .columns import CAPTION, IMAGE, IMAGE_ID, SAMPLE_ID, TEACHER_IMAGE_EMBEDS, TEACHER_TARGETS, TEACHER_TEXT_EMBEDS
from .folders import file_hash


logger = logging.getLogger(__name__)
MANIFEST = "manifest.json"
TARGET_DTYPES = ("float32", "float16")
SHARD_FORMAT = 2  # bumped when the files' layout changes (2: a `row_key` column where the data has `image_id`)
ROW_KEY = "row_key"


def launch_state():
    """accelerate's `PartialState` of this launch. Without GPUs it must be asked for the CPU backend: otherwise
    `accelerate launch --num_processes 2` on CPU gives each process a state of 1 process."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def image_keys(batch: dict) -> list[str]:
    """One key per row, equal for rows of the same image: the `image_id` column where the data has one, else a hash
    of the decoded pixels (mode, size and bytes)."""
    if IMAGE_ID in batch:
        return [str(key) for key in batch[IMAGE_ID]]
    keys = []
    for image in batch[IMAGE]:
        digest = hashlib.sha1(f"{image.mode}:{image.size}".encode())
        digest.update(image.tobytes())
        keys.append(digest.hexdigest())
    return keys


def stored_image_keys(dataset, start: int, stop: int) -> list[str] | None:
    """The image keys of rows `start:stop` without decoding them: `image_id`, else a hash of each stored image file
    (bytes, else path); None where the images are not stored as a `datasets.Image` column."""
    from datasets import Image

    if IMAGE_ID in dataset.column_names:
        return [str(key) for key in dataset.select_columns([IMAGE_ID])[start:stop][IMAGE_ID]]
    if not isinstance(dataset.features.get(IMAGE), Image):
        return None
    stored = dataset.select_columns([IMAGE]).cast_column(IMAGE, Image(decode=False))[start:stop][IMAGE]
    return [hashlib.sha1(item["bytes"]).hexdigest() if item.get("bytes") else f"path:{item.get('path')}"
            for item in stored]


def image_batches(start: int, stop: int, batch_size: int, keys: list[str] | None) -> list[tuple[int, int]]:
    """`(begin, end)` row ranges of about `batch_size` rows covering `start:stop`, each cut where the image changes
    (`keys` of the rows), so that adjacent rows of one image fall in one batch and are encoded once."""
    if keys is None:
        return [(begin, min(begin + batch_size, stop)) for begin in range(start, stop, batch_size)]
    batches, begin = [], start
    for row in range(start + 1, stop + 1):
        if row == stop or (row - begin >= batch_size and keys[row - start] != keys[row - start - 1]):
            batches.append((begin, row))
            begin = row
    return batches


@torch.no_grad()
def embed_rows(teacher, batch: dict, use_given_boxes: bool = True, use_given_spans: bool = True,
               keys: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The teacher's L2-normalised `(image_embeds, text_embeds)` of a batch of rows, with each distinct image
    through the vision side once (and a DCLIP teacher's fusion per pair), and the number of images encoded. Equal
    to `teacher.embed(teacher.inputs(batch))` up to float error. `keys`: the rows' image keys, if known
    (`image_keys`)."""
    from .teachers import FUSION, pooled_features

    keys = keys or image_keys(batch)
    # runs of adjacent rows with one key share an encoding; equal keys further apart are encoded again (a key that
    # is not unique across the data, such as a webdataset member name reused by another shard, merges nothing)
    starts = np.array([row == 0 or key != keys[row - 1] for row, key in enumerate(keys)])
    unique = np.flatnonzero(starts).tolist()
    index = torch.from_numpy(np.cumsum(starts) - 1)
    images = [batch[IMAGE][row] for row in unique]
    model, device = teacher.model, teacher.device
    if teacher.kind == FUSION:
        processor = teacher.processor
        boxes = [batch["boxes"][row] for row in unique] if use_given_boxes and "boxes" in batch else None
        spans = batch["spans"] if use_given_spans and "spans" in batch else None
        image_inputs = processor(images=images, return_regions=True, region_boxes=boxes)
        text_inputs = processor(text=list(batch[CAPTION]), return_spans=True, spans=spans)
        image_side = model.encode_image_side(*(image_inputs[name].to(device) for name in (
            "pixel_values", "region_pixel_values", "region_boxes", "region_mask")))
        text_side = model.encode_text_side(*(text_inputs[name].to(device) for name in (
            "input_ids", "attention_mask", "span_input_ids", "span_attention_mask", "span_mask")))
        image, text = model.fuse(image_side, text_side, image_index=index.to(device))
        return image, text, len(unique)
    image = pooled_features(model.get_image_features(pixel_values=teacher.pixels(images).to(device)))
    text = pooled_features(model.get_text_features(**{k: v.to(device) for k, v in
                                                      teacher.tokenize(batch[CAPTION]).items()}))
    normalize = torch.nn.functional.normalize
    return normalize(image, dim=-1)[index.to(device)], normalize(text, dim=-1), len(unique)


def plan_shards(num_rows: int, shard_size: int) -> list[tuple[int, int]]:
    """`(start, stop)` row ranges of the shards."""
    if shard_size < 1:
        raise ValueError(f"--shard_size must be at least 1, got {shard_size}")
    return [(start, min(start + shard_size, num_rows)) for start in range(0, num_rows, shard_size)]


def shard_name(number: int) -> str:
    return f"targets-{number:05d}.parquet"


def target_settings(dataset, teacher, shard_size: int, dtype: str, use_given_boxes: bool = True,
                    use_given_spans: bool = True) -> dict:
    """What the targets depend on: the teacher (kind and weights), its processor, the data, the region settings,
    the shard size and the stored dtype. Shards written under other settings are recomputed."""
    from .targets import _processor_key, model_fingerprint
    from .teachers import FUSION

    if dtype not in TARGET_DTYPES:
        raise ValueError(f"--targets_dtype must be one of {TARGET_DTYPES}, got {dtype!r}")
    fusion = teacher.kind == FUSION
    return {
        "format": SHARD_FORMAT,
        "teacher": teacher.name,
        "teacher_kind": teacher.kind,
        "teacher_fingerprint": model_fingerprint(teacher.model),
        "processor": _processor_key(teacher.processor),
        "data_fingerprint": dataset._fingerprint,
        "rows": len(dataset),
        "use_given_boxes": use_given_boxes and fusion,
        "use_given_spans": use_given_spans and fusion,
        "shard_size": shard_size,
        "dtype": dtype,
    }


def settings_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    return file_hash(path).hexdigest()


def shard_is_complete(output_dir: Path, number: int, key: str, start: int, stop: int) -> bool:
    """Whether shard `number` was written in full under settings `key`: its sidecar names that key and range, and
    the file's checksum matches the sidecar's."""
    path = output_dir / shard_name(number)
    sidecar = path.with_suffix(".json")
    if not (path.is_file() and sidecar.is_file()):
        return False
    try:
        record = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        logger.warning("teacher targets: %s is unreadable: shard %d is computed again", sidecar, number)
        return False
    if record.get("key") != key or record.get("start") != start or record.get("stop") != stop:
        return False  # written under other settings: computed again, as the caller was told
    if record.get("sha256") != file_sha256(path):
        logger.warning("teacher targets: %s does not match its checksum (truncated or corrupt): computed again", path)
        return False
    return True


def row_keys(batch: dict) -> np.ndarray | None:
    """A 64-bit key per row from its `image_id` and caption (rows that share both share their targets too), by which
    a streamed row finds its targets; None where the data has no `image_id`."""
    if IMAGE_ID not in batch:
        return None
    digests = (hashlib.sha1(f"{image_id}\n{caption}".encode()).digest()[:8]
               for image_id, caption in zip(batch[IMAGE_ID], batch[CAPTION]))
    return np.frombuffer(b"".join(digests), dtype=np.uint64).copy()


def _write_shard(output_dir: Path, number: int, key: str, start: int, stop: int, ids: np.ndarray,
                 image: np.ndarray, text: np.ndarray, keys: np.ndarray | None = None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    def vectors(array: np.ndarray) -> pa.Array:
        return pa.FixedSizeListArray.from_arrays(pa.array(array.reshape(-1)), array.shape[1])

    columns = {SAMPLE_ID: pa.array(ids, pa.int64()), TEACHER_IMAGE_EMBEDS: vectors(image),
               TEACHER_TEXT_EMBEDS: vectors(text)}
    if keys is not None:
        columns[ROW_KEY] = pa.array(keys, pa.uint64())
    table = pa.table(columns)
    path = output_dir / shard_name(number)
    partial = path.with_name(path.name + f".partial-{os.getpid()}")
    pq.write_table(table, partial)
    os.replace(partial, path)  # a killed job leaves no half-written shard under the real name
    record = {"key": key, "start": start, "stop": stop, "rows": stop - start, "sha256": file_sha256(path)}
    partial = path.with_name(path.name + f".json.partial-{os.getpid()}")
    partial.write_text(json.dumps(record, indent=1))
    os.replace(partial, path.with_suffix(".json"))


def compute_target_shards(dataset, teacher, output_dir: str | os.PathLike, shard_size: int = 4096,
                          batch_size: int = 256, dtype: str = "float32", process_index: int | None = None,
                          num_processes: int | None = None, use_given_boxes: bool = True,
                          use_given_spans: bool = True, settings: dict | None = None) -> dict:
    """
    This process's shards of `dataset`'s teacher targets (`teacher`: a `dclip.teachers.Teacher`), written under
    `output_dir`; shards already complete under the same settings are skipped. `process_index` / `num_processes`
    default to accelerate's `PartialState`. Returns counts: `computed`, `skipped` (shards), `rows`, `images_encoded`.
    Call `write_manifest` once every process is done. `settings`: `target_settings` of these arguments, where the
    caller has them (they hash the teacher's weights).
    """
    if process_index is None or num_processes is None:
        state = launch_state()
        process_index, num_processes = state.process_index, state.num_processes
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    settings = settings or target_settings(dataset, teacher, shard_size, dtype, use_given_boxes, use_given_spans)
    key = settings_key(settings)
    storage = np.float16 if dtype == "float16" else np.float32
    stats = {"computed": 0, "skipped": 0, "rows": 0, "images_encoded": 0}
    for number, (start, stop) in enumerate(plan_shards(len(dataset), shard_size)):
        if number % num_processes != process_index:
            continue
        if shard_is_complete(output_dir, number, key, start, stop):
            stats["skipped"] += 1
            continue
        images, texts = [], []
        keys = stored_image_keys(dataset, start, stop)
        for begin, end in image_batches(start, stop, batch_size, keys):
            image, text, encoded = embed_rows(teacher, dataset[begin:end], settings["use_given_boxes"],
                                              settings["use_given_spans"],
                                              keys=keys[begin - start:end - start] if keys else None)
            images.append(image.float().cpu().numpy().astype(storage))
            texts.append(text.float().cpu().numpy().astype(storage))
            stats["images_encoded"] += encoded
        identities = (row_keys(dataset.select_columns([IMAGE_ID, CAPTION])[start:stop])
                      if IMAGE_ID in dataset.column_names else None)
        _write_shard(output_dir, number, key, start, stop, np.arange(start, stop), np.concatenate(images),
                     np.concatenate(texts), identities)
        stats["computed"] += 1
        stats["rows"] += stop - start
        logger.info("teacher targets: shard %d (rows %d-%d) written by process %d", number, start, stop,
                    process_index)
    return stats


def write_manifest(dataset, teacher, output_dir: str | os.PathLike, shard_size: int = 4096, dtype: str = "float32",
                   use_given_boxes: bool = True, use_given_spans: bool = True, settings: dict | None = None) -> Path:
    """`manifest.json` for complete shards (main process, after every process's `compute_target_shards`): the
    settings (`settings`, else `target_settings` of these arguments) and each shard's file, rows and checksum.
    Raises naming the shards that are missing or corrupt."""
    output_dir = Path(output_dir)
    settings = settings or target_settings(dataset, teacher, shard_size, dtype, use_given_boxes, use_given_spans)
    key = settings_key(settings)
    shards, missing = [], []
    for number, (start, stop) in enumerate(plan_shards(len(dataset), shard_size)):
        if not shard_is_complete(output_dir, number, key, start, stop):
            missing.append(shard_name(number))
            continue
        record = json.loads((output_dir / shard_name(number)).with_suffix(".json").read_text())
        shards.append({"file": shard_name(number), "start": start, "stop": stop, "sha256": record["sha256"]})
    if missing:
        raise RuntimeError(f"{output_dir}: {len(missing)} shard(s) missing or incomplete ({', '.join(missing[:5])}"
                           f"{', ...' if len(missing) > 5 else ''}): rerun the job to compute them")
    path = output_dir / MANIFEST
    path.write_text(json.dumps({"settings": settings, "key": key, "shards": shards}, indent=1))
    return path


def read_manifest(targets_dir: str | os.PathLike) -> dict:
    path = Path(targets_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest; compute the targets first "
                                "(`accelerate launch examples/compute_targets.py ...`)")
    return json.loads(path.read_text())


def made_by(targets_dir: str | os.PathLike, teacher) -> bool:
    """Whether the targets under `targets_dir` come from `teacher`'s weights."""
    from .targets import model_fingerprint

    return read_manifest(targets_dir)["settings"]["teacher_fingerprint"] == model_fingerprint(teacher.model)


def load_target_shards(targets_dir: str | os.PathLike, dataset=None, teacher=None, verify: bool = True,
                       use_given_boxes: bool | None = None, use_given_spans: bool | None = None):
    """
    The targets under `targets_dir` as a `datasets.Dataset` (`sample_id`, `teacher_image_embeds`,
    `teacher_text_embeds`, as float32), each shard's checksum verified against the manifest. With `dataset`, that
    data with the targets joined by sample id (its row positions); it must be the data the targets were computed on
    (same rows and fingerprint), with `teacher` the same teacher weights and processor, and with `use_given_*` the
    same region settings (where the teacher is a DCLIP one).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset, concatenate_datasets

    from .teachers import FUSION

    targets_dir = Path(targets_dir)
    manifest = read_manifest(targets_dir)
    settings = manifest["settings"]
    files = [targets_dir / shard["file"] for shard in manifest["shards"]]
    if verify:
        for shard, path in zip(manifest["shards"], files):
            if not path.is_file() or file_sha256(path) != shard["sha256"]:
                raise ValueError(f"{path}: missing, or its checksum differs from {targets_dir / MANIFEST}'s: rerun "
                                 "the targets job to recompute it")
    if dataset is not None and (len(dataset), dataset._fingerprint) != (settings["rows"],
                                                                        settings["data_fingerprint"]):
        raise ValueError(f"{targets_dir}: these targets were computed on other data ({settings['rows']} rows, "
                         f"fingerprint {settings['data_fingerprint']}), not on this training split "
                         f"({len(dataset)} rows, fingerprint {dataset._fingerprint})")
    if teacher is not None and not made_by(targets_dir, teacher):
        raise ValueError(f"{targets_dir}: these targets come from other teacher weights than {teacher.name}'s")
    if teacher is not None:
        from .targets import _processor_key

        if _processor_key(teacher.processor) != settings["processor"]:
            raise ValueError(f"{targets_dir}: these targets were computed with another processor than "
                             f"{teacher.name}'s (image size, normalisation or tokenizer)")
    fusion = settings["teacher_kind"] == FUSION
    for name, value in (("use_given_boxes", use_given_boxes), ("use_given_spans", use_given_spans)):
        if value is not None and fusion and bool(value) != settings[name]:
            raise ValueError(f"{targets_dir}: computed with {name}={settings[name]}, this run asks for {bool(value)} "
                             "(--use_annotated_regions): recompute them with the run's setting")
    if not files:
        raise ValueError(f"{targets_dir}: the manifest lists no shards (targets of an empty data set)")
    table = pa.concat_tables([pq.read_table(path, columns=[SAMPLE_ID, *TEACHER_TARGETS]) for path in files])
    ids = table[SAMPLE_ID].to_numpy()
    if not np.array_equal(ids, np.arange(settings["rows"])):
        raise ValueError(f"{targets_dir}: the shards' sample ids do not cover rows 0..{settings['rows'] - 1} in order")
    width = {name: table.schema.field(name).type.list_size for name in TEACHER_TARGETS}
    schema = pa.schema([(SAMPLE_ID, pa.int64()),
                        *((name, pa.list_(pa.float32(), width[name])) for name in TEACHER_TARGETS)])
    targets = Dataset(table.select(schema.names).cast(schema))  # float16 shards are read as float32
    if dataset is None:
        return targets
    return concatenate_datasets([dataset, targets.remove_columns(SAMPLE_ID)], axis=1)


def together(step, *args, **kwargs):
    """Run `step` in every process of a distributed run and agree on the outcome: if it raised in any process, it
    raises in all (the others with a pointer to the one that failed) instead of leaving them at a barrier until the
    collective timeout. Doubles as the barrier after `step`."""
    import torch.distributed as dist

    result, error = None, None
    try:
        result = step(*args, **kwargs)
    except Exception as caught:  # noqa: BLE001 (re-raised below, in every process)
        error = caught
    if dist.is_available() and dist.is_initialized():
        failed = [None] * dist.get_world_size()
        dist.all_gather_object(failed, error is not None)
        if any(failed) and error is None:
            raise RuntimeError(f"process {failed.index(True)} failed (see its log); this one stops with it")
    if error is not None:
        raise error
    return result


def targets_in_processes(dataset, teacher, root: str | os.PathLike, process_index: int, num_processes: int,
                         use_given_boxes: bool = True, use_given_spans: bool = True, shard_size: int = 4096):
    """`dataset` with `teacher`'s targets joined, computed by every process of a run on its share of the shards
    (under `root/<settings key>`, so a rerun or resumed run reuses them) rather than by the main process while the
    others wait; a failure in any process stops all of them (`together`)."""
    options = dict(shard_size=shard_size, use_given_boxes=use_given_boxes, use_given_spans=use_given_spans)
    settings = target_settings(dataset, teacher, dtype="float32", **options)  # the teacher's weights hashed once
    folder = Path(root) / settings_key(settings)
    together(compute_target_shards, dataset, teacher, folder, process_index=process_index,
             num_processes=num_processes, settings=settings, **options)
    together(lambda: write_manifest(dataset, teacher, folder, settings=settings, **options)
             if process_index == 0 else None)
    # the folder is named by these very settings (teacher, processor, regions): only the data is checked on reading
    return load_target_shards(folder, dataset)
