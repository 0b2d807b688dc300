"""Preference tables: readers, the normalised schema, quarantine of bad rows, and the synthetic toy world."""

from pipeline.data.images import BadImage, decode_image
from pipeline.data.readers import PreferenceLoad, PreferenceStream, load_preferences
from pipeline.data.schema import PAIR_SCHEMA, QUARANTINE_REASONS, QUARANTINE_SCHEMA, caption_hash, image_hash

__all__ = [
    "PAIR_SCHEMA",
    "QUARANTINE_REASONS",
    "QUARANTINE_SCHEMA",
    "BadImage",
    "PreferenceLoad",
    "PreferenceStream",
    "caption_hash",
    "decode_image",
    "image_hash",
    "load_preferences",
]
