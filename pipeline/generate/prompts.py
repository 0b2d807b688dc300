"""The prompt set that generation draws: a user's file, or by default the store's held-apart captions (plus a fixed
list of toy scenes for the toy world).

A prompt file is checked whole before any model loads: an empty or non-text prompt stops the job with the file, the
row and the reason.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import AlignConfig

PROMPT_COLUMNS = ("prompt", "caption")  # the first one a table has is used
TOY_PROMPT_SEED = 7_000_001  # apart from the toy world's data seed and the toy fit's scenes


class PromptFileError(ValueError):
    """A prompt file that cannot be used: the message names the file, the row and the reason."""


def load_prompt_file(path: str | Path) -> list[str]:
    """Prompts from a .txt (one a line), .jsonl (a "prompt" or "caption" key a line) or .parquet file."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"prompt file {path} does not exist (generate.prompts)")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        lines = path.read_text(encoding="utf-8").splitlines()
        values = [line.strip() for line in lines]
        while values and not values[-1]:  # a trailing newline is not an empty prompt
            values.pop()
        return _checked(path, values)
    if suffix in (".jsonl", ".ndjson"):
        values = []
        for row, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as err:
                raise PromptFileError(f"{path} row {row}: not valid JSON ({err})") from err
            key = next((k for k in PROMPT_COLUMNS if isinstance(record, dict) and k in record), None)
            if key is None:
                raise PromptFileError(f"{path} row {row}: no 'prompt' (or 'caption') key")
            values.append(record[key])
        return _checked(path, values)
    if suffix in (".parquet", ".pq"):
        table = pq.read_table(path)
        key = next((k for k in PROMPT_COLUMNS if k in table.column_names), None)
        if key is None:
            raise PromptFileError(f"{path}: no 'prompt' (or 'caption') column; columns are {table.column_names}")
        return _checked(path, table.column(key).to_pylist())
    raise PromptFileError(f"prompt file {path}: expected .txt, .jsonl or .parquet")


def _checked(path: Path, values: list) -> list[str]:
    for row, value in enumerate(values):
        if not isinstance(value, str):
            raise PromptFileError(f"{path} row {row}: prompt is {type(value).__name__} {value!r}, not text")
        if not value.strip():
            raise PromptFileError(f"{path} row {row}: empty prompt")
    if not values:
        raise PromptFileError(f"{path}: no prompts")
    return [v.strip() for v in values]


def toy_prompts(count: int) -> list[str]:
    """A fixed list of toy-world scene captions, the same in every run."""
    from pipeline.data.toy import random_scene

    rng = np.random.default_rng(TOY_PROMPT_SEED)
    prompts: list[str] = []
    while len(prompts) < count:
        caption = random_scene(rng).caption
        if caption not in prompts:
            prompts.append(caption)
    return prompts


def holdout_captions(store_uri: str, count: int) -> list[str]:
    """Up to ``count`` distinct captions of the store's held-apart pairs, in a fixed order (by caption hash)."""
    from pipeline.precompute.store import FeatureStore

    store = FeatureStore(store_uri)
    manifest = store.read_manifest()
    if manifest is None:
        return []
    pairs = store.read_table(manifest, "pairs", columns=["caption_hash", "split"])
    hashes = sorted(set(pairs.filter(pc.equal(pairs.column("split"), "holdout")).column("caption_hash").to_pylist()))
    texts = store.read_table(manifest, "texts", columns=["caption_hash", "caption"], keys=hashes[:count])
    by_hash = dict(zip(texts.column("caption_hash").to_pylist(), texts.column("caption").to_pylist()))
    return [by_hash[h] for h in hashes[:count] if h in by_hash and by_hash[h].strip()]


def prompt_set(cfg: AlignConfig) -> list[str]:
    """What to generate: generate.prompts if set, else held-apart captions + (toy world) fixed toy scenes."""
    g = cfg.generate
    if g.prompts:
        return load_prompt_file(g.prompts)[: g.num_prompts]
    prompts = holdout_captions(cfg.store_uri, g.num_prompts)
    if cfg.data.source == "toy":
        prompts += [p for p in toy_prompts(g.num_prompts) if p not in prompts]
    if not prompts:
        raise PromptFileError(
            f"no prompts to generate: the feature store {cfg.store_uri} has no held-apart captions "
            f"(run precompute, or set data.holdout_fraction > 0) and generate.prompts is not set "
            f"(a .txt, .jsonl or .parquet file of prompts)"
        )
    return prompts
