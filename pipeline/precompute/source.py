"""The preference table as a Ray Data source: one read task per table file, rows checked where they are read.

    dataset = read_checked_rows(table_files("s3://bucket/pickapic"), check=RowCheck(drop_ties=True, ...))

Each read task streams one file (Parquet row batches or JSONL lines, local or on an object store; a folder's
.parquet and .jsonl shards alike, as ``table_files`` lists them), reads the images that rows name by path (relative
to the file's folder), fully decodes every image and validates the row with ``pipeline.data``'s own
``check_row``, so the reasons are those of ``load_preferences``. It yields blocks of ``CHECKED_SCHEMA`` rows:
good pairs (winner first, with their ``pair_id``), ties, and bad rows with their quarantine reason.

A custom datasource rather than ``read_parquet`` / ``read_json``: quarantine rows name their file and row index,
which those readers do not give per row, ``read_json`` fails a whole file on one bad line (here a ``bad_json``
row), and ``read_parquet``'s 1-CPU file-listing task is avoided. Listing the files is the driver's only part.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa

from pipeline.data.readers import Rejected, RowError, TableFile, check_row, file_rows

# Pick-a-Pic rows hold two ~0.5-1 MB images: 64 rows keep a block near Ray Data's default target size.
BLOCK_ROWS = 64

CHECKED_SCHEMA = pa.schema(
    [
        pa.field("status", pa.string()),  # "pair" (kept for dedupe), "tie" (dropped tie), "bad" (quarantine)
        pa.field("tie", pa.bool_()),
        pa.field("pair_id", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("image_w", pa.binary()),
        pa.field("image_l", pa.binary()),
        pa.field("label_0", pa.float64()),
        pa.field("source", pa.string()),
        pa.field("row", pa.int64()),
        pa.field("reason", pa.string()),
        pa.field("detail", pa.string()),
    ]
)


@dataclass(frozen=True)
class RowCheck:
    drop_ties: bool
    max_image_pixels: int
    max_aspect_ratio: float


def checked_rows(file: TableFile, check: RowCheck, block_rows: int = BLOCK_ROWS) -> Iterator[pa.Table]:
    """The rows of one file as CHECKED_SCHEMA blocks of at most ``block_rows`` rows, in file order."""
    columns: dict[str, list] = {name: [] for name in CHECKED_SCHEMA.names}

    def add(**values) -> None:
        for name in CHECKED_SCHEMA.names:
            columns[name].append(values.get(name))

    for item in file_rows(file):
        if isinstance(item, Rejected):
            add(status="bad", source=item.source, row=item.row, reason=item.reason, detail=item.detail)
        else:
            try:
                pair = check_row(item, max_image_pixels=check.max_image_pixels,
                                 max_aspect_ratio=check.max_aspect_ratio)
            except RowError as err:
                add(status="bad", source=item.source, row=item.row, reason=err.reason, detail=err.detail)
            else:
                if pair.is_tie and check.drop_ties:
                    add(status="tie", tie=True, source=item.source, row=item.row)
                else:
                    add(status="pair", tie=pair.is_tie, pair_id=pair.pair_id, caption=pair.caption,
                        image_w=pair.image_w, image_l=pair.image_l, label_0=pair.label_0, source=item.source,
                        row=item.row)
        if len(columns["status"]) >= block_rows:
            yield pa.table(columns, schema=CHECKED_SCHEMA)
            columns = {name: [] for name in CHECKED_SCHEMA.names}
    if columns["status"]:
        yield pa.table(columns, schema=CHECKED_SCHEMA)


def read_checked_rows(files: list[TableFile], check: RowCheck, *, num_cpus: float):
    """A ``ray.data.Dataset`` of CHECKED_SCHEMA rows of every file (one read task per file)."""
    import ray
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class PreferenceDatasource(Datasource):
        def estimate_inmemory_data_size(self):
            return None

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            def task(file: TableFile) -> ReadTask:
                metadata = BlockMetadata(num_rows=None, size_bytes=None, input_files=[file.uri], exec_stats=None)
                return ReadTask(lambda: checked_rows(file, check), metadata, schema=CHECKED_SCHEMA,
                                per_task_row_limit=per_task_row_limit)

            return [task(file) for file in files]

    # One block stream per file: without override_num_blocks Ray Data splits each task's output into ~100 blocks
    # to reach its default parallelism, which only makes tiny pair shards.
    return ray.data.read_datasource(PreferenceDatasource(), num_cpus=num_cpus, override_num_blocks=len(files))
