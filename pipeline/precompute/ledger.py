"""The run's ledger: one small Ray actor that the read-side tasks consult, so the driver never holds the table.

It knows every key the store already holds (pair ids, caption and image hashes, quarantined rows), read by the
actor itself from the committed shards, and every key claimed so far in this run. A task sends one block's keys
and gets back which pairs are new, which are duplicates of a pair seen earlier in this run, which are already
done, and which captions, images and quarantine rows it must produce: each is produced by exactly one task.
It also adds up the reader's counts and lists the uncommitted pair and quarantine shards the tasks wrote, for
the driver to commit last.

Keys are held as 16-byte digests (a truncated sha256 is still collision-free at any table size a run sees):
about 60 bytes a key, ~200 MB for Pick-a-Pic's million pairs and their images and captions. Beyond that, shard
the ledger by key prefix. Calls are serialised by the actor, so a claim is atomic.
"""

from __future__ import annotations

from typing import Any

import pyarrow.compute as pc

from pipeline.data.schema import QUARANTINE_REASONS
from pipeline.precompute.store import FeatureStore


def digest(hex_key: str) -> bytes:
    return bytes.fromhex(hex_key[:32])


class Ledger:
    def __init__(self, store_uri: str, manifest: dict[str, Any]):
        store = FeatureStore(store_uri)
        quarantine = store.read_table(manifest, "quarantine", columns=["source", "row", "reason", "pair_id"])
        self.done_pairs = {digest(p) for p in store.read_table(manifest, "pairs", columns=["pair_id"])
                           .column("pair_id").to_pylist()}
        self.done_pairs |= {digest(p) for p in pc.drop_null(quarantine.column("pair_id")).to_pylist()}
        self.seen_quarantine = set(zip(*(quarantine.column(c).to_pylist() for c in ("source", "row", "reason"))))
        self.texts = {digest(h) for h in store.read_table(manifest, "texts", columns=["caption_hash"])
                      .column("caption_hash").to_pylist()}
        self.images = {digest(h) for h in store.read_table(manifest, "images", columns=["image_hash"])
                       .column("image_hash").to_pylist()}
        self.seen_pairs: set[bytes] = set()
        self.counts = {"rows": 0, "kept": 0, "ties": 0, "duplicates": 0, "quarantined": 0, "skipped_pairs": 0,
                       "new_pairs": 0, "new_quarantine": 0, "new_texts": 0, "new_images": 0}
        self.by_reason = dict.fromkeys(QUARANTINE_REASONS, 0)
        self.shards: dict[str, list[dict[str, Any]]] = {"pairs": [], "quarantine": []}

    def claim(
        self,
        pairs: list[tuple[str, str, str, str]],
        quarantine: list[tuple[str, int, str]],
        counts: dict[str, Any],
        extra_texts: tuple[str, ...] = (),
    ) -> dict[str, list]:
        """One block's claims. ``pairs``: (pair_id, caption_hash, image_w_hash, image_l_hash) of its good pairs;
        ``quarantine``: (source, row, reason) of its bad rows; ``counts``: its rows, ties and bad rows by reason;
        ``extra_texts``: caption hashes to encode if the store lacks them (the empty caption: prompt dropout).

        Returns ``new_pairs`` and ``new_quarantine`` (one bool per input) and the ``texts`` and ``images`` hashes
        this block must encode.
        """
        self.counts["rows"] += counts["rows"]
        self.counts["ties"] += counts["ties"]
        for reason, n in counts["by_reason"].items():
            self.by_reason[reason] += n
            self.counts["quarantined"] += n
        new_pairs, texts, images = [], [], []
        for pid, text, image_w, image_l in pairs:
            key = digest(pid)
            if key in self.seen_pairs:
                self.counts["duplicates"] += 1
                new_pairs.append(False)
                continue
            self.seen_pairs.add(key)
            self.counts["kept"] += 1
            if key in self.done_pairs:
                self.counts["skipped_pairs"] += 1
                new_pairs.append(False)
                continue
            new_pairs.append(True)
            self.counts["new_pairs"] += 1
            for hex_key, known, out in ((text, self.texts, texts), (image_w, self.images, images),
                                        (image_l, self.images, images)):
                if digest(hex_key) not in known:
                    known.add(digest(hex_key))
                    out.append(hex_key)
        for hex_key in extra_texts:
            if digest(hex_key) not in self.texts:
                self.texts.add(digest(hex_key))
                texts.append(hex_key)
        new_quarantine = []
        for key in quarantine:
            new = key not in self.seen_quarantine
            self.seen_quarantine.add(key)
            new_quarantine.append(new)
        self.counts["new_quarantine"] += sum(new_quarantine)
        self.counts["new_texts"] += len(texts)
        self.counts["new_images"] += len(images)
        return {"new_pairs": new_pairs, "new_quarantine": new_quarantine, "texts": texts, "images": images}

    def add_shards(self, table: str, entries: list[dict[str, Any]]) -> None:
        self.shards[table].extend(entries)

    def result(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "by_reason": dict(self.by_reason), "shards": self.shards}
