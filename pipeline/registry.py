"""The model registry: numbered versions under the storage path, an index naming the promoted one, and a lock.

Layout under the registry URI (``<storage>/<name>/registry`` by default; a local folder, ``s3://`` or ``gs://``)::

    index.json                  {"promoted": "v2", "history": [...]}: the only file promotion changes
    lock.json                   held by the one re-alignment run at work (owner, pid, host, token, created_at)
    prompts.txt                 the fixed prompts every version is generated and judged on
    versions/v<N>/version.json  status, config, data watermark, training metrics, gate decision, where things are
    versions/v<N>/model/        the version's model (a diffusers UNet folder): written once, never changed
    versions/v<N>/eval/         its generated images, scores and report against the model promoted at the time
    versions/v<N>/pairs_seen.parquet, train_pairs.parquet   the store's pairs at the time / the ones trained on

Nothing a user relies on is overwritten in place: a version's model is written once into a new folder, and
promotion is one atomic change of ``index.json`` (written to a temp name, then moved over the old one: a rename
on a local disk; on object stores a server-side copy, so readers see the old index or the new one).

Two overlapping runs cannot both promote: a run holds ``lock.json`` from start to end, and ``promote`` checks both
that it still holds the lock and that the index still names the version it started from (compare-and-swap).
Locally the lock is created with ``O_CREAT | O_EXCL``, which exactly one process wins. pyarrow's object-store
filesystems offer no create-if-absent write, so there the lock is write-then-read-back (the last writer wins and
the others see a foreign token and refuse): a narrow race between two runs starting within the same second
remains. The schedule narrows it only for a doubled trigger of one slot (a deterministic submission id per slot,
cluster/README.md); `concurrencyPolicy: Forbid` does not (its Job ends seconds after submitting), and manual runs
are not covered: this lock is the only overlap guard. A lock older than ``stale_after_s`` is a crashed run's and is
broken.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from pipeline.config import join_uri
from pipeline.storage import exists, filesystem, is_local, read_text, write_text

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
LOCK_NAME = "lock.json"
VERSION_RECORD = "version.json"


class RegistryLockedError(RuntimeError):
    """Another re-alignment run holds the registry's lock."""


class PromotionConflictError(RuntimeError):
    """The index changed under this run (or its lock was broken): it must not promote."""


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat()


def version_name(number: int) -> str:
    return f"v{number}"


def version_number(name: str) -> int:
    if not (name.startswith("v") and name[1:].isdigit()):
        raise ValueError(f"{name!r} is not a version name (v1, v2, ...)")
    return int(name[1:])


@dataclass(frozen=True)
class Lock:
    uri: str
    token: str
    owner: str


