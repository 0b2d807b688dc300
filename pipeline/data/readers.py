"""Read a preference table (Parquet or JSONL + image folder) into the normalised pair schema.

    load = load_preferences("data/pickapic/")   # a .parquet or .jsonl file, or a folder of .parquet/.jsonl shards
    load.pairs        # pa.Table in PAIR_SCHEMA: winner in image_w, loser in image_l, stable pair_id
    load.quarantine   # pa.Table in QUARANTINE_SCHEMA: every bad row with its file, row index and reason
    load.summary      # {"rows", "kept", "ties", "duplicates", "quarantined", "quarantined_by_reason",
                      #  "ignored_files"}

A bad row never raises: it is quarantined with a stable reason code (schema.QUARANTINE_REASONS). Only a
source that does not exist or is not a Parquet/JSONL table at all is an error, because that is the user's.
A folder's other files (not .parquet/.jsonl, not hidden, not images, not _SUCCESS-style markers) are not read and
are listed in ``summary["ignored_files"]`` (and logged), never passed over without a word.

Labels: ``label_0`` 1.0 means image 0 won, 0.0 means image 1 won, 0.5 is a tie. Ties are dropped by default
and counted in ``summary["ties"]``; with ``drop_ties=False`` they are kept, in file order, with image 0 as
``image_w`` and ``label_0`` = 0.5 (``summary["ties"]`` then counts kept ties, which are also in ``kept``).
A comparison seen twice in one load (even with columns swapped and the label flipped) is kept once.
Every image is fully decoded once here, so later stages can trust the bytes.

``load_preferences`` holds every kept image in memory: it is the small-table API. Tables larger than memory go
through ``pipeline.precompute.source`` (Ray Data read tasks, one per file), which uses the same row readers
(``table_files``, ``file_rows``) and the same per-row check (``check_row``), so both paths give the same reasons.
Sources may be local paths or ``s3://`` / ``gs://`` URIs (pyarrow filesystems; images named by path are read
relative to the table's folder on the same filesystem).
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.data.images import BadImage, decode_image
from pipeline.data.schema import (
    ACCEPTED_COLUMN_SETS,
    IMAGE_PATH_COLUMNS,
    PAIR_SCHEMA,
    QUARANTINE_REASONS,
    QUARANTINE_SCHEMA,
    pair_id,
)
from pipeline.storage import filesystem, is_local

log = logging.getLogger(__name__)

DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
PARQUET_SUFFIXES = (".parquet", ".pq")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
# Pick-a-Pic rows hold two ~1 MB images; small batches keep memory flat however big the file is.
PARQUET_BATCH_ROWS = 64
PAIR_BATCH_ROWS = 256


@dataclass(frozen=True)
class PreferenceLoad:
    pairs: pa.Table  # PAIR_SCHEMA
    quarantine: pa.Table  # QUARANTINE_SCHEMA
    summary: dict[str, Any]


@dataclass(frozen=True)
class ValidPair:
    pair_id: str
    caption: str
    image_w: bytes
    image_l: bytes
    label_0: float

    @property
    def is_tie(self) -> bool:
        return self.label_0 == 0.5


class RowError(Exception):
    """Why one row cannot be used: a quarantine reason code and a human-readable detail."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class TableFile:
    """One file of a preference table: ``uri`` (a local path as given, or ``s3://bucket/key``) and its kind."""

    uri: str
    kind: str  # "parquet" | "jsonl"


@dataclass(frozen=True)
class RawRow:
    """One row as read, before validation. Images are bytes (inline) or paths relative to ``folder``."""

    source: str
    row: int
    caption: Any
    image_0: Any
    image_1: Any
    label_0: Any
    folder: Path | str | None  # set when the images are file paths: a local Path, or a folder URI


@dataclass(frozen=True)
class Rejected:
    """A row that is already known to be bad at read time (bad JSON line, missing column)."""

    source: str
    row: int
    reason: str
    detail: str


# ------------------------------------------------------------------------------------------ entry point


def load_preferences(
    source: str | Path,
    *,
    drop_ties: bool = True,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    max_aspect_ratio: float = 3.0,
) -> PreferenceLoad:
    """Read, validate and normalise every row of ``source``; see the module docstring for the rules."""
    stream = PreferenceStream(
        source, drop_ties=drop_ties, max_image_pixels=max_image_pixels, max_aspect_ratio=max_aspect_ratio
    )
    pairs = pa.Table.from_batches(list(stream), schema=PAIR_SCHEMA)
    return PreferenceLoad(pairs=pairs, quarantine=stream.quarantine, summary=stream.summary)


