"""Which adapters the store serves, and resolving a name to one: listing, manifests, steady reads.

`StoreIndex` holds the manifest of every verified adapter folder and, for each entry found but not
served, the reason (a failed hash, a symlink, a foreign base...). It is filled by scanning the store
folder after `layout.recover`, kept current by uploads and deletes, and re-read per name by `refresh`
for a store shared by several servers. It also holds the two locks every writer takes: `mutating`
(one install / delete / refresh at a time) and `renaming()` (a rename waits for the folder reads that
`reading()` holds, so a load never sees a folder move under it).

Versions: `next_version(name)` is above every version of `name` this index has seen (served, deleted
here, or found gone by `refresh`), the on-disk record (versions.py) and the manifest of the folder on
disk now, so a (name, version) never names two uploads, across deletes, restarts and processes.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from adapterserve.server.errors import AdapterValidationError, NotFoundError, ServeError
from adapterserve.server.store.locks import ReadWriteLock
from adapterserve.server.store.manifest import Manifest, verify_dir
from adapterserve.server.store.names import is_valid_name, validate_name
from adapterserve.server.store.validator import AdapterValidator, ValidatedAdapter
from adapterserve.server.store.versions import folder_version, read_record


class StoreIndex:
    """The served manifests of one store folder and the entries it does not serve. Thread-safe."""

    def __init__(self, root: Path, base_fingerprint: str | None) -> None:
        """Scan `root` (already recovered): verify every adapter folder, note why others are not served."""
        self.root = root
        self.base_fingerprint = base_fingerprint
        self._manifests: dict[str, Manifest] = {}
        self._failed: dict[str, str] = {}
        self._last_version: dict[str, int] = {}  # of names deleted or found gone (besides the record)
        self.mutating = threading.Lock()  # one install / delete / refresh at a time
        self._folders = ReadWriteLock()  # loads read folders; renames exclude them
        for entry in sorted(os.scandir(root), key=lambda e: e.name):
            n = entry.name
            if n.startswith("."):
                continue
            if entry.is_symlink():
                self._failed[n] = f"store entry {n!r} is a symlink; symlinks are never followed"
            elif not entry.is_dir(follow_symlinks=False):
                self._failed[n] = f"store entry {n!r} is not an adapter folder"
            elif not is_valid_name(n):
                self._failed[n] = f"store folder {n[:80]!r} is not a valid adapter name"
            else:
                try:
                    self._manifests[n] = self._verify(root / n, n)
                except (ServeError, OSError) as err:
                    self._failed[n] = f"adapter {n!r} failed verification: {err}"

    def _verify(self, path: Path, name: str) -> Manifest:
        return verify_dir(path, name, self.base_fingerprint)

    # ------------------------------------------------------------------ listing
    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._manifests

    def __len__(self) -> int:
        return len(self._manifests)

    def names(self) -> list[str]:
        """Served adapter names, sorted."""
        return sorted(self._manifests)

    def list(self) -> list[Manifest]:
        """Manifests of the served adapters, in name order."""
        manifests = dict(self._manifests)
        return [manifests[n] for n in sorted(manifests)]

    @property
    def failed(self) -> dict[str, str]:
        """Entries found in the store but not served, with the reason."""
        return dict(self._failed)

    # ------------------------------------------------------------------ resolving a name
    def manifest(self, name: str) -> Manifest:
        """The manifest of a served adapter; NotFoundError otherwise (the message says why)."""
        validate_name(name)
        manifest = self._manifests.get(name)
        if manifest is None:
            reason = self._failed.get(name)
            if reason is not None:
                raise NotFoundError(f"adapter {name!r} is in the store but not served: {reason}")
            raise NotFoundError(f"adapter {name!r} not found")
        return manifest

    def current(self, name: str) -> Manifest | None:
        """The served manifest of `name`, or None (no name check, no error: for cache bookkeeping)."""
        return self._manifests.get(name)

    @contextmanager
    def reading(self, name: str) -> Iterator[tuple[Path, Manifest]]:
        """Hold the adapter's folder steady (no replace/delete rename) while it is read."""
        with self._folders.read():
            manifest = self.manifest(name)
            yield self.root / name, manifest

    def load(
        self, name: str, validate: AdapterValidator, *, verify: bool = True
    ) -> tuple[Manifest, ValidatedAdapter]:
        """Load a served adapter with `validate` (blocking). With `verify`, files are re-hashed first."""
        with self.reading(name) as (path, manifest):
            if verify:
                try:
                    self._verify(path, name)
                except AdapterValidationError as err:
                    raise AdapterValidationError(f"adapter {name!r} changed on disk: {err}") from None
            return manifest, validate(path)

    def verify(self, name: str) -> Manifest:
        """Re-hash a served adapter's files against its manifest (AdapterValidationError on mismatch)."""
        with self.reading(name) as (path, _):
            return self._verify(path, name)

    def refresh(self, name: str) -> Manifest:
        """Re-read one entry from disk (another process sharing the folder may have changed it):
        verify it against its manifest and serve what is there now. Raises NotFoundError.
        An entry found gone is forgotten as a delete here would be: its version is remembered."""
        validate_name(name)
        path = self.root / name
        with self.mutating:
            if os.path.islink(path) or not os.path.isdir(path):
                self.removed(name)
            else:
                try:
                    manifest = self._verify(path, name)
                except (ServeError, OSError) as err:
                    self._manifests.pop(name, None)
                    self._failed[name] = f"adapter {name!r} failed verification: {err}"
                else:
                    current = self._manifests.get(name)
                    if current is None or current.uid != manifest.uid:
                        self._manifests[name] = manifest
                    self._failed.pop(name, None)
        return self.manifest(name)

    # ------------------------------------------------------------------ for writers (hold `mutating`)
    def renaming(self) -> AbstractContextManager[Any]:
        """Exclusive against `reading`: hold it around a rename of a served folder."""
        return self._folders.write()

    def has_entry(self, name: str) -> bool:
        """Whether `name` is served or was found but not served."""
        return name in self._manifests or name in self._failed

    def known_version(self, name: str) -> int:
        """The highest version of `name` known here or on disk (0 if none): served, deleted or found
        gone in this process, the on-disk record, the manifest of the folder now at `root/name`."""
        old = self._manifests.get(name)
        return max(
            old.version if old else 0,
            self._last_version.get(name, 0),
            read_record(self.root, name),
            folder_version(self.root / name),
        )

    def next_version(self, name: str) -> int:
        """The version the next upload of `name` gets: above any it ever had (`known_version`)."""
        return self.known_version(name) + 1

    def served(self, name: str, manifest: Manifest) -> None:
        """Record a folder just renamed into place."""
        self._manifests[name] = manifest
        self._failed.pop(name, None)

    def removed(self, name: str) -> Manifest | None:
        """Forget a folder just renamed away; returns its manifest (None when it was not served)."""
        old = self._manifests.pop(name, None)
        self._failed.pop(name, None)
        if old is not None:
            self._last_version[name] = max(old.version, self._last_version.get(name, 0))
        return old
