import io
import json
import math
import os
import struct
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.data import PAIR_SCHEMA, QUARANTINE_SCHEMA, PreferenceStream, load_preferences
from pipeline.data.readers import PARQUET_BATCH_ROWS
from pipeline.data.schema import QUARANTINE_REASONS, pair_id


def png(colour: tuple[int, int, int], size: tuple[int, int] = (16, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def bomb_png(side: int = 5000) -> bytes:
    """A complete greyscale PNG of zeros: a few KB that would decode to side*side pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor = zlib.compressobj(9)
    row = b"\x00" * (side + 1)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


RED, GREEN, BLUE, GREY = png((255, 0, 0)), png((0, 255, 0)), png((0, 0, 255)), png((128, 128, 128))
BIG_JPEG = io.BytesIO()
Image.effect_noise((64, 64), 40).convert("RGB").save(BIG_JPEG, format="JPEG")
TRUNCATED = BIG_JPEG.getvalue()[: len(BIG_JPEG.getvalue()) // 2]
WIDE, TALL = png((9, 9, 9), (64, 16)), png((9, 9, 9), (16, 64))


def write_parquet(path: Path, rows: list[dict], schema: pa.Schema | None = None, **kwargs) -> Path:
    schema = schema or pa.schema(
        [("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()), ("label_0", pa.float64())]
    )
    columns = {name: [row.get(name) for row in rows] for name in schema.names}
    pq.write_table(pa.table(columns, schema=schema), path, **kwargs)
    return path


def quarantined(load) -> list[tuple[int, str]]:
    return list(zip(load.quarantine["row"].to_pylist(), load.quarantine["reason"].to_pylist()))


def assert_counts_add_up(load, drop_ties: bool = True) -> None:
    s = load.summary
    dropped_ties = s["ties"] if drop_ties else 0
    assert s["rows"] == s["kept"] + dropped_ties + s["duplicates"] + s["quarantined"]
    assert s["kept"] == load.pairs.num_rows and s["quarantined"] == load.quarantine.num_rows
    assert sum(s["quarantined_by_reason"].values()) == s["quarantined"]
    assert set(s["quarantined_by_reason"]) == set(QUARANTINE_REASONS)


# ------------------------------------------------------------------------------------------- good data


def test_parquet_good_rows_put_the_winner_first(tmp_path):
    path = write_parquet(tmp_path / "p.parquet", [
        {"caption": "a cat", "jpg_0": RED, "jpg_1": GREEN, "label_0": 1.0},
        {"caption": "a dog", "jpg_0": RED, "jpg_1": BLUE, "label_0": 0.0},
    ])
    load = load_preferences(path)
    assert load.pairs.schema.equals(PAIR_SCHEMA) and load.quarantine.schema.equals(QUARANTINE_SCHEMA)
    rows = load.pairs.to_pylist()
    assert [(r["caption"], r["image_w"], r["image_l"], r["label_0"]) for r in rows] == [
        ("a cat", RED, GREEN, 1.0),
        ("a dog", BLUE, RED, 0.0),
    ]
    assert [r["pair_id"] for r in rows] == [pair_id("a cat", RED, GREEN), pair_id("a dog", BLUE, RED)]
    assert [(r["source"], r["row"]) for r in rows] == [(str(path), 0), (str(path), 1)]
    assert load.summary["kept"] == 2 and load.summary["quarantined"] == 0
    assert load_preferences(path).pairs.equals(load.pairs)  # stable run to run


def test_jsonl_reader_reads_images_relative_to_its_folder(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "red.png").write_bytes(RED)
    (tmp_path / "img" / "green.png").write_bytes(GREEN)
    lines = [
        {"caption": "a cat", "image_0_path": "img/red.png", "image_1_path": "img/green.png", "label_0": 0},
        {"caption": "a dog", "image_0_path": "img/sub/../red.png", "image_1_path": "img/green.png", "label_0": 1},
    ]
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    load = load_preferences(path)
    rows = load.pairs.to_pylist()
    assert [(r["caption"], r["image_w"], r["image_l"], r["label_0"], r["row"]) for r in rows] == [
        ("a cat", GREEN, RED, 0.0, 0),
        ("a dog", RED, GREEN, 1.0, 1),
    ]
    assert load.quarantine.num_rows == 0


def test_swapped_columns_with_flipped_label_are_the_same_pair(tmp_path):
    first = write_parquet(tmp_path / "a.parquet", [{"caption": "x", "jpg_0": RED, "jpg_1": GREEN, "label_0": 1.0}])
    swapped = write_parquet(tmp_path / "b.parquet", [{"caption": "x", "jpg_0": GREEN, "jpg_1": RED, "label_0": 0.0}])
    id_first = load_preferences(first).pairs["pair_id"][0].as_py()
    assert load_preferences(swapped).pairs["pair_id"][0].as_py() == id_first
    # The other verdict on the same images is a different comparison.
    reversed_verdict = write_parquet(
        tmp_path / "c.parquet", [{"caption": "x", "jpg_0": RED, "jpg_1": GREEN, "label_0": 0.0}]
    )
    assert load_preferences(reversed_verdict).pairs["pair_id"][0].as_py() != id_first

    # The same comparison given as JSONL + files gets the same id too.
    (tmp_path / "r.png").write_bytes(RED)
    (tmp_path / "g.png").write_bytes(GREEN)
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text(json.dumps({"caption": "x", "image_0_path": "g.png", "image_1_path": "r.png", "label_0": 0.0}))
    assert load_preferences(jsonl).pairs["pair_id"][0].as_py() == id_first

    # Within one load (a folder of both files), the duplicate is kept once and counted.
    folder = tmp_path / "both"
    folder.mkdir()
    first.rename(folder / "1.parquet")
    swapped.rename(folder / "2.parquet")
    load = load_preferences(folder)
    assert load.pairs["pair_id"].to_pylist() == [id_first]
    assert load.pairs["source"][0].as_py() == str(folder / "1.parquet")
    assert load.summary["duplicates"] == 1
    assert_counts_add_up(load)


def test_folder_reads_files_in_sorted_order_and_skips_marker_files(tmp_path):
    write_parquet(tmp_path / "b.parquet", [{"caption": "second", "jpg_0": RED, "jpg_1": BLUE, "label_0": 1.0}])
    write_parquet(tmp_path / "a.parquet", [{"caption": "first", "jpg_0": RED, "jpg_1": GREEN, "label_0": 1.0}])
    (tmp_path / "_SUCCESS").write_bytes(b"")
    (tmp_path / ".DS_Store").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not a table")
    load = load_preferences(tmp_path)
    assert load.pairs["caption"].to_pylist() == ["first", "second"]
    assert load.summary["ignored_files"] == [str(tmp_path / "notes.txt")]  # markers and hidden files: no word


def mixed_folder(folder: Path) -> Path:
    """A data folder as re-alignment finds it: a Parquet shard, a JSONL shard whose images sit in a subfolder and
    beside it, a stray text file, a CSV export and the usual markers."""
    folder.mkdir(parents=True, exist_ok=True)
    write_parquet(folder / "part-0.parquet",
                  [{"caption": "from parquet", "jpg_0": RED, "jpg_1": GREEN, "label_0": 1.0}])
    (folder / "images").mkdir()
    (folder / "images" / "blue.png").write_bytes(BLUE)
    (folder / "grey.png").write_bytes(GREY)
    lines = [{"caption": "from jsonl", "image_0_path": "images/blue.png", "image_1_path": "grey.png", "label_0": 0},
             {"caption": "also jsonl", "image_0_path": "grey.png", "image_1_path": "images/blue.png", "label_0": 0}]
    (folder / "part-1.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (folder / "notes.txt").write_text("exported by hand")
    (folder / "part-2.csv").write_text("caption,label_0\n")
    (folder / "_SUCCESS").write_bytes(b"")
    return folder


def test_a_folder_of_parquet_and_jsonl_shards_is_read_whole_and_other_files_are_reported(tmp_path):
    from pipeline.data.readers import TableFile, list_table, table_files

    folder = mixed_folder(tmp_path / "prefs")
    assert table_files(folder) == [TableFile(str(folder / "part-0.parquet"), "parquet"),
                                   TableFile(str(folder / "part-1.jsonl"), "jsonl")]
    ignored = [str(folder / "notes.txt"), str(folder / "part-2.csv")]
    assert list_table(folder).ignored == ignored
    load = load_preferences(folder)
    rows = load.pairs.to_pylist()
    assert [(r["caption"], r["image_w"], r["image_l"], r["source"]) for r in rows] == [
        ("from parquet", RED, GREEN, str(folder / "part-0.parquet")),
        ("from jsonl", GREY, BLUE, str(folder / "part-1.jsonl")),  # images relative to the shard's folder
        ("also jsonl", BLUE, GREY, str(folder / "part-1.jsonl")),
    ]
    assert load.summary["ignored_files"] == ignored and load.quarantine.num_rows == 0
    assert_counts_add_up(load)
    stream = PreferenceStream(folder)
    assert pa.Table.from_batches(list(stream)).equals(load.pairs) and stream.summary == load.summary
    assert load_preferences(folder / "part-1.jsonl").summary["ignored_files"] == []  # one file: nothing beside it


def test_parquet_is_read_in_batches_with_row_indices_across_them(tmp_path):
    n = 2 * PARQUET_BATCH_ROWS + 5
    rows = [{"caption": f"c{i}", "jpg_0": RED, "jpg_1": GREEN, "label_0": 1.0} for i in range(n)]
    rows[n - 2]["label_0"] = 7.0  # a bad row in the last batch
    path = write_parquet(tmp_path / "big.parquet", rows, row_group_size=50)
    load = load_preferences(path)
    assert load.pairs.num_rows == n - 1
    assert load.pairs["row"].to_pylist() == [i for i in range(n) if i != n - 2]
    assert quarantined(load) == [(n - 2, "bad_label")]


# -------------------------------------------------------------------------------------------- bad rows


def test_every_bad_parquet_row_is_quarantined_with_its_reason_and_row(tmp_path):
    good = {"caption": "fine", "jpg_0": RED, "jpg_1": GREEN, "label_0": 1.0}
    rows = [
        good,                                                                          # 0
        {**good, "caption": ""},                                                       # 1
        {**good, "caption": "   "},                                                    # 2
        {**good, "caption": None},                                                     # 3
        {**good, "caption": "ok 4", "label_0": 2.0},                                   # 4
        {**good, "caption": "ok 5", "label_0": math.nan},                              # 5
        {**good, "caption": "ok 6", "label_0": None},                                  # 6
        {**good, "caption": "ok 7", "jpg_1": b"GIF89a but not really"},                # 7
        {**good, "caption": "ok 8", "jpg_0": TRUNCATED},                               # 8
        {**good, "caption": "ok 9", "jpg_1": bomb_png()},                              # 9
        {**good, "caption": "ok 10", "jpg_0": None},                                   # 10
        {**good, "caption": "ok 11", "jpg_0": WIDE, "jpg_1": TALL},                    # 11
        {"caption": "also fine", "jpg_0": BLUE, "jpg_1": GREY, "label_0": 0.0},        # 12
    ]
    path = write_parquet(tmp_path / "mixed.parquet", rows)
    load = load_preferences(path)
    assert quarantined(load) == [
        (1, "bad_caption"), (2, "bad_caption"), (3, "bad_caption"),
        (4, "bad_label"), (5, "bad_label"), (6, "bad_label"),
        (7, "undecodable_image"), (8, "truncated_image"), (9, "decompression_bomb"), (10, "undecodable_image"),
        (11, "aspect_mismatch"),
    ]
    assert load.pairs["row"].to_pylist() == [0, 12]
    assert load.pairs["image_w"].to_pylist() == [RED, GREY]
    details = load.quarantine["detail"].to_pylist()
    assert details[6].startswith("image 1:") and details[7].startswith("image 0:") and details[8].startswith("image 1:")
    assert "max_image_pixels" in details[8]
    assert set(load.quarantine["source"].to_pylist()) == {str(path)}
    assert load.summary["quarantined_by_reason"] == {
        **dict.fromkeys(QUARANTINE_REASONS, 0),
        "bad_caption": 3, "bad_label": 3, "undecodable_image": 2, "truncated_image": 1,
        "decompression_bomb": 1, "aspect_mismatch": 1,
    }
    assert load.summary["rows"] == 13 and load.summary["kept"] == 2
    assert_counts_add_up(load)


def test_aspect_limit_is_a_parameter(tmp_path):
    path = write_parquet(tmp_path / "p.parquet", [{"caption": "x", "jpg_0": WIDE, "jpg_1": TALL, "label_0": 1.0}])
    assert load_preferences(path, max_aspect_ratio=16.0).summary["kept"] == 1
    assert load_preferences(path, max_aspect_ratio=15.9).summary["quarantined_by_reason"]["aspect_mismatch"] == 1


def test_every_bad_jsonl_row_is_quarantined_with_its_line(tmp_path):
    table_dir = tmp_path / "table"
    (table_dir / "img").mkdir(parents=True)
    for name, data in {"red.png": RED, "green.png": GREEN, "blue.png": BLUE, "broken.png": TRUNCATED}.items():
        (table_dir / "img" / name).write_bytes(data)
    outside = tmp_path / "secret.png"
    outside.write_bytes(GREY)
    os.symlink(outside, table_dir / "img" / "link.png")

    def row(caption="fine", a="img/red.png", b="img/green.png", label=1.0) -> str:
        return json.dumps({"caption": caption, "image_0_path": a, "image_1_path": b, "label_0": label})

    lines = [
        row(),                                                         # 0 good
        '{"caption": "unterminated',                                   # 1 bad_json
        "[1, 2, 3]",                                                   # 2 bad_json (not an object)
        row(caption=123),                                              # 3 bad_caption
        row(label="yes"),                                              # 4 bad_label
        row(label=True),                                               # 5 bad_label
        row(a="../secret.png"),                                        # 6 path_escapes_folder
        row(b=str(outside)),                                           # 7 path_escapes_folder (absolute)
        row(b="img/link.png"),                                         # 8 path_escapes_folder (symlink)
        row(a="img/nothing_here.png"),                                 # 9 missing_file
        row(a=None),                                                   # 10 missing_file
        json.dumps({"caption": "x", "image_0_path": "img/red.png"}),   # 11 missing_column
        row(b="img/broken.png"),                                       # 12 truncated_image
        "",                                                            # 13 blank: not a row
        row(caption="also fine", a="img/blue.png", label=0.0),         # 14 good
        row(caption="\ud800 lone surrogate"),                         # 15 bad_caption
        row(a="img/red\u0000.png"),                                   # 16 missing_file (NUL in the name)
        row(b="img"),                                                  # 17 missing_file (a folder)
    ]
    path = table_dir / "prefs.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"caption": "\xff\xfe"}\n')  # 18: bad UTF-8
    load = load_preferences(path)
    assert quarantined(load) == [
        (1, "bad_json"), (2, "bad_json"), (3, "bad_caption"), (4, "bad_label"), (5, "bad_label"),
        (6, "path_escapes_folder"), (7, "path_escapes_folder"), (8, "path_escapes_folder"),
        (9, "missing_file"), (10, "missing_file"), (11, "missing_column"), (12, "truncated_image"),
        (15, "bad_caption"), (16, "missing_file"), (17, "missing_file"), (18, "bad_json"),
    ]
    assert load.pairs["row"].to_pylist() == [0, 14]
    assert load.pairs["image_w"].to_pylist() == [RED, GREEN]
    detail = dict(zip(load.quarantine["row"].to_pylist(), load.quarantine["detail"].to_pylist()))
    assert "line 1" in detail[1]
    assert detail[8].startswith("image 1:") and "outside" in detail[8]
    assert "image_1_path" in detail[11] and "label_0" in detail[11]
    assert load.summary["rows"] == 18  # the blank line is not a row
    assert_counts_add_up(load)


def test_a_table_missing_a_column_quarantines_every_row_but_is_not_fatal(tmp_path):
    schema = pa.schema([("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary())])
    rows = [{"caption": f"c{i}", "jpg_0": RED, "jpg_1": GREEN} for i in range(3)]
    broken = write_parquet(tmp_path / "a.parquet", rows, schema=schema)
    write_parquet(tmp_path / "b.parquet", [{"caption": "fine", "jpg_0": RED, "jpg_1": GREEN, "label_0": 1.0}])
    load = load_preferences(tmp_path)
    assert quarantined(load) == [(0, "missing_column"), (1, "missing_column"), (2, "missing_column")]
    assert set(load.quarantine["source"].to_pylist()) == {str(broken)}
    detail = load.quarantine["detail"][0].as_py()
    assert "label_0" in detail and "jpg_0" in detail and "image_0_path" in detail  # names what is accepted
    assert load.pairs["caption"].to_pylist() == ["fine"]
    assert load.summary["quarantined_by_reason"]["missing_column"] == 3
    assert_counts_add_up(load)


# ------------------------------------------------------------------------------------------------- ties


def tie_table(tmp_path) -> Path:
    return write_parquet(tmp_path / "ties.parquet", [
        {"caption": "a", "jpg_0": RED, "jpg_1": GREEN, "label_0": 0.5},
        {"caption": "b", "jpg_0": RED, "jpg_1": BLUE, "label_0": 1.0},
        {"caption": "c", "jpg_0": BLUE, "jpg_1": GREY, "label_0": 0.5},
    ])


def test_ties_are_dropped_and_counted(tmp_path):
    load = load_preferences(tie_table(tmp_path))
    assert load.pairs["caption"].to_pylist() == ["b"]
    assert load.summary["ties"] == 2 and load.summary["kept"] == 1 and load.summary["quarantined"] == 0
    assert_counts_add_up(load)


def test_ties_are_kept_in_file_order_when_asked(tmp_path):
    load = load_preferences(tie_table(tmp_path), drop_ties=False)
    rows = load.pairs.to_pylist()
    assert [(r["caption"], r["image_w"], r["image_l"], r["label_0"]) for r in rows] == [
        ("a", RED, GREEN, 0.5), ("b", RED, BLUE, 1.0), ("c", BLUE, GREY, 0.5),
    ]
    assert load.summary["ties"] == 2 and load.summary["kept"] == 3
    assert_counts_add_up(load, drop_ties=False)


# ----------------------------------------------------------------------------------- user errors raise


def test_a_source_that_does_not_exist_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.parquet"):
        load_preferences(tmp_path / "nowhere.parquet")


@pytest.mark.parametrize("name, content", [("prefs.csv", b"caption,label_0\n"), ("fake.parquet", b"not parquet")])
def test_a_file_that_is_not_a_table_is_a_clear_error(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=name):
        load_preferences(tmp_path / name)


def test_a_folder_without_parquet_or_jsonl_files_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("not a table")
    with pytest.raises(ValueError, match=r"holds no \.parquet or \.jsonl files"):
        load_preferences(tmp_path)


def test_stream_yields_the_same_pairs_in_bounded_batches(tmp_path):
    rows = [{"caption": f"c{i}", "jpg_0": RED, "jpg_1": GREEN, "label_0": 1.0} for i in range(5)]
    rows.insert(2, {"caption": "", "jpg_0": RED, "jpg_1": GREEN, "label_0": 1.0})
    path = write_parquet(tmp_path / "p.parquet", rows)
    stream = PreferenceStream(path, batch_rows=2)
    batches = list(stream)
    assert [b.num_rows for b in batches] == [2, 2, 1]
    assert pa.Table.from_batches(batches).equals(load_preferences(path).pairs)
    assert quarantined(stream) == [(2, "bad_caption")]
    assert stream.summary["kept"] == 5 and stream.summary["quarantined"] == 1


def test_stream_raises_on_a_missing_source_before_iterating(tmp_path):
    with pytest.raises(FileNotFoundError):
        PreferenceStream(tmp_path / "nothing.jsonl")