class PreferenceStream:
    """The pairs of ``source`` as ``pa.RecordBatch``es in PAIR_SCHEMA (at most ``batch_rows`` rows each).

    Iterate it once; afterwards ``quarantine`` and ``summary`` are complete (before, they cover the rows read
    so far). A missing or unknown source raises here, at construction, not halfway through.
    """

    def __init__(
        self,
        source: str | Path,
        *,
        drop_ties: bool = True,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        max_aspect_ratio: float = 3.0,
        batch_rows: int = PAIR_BATCH_ROWS,
    ):
        self.source = source
        listing = list_table(source)
        self.files = listing.files
        self.ignored_files = listing.ignored
        self.batch_rows = batch_rows
        self._collector = _Collector(
            drop_ties=drop_ties, max_image_pixels=max_image_pixels, max_aspect_ratio=max_aspect_ratio
        )

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        for file in self.files:
            for item in file_rows(file):
                self._collector.add(item)
                if self._collector.pending_rows >= self.batch_rows:
                    yield self._collector.take_batch()
        if self._collector.pending_rows:
            yield self._collector.take_batch()
        log.info("read preferences from %s: %s", self.source, self.summary)

    @property
    def quarantine(self) -> pa.Table:
        return self._collector.quarantine_table()

    @property
    def summary(self) -> dict[str, Any]:
        return {**self._collector.summary(), "ignored_files": list(self.ignored_files)}


ACCEPTED_SOURCES = (
    "a .parquet or .jsonl file, or a folder of .parquet and .jsonl shards (JSONL image paths relative to the shard's "
    "folder)"
)
# Files a data folder may hold beside its shards without a word: the images that path columns name relative to
# the folder. Hidden files and Spark/Hive markers (_SUCCESS, _metadata) are passed over too; subfolders are where
# images live and are never listed. Anything else is reported as ignored, so a shard of another format (.csv,
# .json, a .parquet.gz) is never silently left out of a run.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class TableListing:
    """What a source holds: its table files (``table_files``) and the other files of a data folder that are not
    read (``ignored``: local paths or URIs, sorted), which readers report in their summaries."""

    files: list[TableFile]
    ignored: list[str]


def table_files(source: str | Path) -> list[TableFile]:
    """The table files behind ``source`` (a local path or an ``s3://`` / ``gs://`` URI): the file itself, or a
    folder's .parquet and .jsonl shards sorted by name. A source that does not exist or holds no table is an error
    naming it. ``list_table`` also gives the folder's other files."""
    return list_table(source).files


def list_table(source: str | Path) -> TableListing:
    """``table_files`` plus the files of a data folder that are neither shards nor expected beside them."""
    if is_local(str(source)):
        return _list_local(Path(source))
    return _list_remote(str(source).rstrip("/"))


def _list_local(path: Path) -> TableListing:
    if not path.exists():
        raise FileNotFoundError(f"preference table {path} does not exist; expected {ACCEPTED_SOURCES}")
    if not path.is_dir():
        return TableListing([TableFile(str(path), _kind_of(str(path)))], [])
    return _folder_listing(str(path), sorted(str(p) for p in path.iterdir() if p.is_file()))


def _list_remote(uri: str) -> TableListing:
    scheme = uri.split("://", 1)[0]
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"preference table {uri} does not exist; expected {ACCEPTED_SOURCES}")
    if info.type != pafs.FileType.Directory:
        return TableListing([TableFile(uri, _kind_of(uri))], [])
    entries = fs.get_file_info(pafs.FileSelector(path))
    names = sorted(f"{scheme}://{e.path}" for e in entries if e.type == pafs.FileType.File)
    return _folder_listing(uri, names)


