"""Each loader on a tiny sample written in its real format: good images with several captions, a missing image, a
truncated image and an empty caption; the exact rows kept, the skips counted, named in the report and logged."""

import hashlib
import io
import json
import logging
import tarfile

import numpy as np
import pytest
from PIL import Image

from dclip.data.loaders import (
    FORMATS,
    LoadReport,
    caption_list,
    check_image,
    infer_format,
    load_caption_dataset,
    load_cc_tsv,
    load_coco_karpathy,
    load_flickr30k,
    load_hub_dataset,
    load_imagefolder,
    load_webdataset,
)


LOGGER = "dclip.data.loaders"


def noise_image(size=(8, 8), seed=0):
    """Noise, so that cutting the encoded file in half leaves it undecodable."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def write_image(path, size=(8, 8), seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    noise_image(size, seed).save(path)
    return path


def image_bytes(size=(8, 8), seed=0, format="JPEG"):
    buffer = io.BytesIO()
    noise_image(size, seed).save(buffer, format=format)
    return buffer.getvalue()


def cut(data: bytes) -> bytes:
    """The first 80%: the header still opens, decoding the pixels fails (checked in `test_shared_helpers`)."""
    return data[: len(data) * 4 // 5]


def truncate(path):
    path.write_bytes(cut(path.read_bytes()))
    return path


def rows(dataset):
    return [(row["image_id"], row["caption"]) for row in dataset]


def assert_skips(report, caplog, expected: dict, names: list[str]):
    assert report.skipped == expected
    for name in names:
        assert any(name in example for example in report.examples), (name, report.examples)
        assert name in caplog.text, name


# ---------------------------------------------------------------------------------------------------------------------


def test_shared_helpers(tmp_path):
    assert caption_list(" a dog ") == ["a dog"]
    assert caption_list(["a", {"raw": " b "}, {"text": "c"}, None]) == ["a", "b", "c", ""]
    assert caption_list([]) == [""] and caption_list(None) == [""]
    good = write_image(tmp_path / "good.png", (8, 6))
    assert check_image(str(good)) == (None, "", (8, 6))
    assert check_image({"path": None, "bytes": good.read_bytes()})[2] == (8, 6)
    assert check_image(str(tmp_path / "nope.png"))[0] == "missing_file"
    for name in ("bad.jpg", "bad.png"):
        truncated = truncate(write_image(tmp_path / name, (32, 32)))
        with Image.open(truncated) as opened:  # opening reads the header only...
            assert opened.size == (32, 32)
        reason, message, size = check_image(str(truncated))  # ...decoding catches the truncation
        assert (reason, size) == ("corrupt_image", None) and "truncated" in message
    assert check_image({"path": "x.png", "bytes": b"not an image"})[0] == "corrupt_image"


@pytest.fixture
def coco(tmp_path):
    root = tmp_path / "coco"
    write_image(root / "val2014" / "a.jpg", (8, 6), seed=1)
    write_image(root / "train2014" / "b.png", (10, 8), seed=2)
    truncate(write_image(root / "val2014" / "d.jpg", (32, 32), seed=3))
    write_image(root / "val2014" / "e.jpg", (8, 8), seed=4)
    write_image(root / "f.png", (6, 6), seed=5)
    images = [
        {"filepath": "val2014", "filename": "a.jpg", "split": "train", "cocoid": 11,
         "sentences": [{"raw": "A man rides a horse."}, {"raw": " A horse and a man. "}]},
        {"filepath": "train2014", "filename": "b.png", "split": "restval", "cocoid": 12,
         "sentences": [{"raw": "Two cats."}, {"raw": "   "}]},
        {"filepath": "val2014", "filename": "c.jpg", "split": "train", "cocoid": 13, "sentences": [{"raw": "Gone."}]},
        {"filepath": "val2014", "filename": "d.jpg", "split": "train", "cocoid": 14, "sentences": [{"raw": "Cut."}]},
        {"filepath": "val2014", "filename": "e.jpg", "split": "val", "cocoid": 15, "sentences": [{"raw": "A val."}]},
        {"filename": "f.png", "split": "test", "cocoid": 16, "sentences": [{"raw": "A test."}]},
    ]
    path = root / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path


def test_coco_karpathy(coco, caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        train, report = load_coco_karpathy(coco, coco.parent)
    assert rows(train) == [("11", "A man rides a horse."), ("11", "A horse and a man."), ("12", "Two cats.")]
    assert (report.num_rows, report.num_images) == (3, 2)
    assert_skips(report, caplog, {"missing_file": 1, "corrupt_image": 1, "empty_caption": 1},
                 ["c.jpg", "d.jpg", "images[2]", "images[3]", "images[1], caption 1"])
    assert train[0]["image"].size == (8, 6) and train[2]["image"].size == (10, 8)
    assert isinstance(train[0]["image"], Image.Image)

    no_restval, _ = load_coco_karpathy(coco, coco.parent, include_restval=False)
    assert rows(no_restval) == rows(train)[:2]
    val, report = load_coco_karpathy(coco, split="val")  # image_root defaults to the JSON's folder
    assert rows(val) == [("15", "A val.")] and report.skipped == {}
    test, _ = load_coco_karpathy(coco, split="test")  # no filepath: image_root/filename
    assert rows(test) == [("16", "A test.")] and test[0]["image"].size == (6, 6)
    everything, report = load_coco_karpathy(coco, split=None)
    assert [image_id for image_id, _ in rows(everything)] == ["11", "11", "12", "15", "16"]
    assert report.num_skipped == 3
    with pytest.raises(ValueError, match="`split` must be one of"):
        load_coco_karpathy(coco, split="dev")


def test_coco_karpathy_streaming(coco, caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        stream, report = load_coco_karpathy(coco, streaming=True)
        assert report.num_rows == 0 and report.skipped == {}  # nothing checked before iteration
        streamed = list(stream)
    assert [(r["image_id"], r["caption"]) for r in streamed] == [
        ("11", "A man rides a horse."), ("11", "A horse and a man."), ("12", "Two cats.")]
    assert streamed[1]["image"].size == (8, 6)
    assert (report.num_rows, report.num_images) == (3, 2)
    assert_skips(report, caplog, {"missing_file": 1, "corrupt_image": 1, "empty_caption": 1}, ["c.jpg", "d.jpg"])


def test_karpathy_malformed(tmp_path):
    path = tmp_path / "dataset_coco.json"
    path.write_text('{"images": [\n{"filename": "a.jpg", "split": "train",}\n]}')
    with pytest.raises(ValueError, match=r"dataset_coco.json line 2, column \d+: invalid JSON"):
        load_coco_karpathy(path)
    path.write_text(json.dumps({"images": [{"filename": "a.jpg", "split": "train"}]}))
    with pytest.raises(ValueError, match=r"images\[0\]: expected an object with keys .*'sentences'"):
        load_coco_karpathy(path)
    path.write_text(json.dumps({"annotations": []}))
    with pytest.raises(ValueError, match="'images' list"):
        load_coco_karpathy(path)


def test_flickr30k_karpathy_json(tmp_path):
    write_image(tmp_path / "img" / "100.jpg", (8, 8), seed=1)
    write_image(tmp_path / "img" / "200.jpg", (8, 8), seed=2)
    images = [
        {"imgid": 0, "filename": "100.jpg", "split": "train", "sentences": [{"raw": "One."}, {"raw": "Two."}]},
        {"imgid": 1, "filename": "200.jpg", "split": "test", "sentences": [{"raw": "Three."}]},
        {"imgid": 2, "filename": "300.jpg", "split": "train", "sentences": [{"raw": "Missing."}]},
    ]
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    train, report = load_flickr30k(path, tmp_path / "img")
    assert rows(train) == [("100.jpg", "One."), ("100.jpg", "Two.")]
    assert report.skipped == {"missing_file": 1} and "300.jpg" in report.examples[0]
    test, _ = load_flickr30k(path, tmp_path / "img", split="test")
    assert rows(test) == [("200.jpg", "Three.")]


@pytest.fixture
def flickr_csv(tmp_path):
    root = tmp_path / "flickr30k_images"
    write_image(root / "1000.jpg", (8, 6), seed=1)
    write_image(root / "2000.jpg", (12, 8), seed=2)
    truncate(write_image(root / "4000.jpg", (32, 32), seed=3))
    lines = [
        "image_name| comment_number| comment",
        "1000.jpg| 0| Two young guys with shaggy hair .",
        "1000.jpg| 1| Two friends in a yard .",
        "1000.jpg| 2|  ",
        "2000.jpg| 0| A dog runs across the grass .",
        "2000.jpg| 1 A dog on grass .",  # the public file has one row missing its second "|"
        "3000.jpg| 0| A missing photo .",
        "4000.jpg| 0| A cut photo .",
    ]
    path = tmp_path / "results.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("streaming", [False, True])
def test_flickr30k_results_csv(flickr_csv, caplog, streaming):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        dataset, report = load_flickr30k(flickr_csv, flickr_csv.parent / "flickr30k_images", split=None,
                                         streaming=streaming)
        found = list(dataset)
    assert [(r["image_id"], r["caption"]) for r in found] == [
        ("1000.jpg", "Two young guys with shaggy hair ."), ("1000.jpg", "Two friends in a yard ."),
        ("2000.jpg", "A dog runs across the grass ."), ("2000.jpg", "A dog on grass ."),
    ]
    assert [r["image"].size for r in found] == [(8, 6), (8, 6), (12, 8), (12, 8)]
    assert (report.num_rows, report.num_images) == (4, 2)
    assert_skips(report, caplog, {"missing_file": 1, "corrupt_image": 1, "empty_caption": 1},
                 ["3000.jpg", "4000.jpg", "results.csv line 7", "results.csv lines 2-4, caption 2"])


def test_flickr30k_csv_errors(flickr_csv):
    with pytest.raises(ValueError, match="single split"):
        load_flickr30k(flickr_csv, split="test")
    flickr_csv.write_text("image_name| comment_number| comment\n1000.jpg| 0| ok\nbroken line\n")
    with pytest.raises(
        ValueError, match=r"results.csv line 3: expected 'image_name\| comment_number\| comment' fields"
    ):
        load_flickr30k(flickr_csv, split=None)
    flickr_csv.write_text("name,caption\n")
    with pytest.raises(ValueError, match="results.csv line 1: expected the header"):
        load_flickr30k(flickr_csv, split=None)


def test_cc_tsv(tmp_path, caplog):
    write_image(tmp_path / "images" / "0.jpg", (8, 6), seed=1)
    absolute = write_image(tmp_path / "elsewhere" / "1.png", (10, 8), seed=2)
    truncate(write_image(tmp_path / "images" / "3.jpg", (32, 32), seed=3))
    lines = [
        "a red car\timages/0.jpg", f"a blue sky\t{absolute}", "gone\timages/2.jpg", "cut\timages/3.jpg",
        "\timages/0.jpg", "the same red car\timages/0.jpg",
    ]
    tsv = tmp_path / "cc.tsv"
    tsv.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        dataset, report = load_cc_tsv(tsv)
    assert rows(dataset) == [("images/0.jpg", "a red car"), (str(absolute), "a blue sky"),
                             ("images/0.jpg", "the same red car")]
    assert [dataset[i]["image"].size for i in range(3)] == [(8, 6), (10, 8), (8, 6)]
    assert (report.num_rows, report.num_images) == (3, 2)
    assert_skips(report, caplog, {"missing_file": 1, "corrupt_image": 1, "empty_caption": 1},
                 ["2.jpg", "3.jpg", "cc.tsv line 3", "cc.tsv line 4", "cc.tsv line 5, caption 0"])

    # header mode, named columns in another order, paths against image_root
    named = tmp_path / "meta" / "named.tsv"
    named.parent.mkdir()
    named.write_text("url\tfilepath\ttitle\nhttp://x\t0.jpg\tfrom a header\nhttp://y\t2.jpg\tmissing\n")
    dataset, report = load_cc_tsv(named, tmp_path / "images", caption_column="title", path_column="filepath")
    assert rows(dataset) == [("0.jpg", "from a header")] and report.skipped == {"missing_file": 1}

    stream, report = load_cc_tsv(tsv, streaming=True)
    assert rows(stream) == rows(load_cc_tsv(tsv)[0]) and report.num_skipped == 3

    with pytest.raises(ValueError, match=r"named.tsv line 1: no column 'caption' \(`caption_column`\)"):
        load_cc_tsv(named, caption_column="caption", path_column="filepath")
    tsv.write_text("ok\timages/0.jpg\nno tab here\n")
    with pytest.raises(ValueError, match="cc.tsv line 2: expected at least 2 tab-separated fields, got 1"):
        load_cc_tsv(tsv)


@pytest.fixture
def imagefolder(tmp_path):
    root = tmp_path / "folder"
    write_image(root / "train" / "a.png", (8, 6), seed=1)
    write_image(root / "train" / "sub" / "b.jpg", (20, 10), seed=2)
    truncate(write_image(root / "train" / "d.jpg", (32, 32), seed=3))
    write_image(root / "test" / "t.png", (8, 8), seed=4)
    train = [
        {"file_name": "a.png", "caption": ["first of a", "second of a", ""], "spans": ["a"]},
        {"file_name": "sub/b.jpg", "text": "only b", "boxes": [[0, 0, 10, 5], [2, 2, 20, 10]]},
        {"file_name": "c.png", "caption": "missing c"},
        {"file_name": "d.jpg", "caption": "cut d"},
    ]
    (root / "train" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (root / "test" / "metadata.jsonl").write_text(json.dumps({"file_name": "t.png", "caption": "test t"}) + "\n")
    return root


def test_imagefolder(imagefolder, caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        train, report = load_imagefolder(imagefolder)
    assert rows(train) == [("a.png", "first of a"), ("a.png", "second of a"), ("sub/b.jpg", "only b")]
    assert train[0]["image"].size == (8, 6) and train[2]["image"].size == (20, 10)
    assert train[2]["boxes"] == [[0.0, 0.0, 0.5, 0.5], pytest.approx([0.1, 0.2, 1.0, 1.0])]  # pixels -> [0, 1]
    assert train[0]["boxes"] == [] and train[0]["spans"] == ["a"] and train[2]["spans"] == []
    assert (report.num_rows, report.num_images) == (3, 2)
    assert_skips(report, caplog, {"missing_file": 1, "corrupt_image": 1, "empty_caption": 1},
                 ["c.png", "d.jpg", "metadata.jsonl line 3", "metadata.jsonl line 1, caption 2"])

    test, report = load_imagefolder(imagefolder, split="test")
    assert rows(test) == [("t.png", "test t")] and "boxes" not in test.column_names and report.skipped == {}
    stream, report = load_imagefolder(imagefolder, streaming=True)
    assert rows(stream) == rows(train) and report.skipped == {"missing_file": 1, "corrupt_image": 1, "empty_caption": 1}

    with pytest.raises(ValueError, match=r"no metadata.jsonl for split 'validation'.*\['test', 'train'\]"):
        load_imagefolder(imagefolder, split="validation")
    metadata = imagefolder / "test" / "metadata.jsonl"
    metadata.write_text('{"file_name": "t.png", "caption": "ok"}\n{"file_name": "t.png", caption}\n')
    with pytest.raises(ValueError, match="metadata.jsonl line 2: invalid JSON"):
        load_imagefolder(imagefolder, split="test")
    metadata.write_text('{"file_name": "t.png", "title": "no caption key"}\n')
    expected = "metadata.jsonl line 1: expected an object with 'file_name' and 'caption' or 'text'"
    with pytest.raises(ValueError, match=expected):
        load_imagefolder(imagefolder, split="test")


def write_shard(path, samples):
    with tarfile.open(path, "w") as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def shards(tmp_path):
    good = image_bytes((8, 6), seed=1)
    truncated = cut(image_bytes((32, 32), seed=3))
    write_shard(tmp_path / "shard-000.tar", [
        ("000.jpg", good), ("000.txt", b"a caption from txt"),
        ("001.png", image_bytes((10, 8), seed=2, format="PNG")),
        ("001.json", json.dumps({"caption": ["json one", "json two"], "id": 1}).encode()),
        ("002.jpg", truncated), ("002.txt", b"cut"),
        ("003.txt", b"no image"),
        ("004.jpg", good), ("004.json", json.dumps({"url": "no caption"}).encode()),
    ])
    write_shard(tmp_path / "shard-001.tar", [("dir/005.jpeg", good), ("dir/005.json", b'{"text": "in a folder"}')])
    return tmp_path


EXPECTED_WDS_ROWS = [("shard-000.tar/000", "a caption from txt"), ("shard-000.tar/001", "json one"),
                     ("shard-000.tar/001", "json two"), ("shard-001.tar/dir/005", "in a folder")]


def test_webdataset(shards, caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        dataset, report = load_webdataset(str(shards / "shard-*.tar"), cache_dir=str(shards / "cache"))
    assert rows(dataset) == EXPECTED_WDS_ROWS
    assert [row["image"].size for row in dataset] == [(8, 6), (10, 8), (10, 8), (8, 6)]
    assert (report.num_rows, report.num_images) == (4, 3)
    assert_skips(report, caplog, {"missing_file": 1, "corrupt_image": 1, "empty_caption": 1},
                 ["shard-000.tar: sample '002'", "shard-000.tar: sample '003'", "sample '004', caption 0"])
    again, report = load_webdataset(
        [shards / "shard-000.tar", shards / "shard-001.tar"], cache_dir=str(shards / "cache")
    )
    assert rows(again) == EXPECTED_WDS_ROWS and report.num_skipped == 3  # same counts when the cache is reused


def test_webdataset_streaming(shards, caplog):
    (shards / "shard-002.tar").write_bytes(b"this is not a tar file" * 40)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        stream, report = load_webdataset(str(shards / "shard-*.tar"), streaming=True)
        first = next(iter(stream))
        assert (first["image_id"], first["caption"], first["image"].size) == ("shard-000.tar/000", "a caption from txt",
                                                                              (8, 6))
        assert report.num_rows == 1 and report.skipped == {}  # counted as met, not up front
        found = rows(stream)
    assert found == EXPECTED_WDS_ROWS
    assert report.skipped == {"missing_file": 1, "corrupt_image": 1, "empty_caption": 1, "corrupt_shard": 1}
    assert report.num_rows == 1 + 4  # counts add up over iterations
    assert "shard-002.tar: unreadable after 0 samples" in caplog.text


def test_webdataset_errors(tmp_path):
    with pytest.raises(ValueError, match="No webdataset shard matches"):
        load_webdataset(str(tmp_path / "none-*.tar"))
    with pytest.raises(FileNotFoundError, match="missing.tar"):
        load_webdataset([tmp_path / "missing.tar"])
    write_shard(tmp_path / "bad.tar", [("000.jpg", image_bytes()), ("000.json", b"{not json")])
    with pytest.raises(ValueError, match=r"bad.tar: member 000.json is not valid JSON"):
        load_webdataset(tmp_path / "bad.tar", cache_dir=str(tmp_path / "cache"))


@pytest.fixture
def hub_folder(tmp_path):
    import pyarrow.parquet
    from datasets import Dataset
    from datasets import Image as ImageFeature

    truncated = cut(image_bytes((32, 32), seed=3))
    table = Dataset.from_dict({
        "image": [
            {"bytes": image_bytes((8, 6), seed=1), "path": None}, {"bytes": truncated, "path": "cut.jpg"},
            {"bytes": None, "path": str(tmp_path / "gone.png")}, {"bytes": image_bytes((10, 8), seed=2), "path": None},
        ],
        "captions": [["one", "two"], ["cut"], ["gone"], ["three", " "]],
        "label": [0, 1, 2, 3],
    }).cast_column("image", ImageFeature())
    (tmp_path / "hub" / "data").mkdir(parents=True)
    # written with pyarrow, as `to_parquet` would embed (and so need) the missing file
    pyarrow.parquet.write_table(table.data.table, tmp_path / "hub" / "data" / "train-00000-of-00001.parquet")
    return tmp_path / "hub"


@pytest.mark.parametrize("streaming", [False, True])
def test_hub_dataset_from_local_parquet(hub_folder, caplog, streaming):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        dataset, report = load_hub_dataset(str(hub_folder), split="train", streaming=streaming,
                                           cache_dir=str(hub_folder.parent / "cache"))
        found = list(dataset)
    # no id column: each image's id comes from its bytes, the same in a stream and in every process
    first, last = ("sha1:" + hashlib.sha1(image_bytes(size, seed=seed)).hexdigest()[:20]
                   for size, seed in (((8, 6), 1), ((10, 8), 2)))
    assert [(r["image_id"], r["caption"]) for r in found] == [(first, "one"), (first, "two"), (last, "three")]
    assert [r["image"].size for r in found] == [(8, 6), (8, 6), (10, 8)]
    assert set(found[0]) == {"image", "caption", "image_id"}  # `label` is not a common column
    assert (report.num_rows, report.num_images) == (3, 2)
    assert_skips(report, caplog, {"missing_file": 1, "corrupt_image": 1, "empty_caption": 1},
                 ["row 1: cut.jpg", "gone.png", "row 3, caption 1"])


def test_hub_dataset_save_to_disk_and_errors(tmp_path):
    from datasets import Dataset, DatasetDict
    from datasets import Image as ImageFeature

    path = str(write_image(tmp_path / "x.png", (8, 6)))
    table = Dataset.from_dict({"picture": [path, path], "text": ["first", "second"], "image_id": [7, 7],
                               "boxes": [[[0.1, 0.1, 0.5, 0.5]], []]})
    DatasetDict({"validation": table.cast_column("picture", ImageFeature())}).save_to_disk(str(tmp_path / "saved"))
    dataset, report = load_hub_dataset(str(tmp_path / "saved"), split="validation", image_column="picture")
    assert rows(dataset) == [("7", "first"), ("7", "second")] and report.num_images == 1
    assert dataset[0]["boxes"] == [pytest.approx([0.1, 0.1, 0.5, 0.5])] and dataset[0]["image"].size == (8, 6)
    with pytest.raises(ValueError, match=r"no split 'train'; it has \['validation'\]"):
        load_hub_dataset(str(tmp_path / "saved"), split="train", image_column="picture")
    with pytest.raises(ValueError, match=r"`caption_column`='title' is not a column of .*'picture', 'text'"):
        load_hub_dataset(str(tmp_path / "saved"), split="validation", image_column="picture", caption_column="title")


def test_dispatcher(coco, flickr_csv, imagefolder, shards, hub_folder, tmp_path):
    tsv = tmp_path / "cc.tsv"
    tsv.write_text("a caption\tcoco/f.png\n")
    assert infer_format(coco) == "coco_karpathy"
    assert infer_format(flickr_csv) == "flickr30k"
    assert infer_format(tsv) == "cc_tsv"
    assert infer_format(imagefolder) == "imagefolder"
    assert infer_format(shards / "shard-000.tar") == "webdataset"
    assert infer_format(str(shards / "shard-*.tar")) == "webdataset"
    assert infer_format([shards / "shard-000.tar"]) == "webdataset"
    assert infer_format(hub_folder) == "hub"
    assert infer_format("someone/captions-dataset") == "hub" and infer_format("mscoco") == "hub"

    dataset, report = load_caption_dataset(coco)
    assert rows(dataset) == rows(load_coco_karpathy(coco)[0]) and report.num_skipped == 3
    dataset, _ = load_caption_dataset(tsv)
    assert rows(dataset) == [("coco/f.png", "a caption")]
    dataset, _ = load_caption_dataset(imagefolder, split="test")
    assert rows(dataset) == [("t.png", "test t")]
    dataset, _ = load_caption_dataset(flickr_csv, split=None, image_root=flickr_csv.parent / "flickr30k_images")
    assert len(dataset) == 4
    stream, report = load_caption_dataset(str(shards / "shard-*.tar"), streaming=True)
    assert rows(stream) == EXPECTED_WDS_ROWS and report.num_skipped == 3
    dataset, _ = load_caption_dataset(tsv, format="cc_tsv", image_root=tmp_path)
    assert dataset[0]["image"].size == (6, 6)

    unknown = tmp_path / "notes.xyz"
    unknown.write_text("?")
    for bad in (unknown, "not a name!"):
        with pytest.raises(ValueError, match="one of \\('coco_karpathy', 'flickr30k'") as error:
            infer_format(bad)
        assert str(bad) in str(error.value)
    not_karpathy = tmp_path / "other.json"
    not_karpathy.write_text('{"annotations": []}')
    with pytest.raises(ValueError, match="without an 'images' key"):
        infer_format(not_karpathy)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        infer_format(tmp_path / "missing.json")
    with pytest.raises(ValueError, match=r"Unknown `format` 'parquet'; expected one of .*'hub'"):
        load_caption_dataset(tsv, format="parquet")
    with pytest.raises(ValueError, match="single split"):
        load_caption_dataset(tsv, split="test")
    assert set(FORMATS) == {"coco_karpathy", "flickr30k", "cc_tsv", "imagefolder", "webdataset", "hub"}
    assert str(LoadReport("x", 3, 2, {"missing_file": 1})) == "x: 3 rows from 2 images; skipped 1 missing_file."


def test_brace_expansion_of_shard_names():
    from dclip.data.loaders.webdataset import expand_braces

    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("{a,b}-{8..10}.tar") == ["a-8.tar", "a-9.tar", "a-10.tar", "b-8.tar", "b-9.tar", "b-10.tar"]
    assert expand_braces("plain-{x}.tar") == ["plain-{x}.tar"]  # not a range or a list: kept as written


def test_webdataset_from_brace_ranges_and_remote_urls(shards):
    """`shard-{000..001}.tar` locally, and the same shards over HTTP (a local server; read through fsspec) stream
    the rows of the glob; a URL that cannot be read is one counted skip."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(shards))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        local, _ = load_webdataset(str(shards / "shard-{000..001}.tar"), cache_dir=str(shards / "cache"))
        assert rows(local) == EXPECTED_WDS_ROWS
        url = f"http://127.0.0.1:{server.server_address[1]}/shard-{{000..002}}.tar"
        assert infer_format(url) == "webdataset"
        stream, report = load_webdataset(url, streaming=True)
        assert rows(stream) == EXPECTED_WDS_ROWS
        assert report.skipped["corrupt_shard"] == 1  # shard-002.tar is not there: 404
    finally:
        server.shutdown()


def test_content_ids_follow_the_pixels_and_regions_not_the_storage(tmp_path):
    """Without an id column: an image stored as a file has the id it has stored inline (no machine path in it), and
    one image under other boxes is another teacher input, so another id."""
    from dclip.data.loaders.common import content_id

    data = image_bytes((12, 10), seed=4, format="PNG")
    (tmp_path / "a.png").write_bytes(data)
    inline = content_id({"bytes": data, "path": None}, 0)
    assert content_id({"bytes": None, "path": str(tmp_path / "a.png")}, 1) == inline
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    (moved / "b.png").write_bytes(data)
    assert content_id({"bytes": None, "path": str(moved / "b.png")}, 2) == inline
    boxed = content_id({"bytes": data, "path": None}, 0, [[0.0, 0.0, 0.5, 0.5]])
    assert boxed != inline and boxed == content_id({"bytes": data, "path": None}, 3, [[0.0, 0.0, 0.5, 0.5]])
    assert boxed != content_id({"bytes": data, "path": None}, 0, [[0.5, 0.5, 1.0, 1.0]])
    assert content_id({"bytes": None, "path": str(tmp_path / "gone.png")}, 7) == "row:7"