class Registry:
    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self.fs, self.root = filesystem(self.uri)

    # ------------------------------------------------------------------------------------------- reading

    def index(self) -> dict[str, Any]:
        uri = join_uri(self.uri, INDEX_NAME)
        if not exists(uri):
            return {"promoted": None, "history": []}
        return json.loads(read_text(uri))

    def promoted(self) -> str | None:
        """The promoted version's name (``"v2"``), or None before the first promotion."""
        return self.index()["promoted"]

    def version_uri(self, name: str) -> str:
        return join_uri(self.uri, "versions", name)

    def model_uri(self, name: str) -> str:
        return join_uri(self.version_uri(name), "model")

    def versions(self) -> list[str]:
        """Version names in order (v1, v2, ...): every folder under versions/, finished or not."""
        selector = pafs.FileSelector(f"{self.root}/versions", allow_not_found=True)
        names = [info.base_name for info in self.fs.get_file_info(selector) if info.type == pafs.FileType.Directory]
        return sorted((n for n in names if n.startswith("v") and n[1:].isdigit()), key=version_number)

    def record(self, name: str) -> dict[str, Any]:
        return json.loads(read_text(join_uri(self.version_uri(name), VERSION_RECORD)))

    def last_decided(self) -> str | None:
        """The newest version that reached a decision (promoted or kept): its data counts as seen. Versions of
        runs that crashed before deciding do not, so their data is trained on again."""
        for name in reversed(self.versions()):
            if exists(join_uri(self.version_uri(name), VERSION_RECORD)) and \
                    self.record(name).get("status") in ("promoted", "kept"):
                return name
        return None

    # ------------------------------------------------------------------------------------------- writing

    def new_version(self) -> str:
        """Create the next version's folder (call with the lock held) and return its name."""
        names = self.versions()
        name = version_name(version_number(names[-1]) + 1 if names else 1)
        self.fs.create_dir(f"{self.root}/versions/{name}", recursive=True)
        return name

    def write_record(self, name: str, record: dict[str, Any]) -> None:
        """The version's record (status and what is known so far); replaced whole, atomically, as the run goes."""
        write_text(join_uri(self.version_uri(name), VERSION_RECORD),
                   json.dumps({**record, "version": name, "updated_at": now_iso()}, indent=1))

    def store_model(self, name: str, model_uri: str) -> str:
        """Copy a trained model folder into the version (once: an existing version model is never replaced)."""
        target = self.model_uri(name)
        if exists(target):
            raise FileExistsError(f"{target} exists; a version's model is written once (start a new version)")
        src_fs, src_path = filesystem(model_uri)
        dst_fs, dst_path = filesystem(target)
        dst_fs.create_dir(dst_path, recursive=True)
        pafs.copy_files(src_path, dst_path, source_filesystem=src_fs, destination_filesystem=dst_fs)
        return target

    def promote(self, name: str, *, expected: str | None, lock: Lock, reason: str = "") -> None:
        """Point the index at ``name``, only if ``lock`` is still held and the index still names ``expected``."""
        if self._lock_holder() != lock.token:
            raise PromotionConflictError(
                f"not promoting {name}: this run no longer holds {lock.uri} (broken as stale by another run?)")
        index = self.index()
        if index["promoted"] != expected:
            raise PromotionConflictError(
                f"not promoting {name}: {join_uri(self.uri, INDEX_NAME)} names {index['promoted']!r}, this run "
                f"started from {expected!r}; another run promoted in between")
        entry = {"version": name, "previous": expected, "at": now_iso(), "by": lock.owner, "reason": reason}
        write_text(join_uri(self.uri, INDEX_NAME),
                   json.dumps({"promoted": name, "history": [*index["history"], entry]}, indent=1))

    # ---------------------------------------------------------------------------------------------- lock

    @contextmanager
    def lock(self, owner: str, *, stale_after_s: float) -> Iterator[Lock]:
        """Hold the registry for one run; raises RegistryLockedError (naming the holder) if another run has it."""
        held = self._acquire(owner, stale_after_s)
        try:
            yield held
        finally:
            if self._lock_holder() == held.token:
                self.fs.delete_file(f"{self.root}/{LOCK_NAME}")

    def _acquire(self, owner: str, stale_after_s: float) -> Lock:
        uri = join_uri(self.uri, LOCK_NAME)
        token = uuid.uuid4().hex
        body = json.dumps({"owner": owner, "pid": os.getpid(), "host": socket.gethostname(), "token": token,
                           "created_at": now_iso(), "created_unix": time.time()}, indent=1)
        self.fs.create_dir(self.root, recursive=True)
        for attempt in range(2):  # the second attempt follows breaking a stale lock
            if self._create_exclusive(body):
                return Lock(uri=uri, token=token, owner=owner)
            current = self._read_lock()
            age = time.time() - self._lock_created(current)
            if attempt == 0 and age > stale_after_s:
                log.warning("breaking the stale lock %s (%.0f s old, held by %s)", uri, age, current.get("owner"))
                self.fs.delete_file(f"{self.root}/{LOCK_NAME}")
                continue
            raise RegistryLockedError(
                f"registry {self.uri} is locked by {current.get('owner')!r} (pid {current.get('pid')} on "
                f"{current.get('host')}, since {current.get('created_at')}): another re-alignment run is at work, "
                f"so this one does nothing. If that run died, delete {uri} or wait until the lock is older than "
                f"{stale_after_s:.0f} s (realign.lock_stale_s)."
            )
        raise AssertionError("unreachable")

    def _create_exclusive(self, body: str) -> bool:
        path = f"{self.root}/{LOCK_NAME}"
        if is_local(self.uri):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as out:
                out.write(body)
            return True
        # Object stores: no create-if-absent in pyarrow; write, then read back (see the module docstring).
        if self.fs.get_file_info(path).type != pafs.FileType.NotFound:
            return False
        with self.fs.open_output_stream(path) as out:
            out.write(body.encode())
        time.sleep(1.0)  # let a concurrent writer's object land before reading back
        return self._lock_holder() == json.loads(body)["token"]

    def _read_lock(self) -> dict[str, Any]:
        try:
            return json.loads(read_text(join_uri(self.uri, LOCK_NAME)))
        except (FileNotFoundError, OSError, ValueError):
            return {}  # gone, or being written this instant: treat as held by an unknown owner

    def _lock_created(self, current: dict[str, Any]) -> float:
        """When the lock was taken: its own record, else (being written this instant) the file's mtime."""
        if "created_unix" in current:
            return float(current["created_unix"])
        info = self.fs.get_file_info(f"{self.root}/{LOCK_NAME}")
        return info.mtime.timestamp() if info.mtime is not None else time.time()

    def _lock_holder(self) -> str | None:
        return self._read_lock().get("token")
