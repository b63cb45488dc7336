"""The adapter store: a directory with one folder per adapter, in PEFT format plus a manifest.

`AdapterStore` is the one object the server, the registry and the tests use; it opens the store and
hands each call to the module whose job it is:
- layout.py    the folder layout, the renames that change it and their undo at start (`recover`), pins;
- manifest.py  manifest.json, and re-hashing a folder against it (`verify_dir`);
- lookup.py    what is served (`StoreIndex`): listing, resolving a name, steady reads, loads, refresh;
- upload.py    staging an upload, validating it and publishing it with one rename;
- versions.py  the on-disk record of each name's highest version.
Deleting, a short rename under the index's locks, is done here.

Versions: a name's version goes up with every upload and never repeats, whichever process wrote or
deleted it and across restarts: every put, replace and delete first raises the name's record in
.versions/ (written atomically, kept after the delete), and the next upload is numbered above it, above
the folder on disk and above what this process saw (including entries `refresh` found gone). Across
processes this holds for the documented single writer (writes one after another, not concurrently).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from adapterserve.server.errors import NotFoundError
from adapterserve.server.store.layout import (
    DELETED_PREFIX,
    PINS_FILE,
    REPLACED_PREFIX,
    UPLOAD_PREFIX,
    park_for_delete,
    read_pins,
    recover,
    remove_tree,
    write_pins,
)
from adapterserve.server.store.lookup import StoreIndex
from adapterserve.server.store.manifest import FileEntry, Manifest
from adapterserve.server.store.names import validate_name
from adapterserve.server.store.upload import (
    MAX_DESCRIPTION_CHARS,
    CommitResult,
    UploadRequest,
    UploadSession,
    adapter_dir_chunks,
    begin_upload,
    publish_upload,
)
from adapterserve.server.store.validator import AdapterValidator, ValidatedAdapter
from adapterserve.server.store.versions import raise_record

log = logging.getLogger(__name__)

# Names other packages import from here (they predate the split into layout/lookup/upload).
__all__ = [
    "DELETED_PREFIX",
    "MAX_DESCRIPTION_CHARS",
    "UploadRequest",
    "PINS_FILE",
    "REPLACED_PREFIX",
    "UPLOAD_PREFIX",
    "AdapterStore",
    "AdapterValidator",
    "CommitResult",
    "ScanReport",
    "ValidatedAdapter",
]


@dataclass(frozen=True)
class ScanReport:
    """What opening the store found."""

    served: tuple[str, ...]  # adapters verified and served
    failed: dict[str, str]  # entry name -> why it is not served
    cleaned: tuple[str, ...]  # leftover temporary folders removed
    restored: tuple[str, ...]  # adapters rolled back from an interrupted replace


def _abort_begun(begin: asyncio.Future[UploadSession]) -> None:
    """Abort the session a cancelled `upload_async` was still beginning, once it is made."""
    if not begin.cancelled() and begin.exception() is None:
        begin.result().abort()


class AdapterStore:
    """Adapters on disk. Thread-safe; the async helpers run blocking work in threads.

    The store is opened (cleaned, recovered, verified) when constructed; see `scan_report`.
    """

    def __init__(
        self,
        root: Path,
        validate: AdapterValidator,
        *,
        base_fingerprint: str | None = None,
        max_adapter_bytes: int = 512 << 20,
    ) -> None:
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        self.root = root.resolve()
        self.base_fingerprint = base_fingerprint
        self.max_adapter_bytes = max_adapter_bytes
        self._validate = validate  # looked up per call (tests swap it)
        cleaned, restored = recover(self.root)
        log.info(
            "store %s: removed %d temporary entries left by an interrupted run; rolled back %d "
            "interrupted replace(s)",
            self.root,
            len(cleaned),
            len(restored),
        )
        self._index = StoreIndex(self.root, base_fingerprint)
        self.scan_report = ScanReport(tuple(self._index.names()), self._index.failed, cleaned, restored)

    # ------------------------------------------------------------------ reading (lookup.py)
    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __len__(self) -> int:
        return len(self._index)

    def names(self) -> list[str]:
        """Served adapter names, sorted."""
        return self._index.names()

    def list(self) -> list[Manifest]:
        """Manifests of the served adapters, in name order."""
        return self._index.list()

    @property
    def failed(self) -> dict[str, str]:
        """Entries found in the store but not served, with the reason."""
        return self._index.failed

    def manifest(self, name: str) -> Manifest:
        """The manifest of a served adapter; NotFoundError otherwise (the message says why)."""
        return self._index.manifest(name)

    def current(self, name: str) -> Manifest | None:
        """The served manifest of `name`, or None (no name check, no error: for cache bookkeeping)."""
        return self._index.current(name)

    def refresh(self, name: str) -> Manifest:
        """Re-read one entry from disk, for a store directory shared by several servers (Ray Serve
        replicas): another process may have written, replaced or deleted it since this one opened.

        Verifies the folder against its manifest (hashing its files) and serves what is there now.
        Raises NotFoundError (not there, or not servable: the message says why).
        """
        return self._index.refresh(name)

    def reading(self, name: str) -> AbstractContextManager[tuple[Path, Manifest]]:
        """Hold the adapter's folder steady (no replace/delete rename) while it is read."""
        return self._index.reading(name)

    def load(self, name: str, *, verify: bool = True) -> tuple[Manifest, ValidatedAdapter]:
        """Load a served adapter with the validator (blocking). With `verify`, files are re-hashed first."""
        return self._index.load(name, self._validate, verify=verify)

    def verify(self, name: str) -> Manifest:
        """Re-hash a served adapter's files against its manifest (AdapterValidationError on mismatch)."""
        return self._index.verify(name)

    def next_version(self, name: str) -> int:
        """The version the next new content of `name` gets: above any it ever had (lookup.py)."""
        with self._index.mutating:
            return self._index.next_version(name)

    def reserve_versions(self, name: str, through: int) -> None:
        """Record on disk that versions of `name` up to `through` are issued (versions.py), so no later
        upload, in this process or after a restart, reuses one (in-place updates reserve blocks)."""
        validate_name(name)
        with self._index.mutating:
            raise_record(self.root, name, through)

    # ------------------------------------------------------------------ pins (layout.py)
    def pinned_names(self) -> list[str]:
        """Names pinned by the admin API (persisted in PINS_FILE), that are still stored."""
        return read_pins(self.root, self._index)

    def save_pins(self, names: set[str]) -> None:
        """Persist the pinned names atomically (temp file, fsync, rename, fsync of the folder)."""
        write_pins(self.root, names)

    # ------------------------------------------------------------------ writing (upload.py)
    def begin_upload(self, request: UploadRequest) -> UploadSession:
        """Start an upload. Refuses a taken name (without `overwrite`) or a foreign base now, before any
        byte is written (the request checked its name and description when it was made). Feed it with
        `write(filename, chunk)` then `commit()`."""
        return begin_upload(
            self.root,
            request,
            publish=self._publish,
            served_base=self.base_fingerprint,
            max_adapter_bytes=self.max_adapter_bytes,
        )

    def _publish(self, session: UploadSession, files: dict[str, FileEntry]) -> CommitResult:
        return publish_upload(
            session, files, index=self._index, validate=self._validate, base_fingerprint=self.base_fingerprint
        )

    def upload(self, request: UploadRequest, files: Iterable[tuple[str, bytes]]) -> CommitResult:
        """Store an adapter from (file name, chunk) pairs (blocking)."""
        return self.begin_upload(request).feed(files)

    async def upload_async(
        self, request: UploadRequest, files: AsyncIterable[tuple[str, bytes]]
    ) -> CommitResult:
        """Store an adapter from an async stream of (file name, chunk) pairs (e.g. gRPC messages)."""
        begin = asyncio.ensure_future(asyncio.to_thread(self.begin_upload, request))
        try:
            session = await asyncio.shield(begin)
        except asyncio.CancelledError:  # the thread still makes the upload's folder: drop it once made
            begin.add_done_callback(_abort_begun)
            raise
        return await session.feed_async(files)

    def put_dir(self, src: Path, request: UploadRequest, *, chunk_bytes: int = 1 << 20) -> CommitResult:
        """Store a local PEFT adapter folder (its adapter_config.json and adapter_model.safetensors;
        other files such as PEFT's README.md are not sent)."""
        return self.upload(request, adapter_dir_chunks(src, chunk_bytes))

    def delete(self, name: str) -> Manifest | None:
        """Remove an adapter atomically; returns its manifest (None for an entry that was not served).
        Its version stays recorded (.versions/<name>): a later upload of the name gets a higher one."""
        validate_name(name)
        with self._index.mutating:
            if not self._index.has_entry(name):
                raise NotFoundError(f"adapter {name!r} not found")
            raise_record(self.root, name, self._index.known_version(name))  # a re-upload gets a new version
            with self._index.renaming():
                parked = park_for_delete(self.root, name)
                old = self._index.removed(name)
            remove_tree(parked)
        return old