def _folder_listing(folder: str, names: list[str]) -> TableListing:
    """Sort a data folder's files (full paths or URIs) into shards and ignored files; no shard is an error."""
    files, ignored = [], []
    for name in names:
        base = posixpath.basename(name)
        suffix = posixpath.splitext(base)[1].lower()
        if base.startswith((".", "_")) or suffix in IMAGE_SUFFIXES:
            continue
        if suffix in PARQUET_SUFFIXES or suffix in JSONL_SUFFIXES:
            files.append(TableFile(name, _kind_of(name)))
        else:
            ignored.append(name)
    if not files:
        raise ValueError(f"folder {folder} holds no .parquet or .jsonl files; expected {ACCEPTED_SOURCES}")
    if ignored:
        log.warning("preference folder %s: %d file(s) are not .parquet/.jsonl shards and are not read: %s",
                    folder, len(ignored), ", ".join(ignored[:5]) + (" ..." if len(ignored) > 5 else ""))
    return TableListing(files, ignored)


def _kind_of(name: str) -> str:
    suffix = posixpath.splitext(name)[1].lower()
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    raise ValueError(f"preference table {name}: unknown format {suffix or '(no suffix)'!r}; expected {ACCEPTED_SOURCES}")


def file_rows(file: TableFile) -> Iterator[RawRow | Rejected]:
    """Every row of one table file, in file order, as read (not yet validated)."""
    return _parquet_rows(file) if file.kind == "parquet" else _jsonl_rows(file)


def _folder_of(uri: str) -> Path | str:
    return Path(uri).parent if is_local(uri) else posixpath.dirname(uri)


# ---------------------------------------------------------------------------------------------- readers


# JSON cannot hold image bytes, so a JSONL table always names image files.
JSONL_COLUMN_SETS = tuple(cs for cs in ACCEPTED_COLUMN_SETS if IMAGE_PATH_COLUMNS[0] in cs)


def _choose_columns(names: set[str], accepted: tuple[tuple[str, ...], ...]) -> tuple[str, ...] | None:
    """(caption, image 0, image 1, label) column names of the first accepted set present; None if none is."""
    for column_set in accepted:
        if set(column_set) <= names:
            return column_set
    return None


def _missing_columns_detail(names: set[str], accepted: tuple[tuple[str, ...], ...]) -> str:
    missing = min(([c for c in cs if c not in names] for cs in accepted), key=len)
    sets = " or ".join("(" + ", ".join(cs) + ")" for cs in accepted)
    return f"missing column(s) {', '.join(missing)}; accepted column sets: {sets}"


def _parquet_rows(file: TableFile) -> Iterator[RawRow | Rejected]:
    path = file.uri
    try:
        fs, fs_path = filesystem(path)
        parquet = pq.ParquetFile(fs.open_input_file(fs_path))
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"{path} is not a readable Parquet file: {err}") from err
    names = set(parquet.schema_arrow.names)
    columns = _choose_columns(names, ACCEPTED_COLUMN_SETS)
    if columns is None:
        detail = _missing_columns_detail(names, ACCEPTED_COLUMN_SETS)
        for row in range(parquet.metadata.num_rows):
            yield Rejected(path, row, "missing_column", detail)
        return
    caption_col, image_0_col, image_1_col, label_col = columns
    folder = _folder_of(path) if image_0_col in IMAGE_PATH_COLUMNS else None
    row = 0
    batches = parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=list(columns))
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as err:
            raise ValueError(f"{path}: Parquet data is corrupt near row {row}: {err}; re-export the file") from err
        values = {name: batch.column(name).to_pylist() for name in columns}
        for i in range(batch.num_rows):
            yield RawRow(
                source=path,
                row=row,
                caption=values[caption_col][i],
                image_0=values[image_0_col][i],
                image_1=values[image_1_col][i],
                label_0=values[label_col][i],
                folder=folder,
            )
            row += 1


def _jsonl_rows(file: TableFile) -> Iterator[RawRow | Rejected]:
    source = file.uri
    fs, fs_path = filesystem(source)
    # bytes, so one line of bad UTF-8 is one bad row, not a failed read
    with fs.open_input_stream(fs_path) as raw, io.BufferedReader(raw) as lines:
        for row, line in enumerate(lines):
            if not line.strip():
                continue  # blank lines (a trailing newline) are not rows
            try:
                record = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as err:
                yield Rejected(source, row, "bad_json", f"line {row} is not valid UTF-8: {err}")
                continue
            except json.JSONDecodeError as err:
                detail = f"line {row} is not valid JSON: {err.msg} at column {err.colno}"
                yield Rejected(source, row, "bad_json", detail)
                continue
            if not isinstance(record, dict):
                detail = f"line {row}: expected a JSON object, got {type(record).__name__}"
                yield Rejected(source, row, "bad_json", detail)
                continue
            columns = _choose_columns(set(record), JSONL_COLUMN_SETS)
            if columns is None:
                yield Rejected(source, row, "missing_column", _missing_columns_detail(set(record), JSONL_COLUMN_SETS))
                continue
            caption_col, image_0_col, image_1_col, label_col = columns
            yield RawRow(
                source=source,
                row=row,
                caption=record[caption_col],
                image_0=record[image_0_col],
                image_1=record[image_1_col],
                label_0=record[label_col],
                folder=_folder_of(source),
            )


