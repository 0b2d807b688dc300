"""The normalised preference schema, the quarantine schema and the content hashes that key everything.

A pair row always holds the winner in ``image_w`` and the loser in ``image_l`` (encoded bytes, as read), so no
later stage needs to look at ``label_0`` to know which is which; ``label_0`` is kept for the record (1.0 or 0.0,
or 0.5 for a tie kept with ``drop_ties=False``).
"""

from __future__ import annotations

import hashlib

import pyarrow as pa

PAIR_SCHEMA = pa.schema(
    [
        pa.field("pair_id", pa.string(), nullable=False),
        pa.field("caption", pa.string(), nullable=False),
        pa.field("image_w", pa.binary(), nullable=False),
        pa.field("image_l", pa.binary(), nullable=False),
        pa.field("label_0", pa.float64(), nullable=False),
        pa.field("source", pa.string(), nullable=False),  # the file the row came from
        pa.field("row", pa.int64(), nullable=False),  # 0-based row (JSONL: line) index within that file
    ]
)

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),
        pa.field("row", pa.int64(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),  # one of QUARANTINE_REASONS
        pa.field("detail", pa.string(), nullable=False),
    ]
)

# Stable codes: summaries, dashboards and tests match on these strings.
QUARANTINE_REASONS = (
    "missing_column",
    "bad_caption",
    "bad_label",
    "undecodable_image",
    "truncated_image",
    "decompression_bomb",
    "path_escapes_folder",
    "missing_file",
    "aspect_mismatch",
    "bad_json",
)

# Column sets a preference table may use (Pick-a-Pic names). Images come either inline or as files.
CAPTION_COLUMN = "caption"
LABEL_COLUMN = "label_0"
IMAGE_BYTES_COLUMNS = ("jpg_0", "jpg_1")
IMAGE_PATH_COLUMNS = ("image_0_path", "image_1_path")
ACCEPTED_COLUMN_SETS = (
    (CAPTION_COLUMN, *IMAGE_BYTES_COLUMNS, LABEL_COLUMN),
    (CAPTION_COLUMN, *IMAGE_PATH_COLUMNS, LABEL_COLUMN),
)


def image_hash(data: bytes) -> str:
    """Content key of an image: sha256 hex of its encoded bytes (the same file is the same key everywhere)."""
    return hashlib.sha256(data).hexdigest()


def caption_hash(caption: str) -> str:
    """Content key of a caption: sha256 hex of its utf-8 bytes."""
    return hashlib.sha256(caption.encode("utf-8")).hexdigest()


def pair_id(caption: str, winner: bytes, loser: bytes) -> str:
    """Stable id of one comparison: it depends on what was compared and who won, not on column order.

    The two image hashes have a fixed length, so caption bytes followed by them cannot be ambiguous.
    """
    key = caption.encode("utf-8") + image_hash(winner).encode("ascii") + image_hash(loser).encode("ascii")
    return hashlib.sha256(key).hexdigest()