# ------------------------------------------------------------------------------------------- validation


def validate_pair(
    caption: Any,
    image_0: bytes,
    image_1: bytes,
    label_0: Any,
    *,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    max_aspect_ratio: float = 3.0,
) -> ValidPair:
    """Check one comparison whose images are bytes; raise RowError(reason, detail) if it cannot be used."""
    _check_caption_and_label(caption, label_0)
    sizes = []
    for index, data in enumerate((image_0, image_1)):
        try:
            sizes.append(decode_image(data, max_image_pixels=max_image_pixels).size)
        except BadImage as err:
            raise RowError(err.reason, f"image {index}: {err.detail}") from err
    aspects = [width / height for width, height in sizes]
    if max(aspects) / min(aspects) > max_aspect_ratio:
        raise RowError(
            "aspect_mismatch",
            f"image 0 is {sizes[0][0]}x{sizes[0][1]}, image 1 is {sizes[1][0]}x{sizes[1][1]}: aspect ratios differ "
            f"by {max(aspects) / min(aspects):.2f}x, above max_aspect_ratio={max_aspect_ratio}",
        )
    label = float(label_0)
    winner, loser = (image_1, image_0) if label == 0.0 else (image_0, image_1)  # a tie keeps file order
    return ValidPair(pair_id(caption, bytes(winner), bytes(loser)), caption, bytes(winner), bytes(loser), label)


def _check_caption_and_label(caption: Any, label_0: Any) -> None:
    if not isinstance(caption, str) or not caption.strip():
        raise RowError("bad_caption", f"caption must be a non-empty string, got {caption!r:.80}")
    try:
        caption.encode("utf-8")
    except UnicodeEncodeError as err:  # JSON can carry lone surrogates, which no UTF-8 table can hold
        raise RowError("bad_caption", f"caption is not valid Unicode text: {err}") from err
    if isinstance(label_0, bool) or not isinstance(label_0, (int, float)) or label_0 not in (0, 0.5, 1):
        # NaN fails the membership test too, since NaN != anything.
        raise RowError("bad_label", f"label_0 must be 0, 0.5 or 1, got {label_0!r:.80}")


def read_image_file(folder: Path, relative: Any, index: int) -> bytes:
    """Bytes of an image named relative to ``folder``; a path that leads outside it is refused."""
    column = IMAGE_PATH_COLUMNS[index]
    if not isinstance(relative, str) or not relative:
        detail = f"image {index}: {column} must be a non-empty relative path, got {relative!r:.80}"
        raise RowError("missing_file", detail)
    if Path(relative).is_absolute():
        detail = f"image {index}: {relative!r} is absolute; paths must be relative to {folder}"
        raise RowError("path_escapes_folder", detail)
    root = folder.resolve()
    try:
        target = (root / relative).resolve()  # follows symlinks, so one pointing outside is caught too
    except (OSError, ValueError) as err:  # an embedded NUL, a name too long for the file system
        raise RowError("missing_file", f"image {index}: {relative!r:.80} is not a usable path: {err}") from err
    if not target.is_relative_to(root):
        raise RowError("path_escapes_folder", f"image {index}: {relative!r} resolves to {target}, outside {root}")
    try:
        return target.read_bytes()
    except OSError as err:  # absent, a folder, unreadable
        raise RowError("missing_file", f"image {index}: cannot read {relative!r} under {root}: {err}") from err


def read_image_uri(folder: str, relative: Any, index: int) -> bytes:
    """Bytes of an image named relative to the folder URI ``folder`` (object stores have no symlinks: a path is
    refused when it is absolute or its ``..`` parts climb out of the folder)."""
    column = IMAGE_PATH_COLUMNS[index]
    if not isinstance(relative, str) or not relative:
        detail = f"image {index}: {column} must be a non-empty relative path, got {relative!r:.80}"
        raise RowError("missing_file", detail)
    if relative.startswith("/") or "://" in relative:
        detail = f"image {index}: {relative!r} is absolute; paths must be relative to {folder}"
        raise RowError("path_escapes_folder", detail)
    if posixpath.normpath(relative).split("/")[0] == "..":
        raise RowError("path_escapes_folder", f"image {index}: {relative!r} leads outside {folder}")
    uri = f"{folder.rstrip('/')}/{posixpath.normpath(relative)}"
    try:
        fs, path = filesystem(uri)
        with fs.open_input_stream(path) as src:
            return src.read()
    except (OSError, pa.ArrowException) as err:
        raise RowError("missing_file", f"image {index}: cannot read {relative!r} under {folder}: {err}") from err


def check_row(item: RawRow, *, max_image_pixels: int, max_aspect_ratio: float) -> ValidPair:
    """Validate one row as read: images read (for path columns) and fully decoded; raises RowError."""
    image_0, image_1 = item.image_0, item.image_1
    if item.folder is not None:
        # Check caption and label before touching the file system: the cheaper reason wins.
        _check_caption_and_label(item.caption, item.label_0)
        read = read_image_file if isinstance(item.folder, Path) else read_image_uri
        image_0 = read(item.folder, image_0, 0)
        image_1 = read(item.folder, image_1, 1)
    return validate_pair(
        item.caption, image_0, image_1, item.label_0,
        max_image_pixels=max_image_pixels, max_aspect_ratio=max_aspect_ratio,
    )


class _Collector:
    """Validates rows one at a time; holds kept pairs until taken, and the quarantine rows and counts."""

    def __init__(self, *, drop_ties: bool, max_image_pixels: int, max_aspect_ratio: float):
        self.drop_ties = drop_ties
        self.max_image_pixels = max_image_pixels
        self.max_aspect_ratio = max_aspect_ratio
        self.pairs: dict[str, list] = {name: [] for name in PAIR_SCHEMA.names}
        self.quarantine: dict[str, list] = {name: [] for name in QUARANTINE_SCHEMA.names}
        self.seen: set[str] = set()
        self.counts = {"rows": 0, "kept": 0, "ties": 0, "duplicates": 0, "quarantined": 0}
        self.by_reason = dict.fromkeys(QUARANTINE_REASONS, 0)

    def add(self, item: RawRow | Rejected) -> None:
        self.counts["rows"] += 1
        if isinstance(item, Rejected):
            self._quarantine(item.source, item.row, item.reason, item.detail)
            return
        try:
            pair = self._validate(item)
        except RowError as err:
            self._quarantine(item.source, item.row, err.reason, err.detail)
            return
        if pair.is_tie:
            self.counts["ties"] += 1
            if self.drop_ties:
                return
        if pair.pair_id in self.seen:
            self.counts["duplicates"] += 1
            return
        self.seen.add(pair.pair_id)
        self.counts["kept"] += 1
        for name, value in (
            ("pair_id", pair.pair_id), ("caption", pair.caption), ("image_w", pair.image_w),
            ("image_l", pair.image_l), ("label_0", pair.label_0), ("source", item.source), ("row", item.row),
        ):
            self.pairs[name].append(value)

    def _validate(self, item: RawRow) -> ValidPair:
        return check_row(item, max_image_pixels=self.max_image_pixels, max_aspect_ratio=self.max_aspect_ratio)

    def _quarantine(self, source: str, row: int, reason: str, detail: str) -> None:
        self.counts["quarantined"] += 1
        self.by_reason[reason] += 1
        for name, value in (("source", source), ("row", row), ("reason", reason), ("detail", detail)):
            self.quarantine[name].append(value)

    @property
    def pending_rows(self) -> int:
        return len(self.pairs["pair_id"])

    def take_batch(self) -> pa.RecordBatch:
        batch = pa.RecordBatch.from_pydict(self.pairs, schema=PAIR_SCHEMA)
        self.pairs = {name: [] for name in PAIR_SCHEMA.names}
        return batch

    def quarantine_table(self) -> pa.Table:
        return pa.table(self.quarantine, schema=QUARANTINE_SCHEMA)

    def summary(self) -> dict[str, Any]:
        return {**self.counts, "quarantined_by_reason": dict(self.by_reason)}
