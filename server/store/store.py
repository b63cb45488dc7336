"""The adapter store: a directory with one folder per adapter, in PEFT format plus a manifest.

Layout (`root/`):
    <name>/adapter_config.json, adapter_model.safetensors, manifest.json   a served adapter
    .upload-<hex>/                                                         an upload in progress
    .replaced-<hex32>-<name>/                                              the old folder during a replace
    .deleted-<hex32>-<name>/                                               a folder being deleted

Every change is a rename inside `root` (atomic on POSIX), after the new files are fsynced:
- put:     write + fsync into .upload-*, validate, then rename to <name>;
- replace: rename <name> to .replaced-*-<name>, rename the upload to <name>, remove the old one;
- delete:  rename <name> to .deleted-*-<name>, then remove it.
A crash at any point leaves the old or the new state: at start, .upload-* and .deleted-* folders are
removed, and a .replaced-*-<name> folder is renamed back to <name> if the new one never got there
(else removed). Every adapter is then re-hashed against its manifest; one that fails is reported in
`failed` and not served. Symlinks are never followed: a symlinked entry is reported, never read.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import stat
import threading
import uuid
from collections.abc import AsyncIterable, Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from adapterserve.server.adapters.types import AdapterInfo
from adapterserve.server.errors import (
    AdapterValidationError,
    AlreadyExistsError,
    BaseMismatchError,
    InvalidArgumentError,
    NotFoundError,
    ServeError,
)
from adapterserve.server.store.locks import ReadWriteLock
from adapterserve.server.store.manifest import MANIFEST_FILE, MAX_MANIFEST_BYTES, Manifest, sha256_file
from adapterserve.server.store.names import is_valid_name, validate_name
from adapterserve.server.store.upload import ACCEPTED_FILES, UploadSession

log = logging.getLogger(__name__)

UPLOAD_PREFIX = ".upload-"
REPLACED_PREFIX = ".replaced-"
DELETED_PREFIX = ".deleted-"
PINS_FILE = ".pins.json"  # names pinned through the admin API, kept across restarts
MAX_DESCRIPTION_CHARS = 1024


class ValidatedAdapter(Protocol):
    """What the injected validator returns (the loader's LoadedAdapter satisfies it)."""

    @property
    def info(self) -> AdapterInfo: ...

    @property
    def nbytes(self) -> int: ...


# Loads and validates an adapter folder against the served base (shapes, caps, fingerprint), raising
# AdapterValidationError / UnsupportedAdapterError / BaseMismatchError. In the server this is
# functools.partial(load_adapter_dir, spec=base.spec, settings=settings.engine).
AdapterValidator = Callable[[Path], ValidatedAdapter]


@dataclass(frozen=True)
class ScanReport:
    """What opening the store found."""

    served: tuple[str, ...]  # adapters verified and served
    failed: dict[str, str]  # entry name -> why it is not served
    cleaned: tuple[str, ...]  # leftover temporary folders removed
    restored: tuple[str, ...]  # adapters rolled back from an interrupted replace


@dataclass(frozen=True)
class CommitResult:
    """A stored upload."""

    manifest: Manifest
    replaced: Manifest | None  # the previous version, when the name was overwritten
    received_bytes: int
    validated: ValidatedAdapter | None = None  # what the validator returned (ready for the host cache)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_small_file(path: Path, limit: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise AdapterValidationError(f"{path.name} is not a regular file")
        data = os.read(fd, limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise AdapterValidationError(f"{path.name} is larger than {limit} bytes")
    return data


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
        self._validate = validate
        self._manifests: dict[str, Manifest] = {}
        self._failed: dict[str, str] = {}
        self._last_version: dict[str, int] = {}  # of deleted names, so versions never repeat in-process
        self._mutate = threading.Lock()  # one install / delete at a time
        self._rw = ReadWriteLock()  # loads read folders; renames exclude them
        self.scan_report = self._open()

    # ------------------------------------------------------------------ opening
    def _open(self) -> ScanReport:
        cleaned: list[str] = []
        restored: list[str] = []
        for entry in sorted(os.scandir(self.root), key=lambda e: e.name):
            n = entry.name
            if n.startswith((UPLOAD_PREFIX, DELETED_PREFIX)):
                self._remove_tree(self.root / n)
                cleaned.append(n)
            elif (
                n.startswith(PINS_FILE + ".") and n.endswith(".tmp") and entry.is_file(follow_symlinks=False)
            ):
                os.unlink(self.root / n)  # a pins write that never got renamed into place
                cleaned.append(n)
            elif n.startswith(REPLACED_PREFIX):
                name = n[len(REPLACED_PREFIX) + 33 :]
                live = self.root / name
                if is_valid_name(name) and not os.path.lexists(live):
                    os.rename(self.root / n, live)  # the new version never arrived: roll back
                    restored.append(name)
                else:
                    self._remove_tree(self.root / n)
                    cleaned.append(n)
        if cleaned or restored:
            _fsync_dir(self.root)

        for entry in sorted(os.scandir(self.root), key=lambda e: e.name):
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
                    self._manifests[n] = self._verify_dir(self.root / n, n)
                except (ServeError, OSError) as err:
                    self._failed[n] = f"adapter {n!r} failed verification: {err}"
        return ScanReport(tuple(sorted(self._manifests)), dict(self._failed), tuple(cleaned), tuple(restored))

    def _verify_dir(self, path: Path, name: str) -> Manifest:
        """Read the manifest and re-hash every file against it. Raises AdapterValidationError."""
        manifest = Manifest.from_bytes(_read_small_file(path / MANIFEST_FILE, MAX_MANIFEST_BYTES))
        if manifest.name != name:
            raise AdapterValidationError(f"manifest names {manifest.name!r}, not the folder {name!r}")
        expected = set(manifest.files)
        if expected != set(ACCEPTED_FILES):
            raise AdapterValidationError(
                f"manifest lists {sorted(expected)}, expected {list(ACCEPTED_FILES)}"
            )
        present = set(os.listdir(path)) - {MANIFEST_FILE}
        if present != expected:
            extra, missing = sorted(present - expected), sorted(expected - present)
            raise AdapterValidationError(f"files differ from the manifest (extra {extra}, missing {missing})")
        for fname, entry in manifest.files.items():
            fpath = path / fname
            if not stat.S_ISREG(os.lstat(fpath).st_mode):
                raise AdapterValidationError(f"{fname} is not a regular file")
            found = sha256_file(fpath)
            if found.size != entry.size:
                raise AdapterValidationError(f"{fname} is {found.size} bytes; the manifest says {entry.size}")
            if found.sha256 != entry.sha256:
                raise AdapterValidationError(
                    f"{fname} sha256 is {found.sha256[:16]}..., the manifest says {entry.sha256[:16]}..."
                )
        self._check_base(manifest.base_fingerprint, f"adapter {name!r}")
        return manifest

    def _check_base(self, fingerprint: str | None, what: str) -> None:
        if fingerprint and self.base_fingerprint and fingerprint != self.base_fingerprint:
            raise BaseMismatchError(
                f"{what} was made for base {fingerprint[:16]}..., this server serves {self.base_fingerprint[:16]}..."
            )

    @staticmethod
    def _remove_tree(path: Path) -> None:
        """Remove a store folder. shutil.rmtree never follows symlinks (it unlinks them)."""
        if path.is_symlink() or not path.is_dir():
            path.unlink(missing_ok=True)
        else:
            shutil.rmtree(path, ignore_errors=True)

    # ------------------------------------------------------------------ reading
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

    # ------------------------------------------------------------------ pins
    def pinned_names(self) -> list[str]:
        """Names pinned by the admin API (persisted in PINS_FILE), that are still stored."""
        path = self.root / PINS_FILE
        try:
            raw = json.loads(_read_small_file(path, MAX_MANIFEST_BYTES))
        except FileNotFoundError:
            return []
        except (OSError, ValueError, ServeError) as err:
            log.warning("ignoring unreadable %s: %s", PINS_FILE, err)
            return []
        names = raw.get("pinned", []) if isinstance(raw, dict) else []
        return sorted(n for n in names if isinstance(n, str) and is_valid_name(n) and n in self._manifests)

    def save_pins(self, names: set[str]) -> None:
        """Persist the pinned names atomically (temp file, fsync, rename, fsync of the folder)."""
        tmp = self.root / f"{PINS_FILE}.{uuid.uuid4().hex}.tmp"
        data = json.dumps({"pinned": sorted(names)}, indent=1).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.root / PINS_FILE)
        _fsync_dir(self.root)

    def refresh(self, name: str) -> Manifest:
        """Re-read one entry from disk, for a store directory shared by several servers (Ray Serve
        replicas): another process may have written, replaced or deleted it since this one opened.

        Verifies the folder against its manifest (hashing its files) and serves what is there now.
        Raises NotFoundError (not there, or not servable: the message says why).
        """
        validate_name(name)
        path = self.root / name
        with self._mutate:
            if os.path.islink(path) or not os.path.isdir(path):
                self._manifests.pop(name, None)
                self._failed.pop(name, None)
            else:
                try:
                    manifest = self._verify_dir(path, name)
                except (ServeError, OSError) as err:
                    self._manifests.pop(name, None)
                    self._failed[name] = f"adapter {name!r} failed verification: {err}"
                else:
                    current = self._manifests.get(name)
                    if current is None or current.uid != manifest.uid:
                        self._manifests[name] = manifest
                    self._failed.pop(name, None)
        return self.manifest(name)

    def current(self, name: str) -> Manifest | None:
        """The served manifest of `name`, or None (no name check, no error: for cache bookkeeping)."""
        return self._manifests.get(name)

    @contextmanager
    def reading(self, name: str) -> Iterator[tuple[Path, Manifest]]:
        """Hold the adapter's folder steady (no replace/delete rename) while it is read."""
        with self._rw.read():
            manifest = self.manifest(name)
            yield self.root / name, manifest

    def load(self, name: str, *, verify: bool = True) -> tuple[Manifest, ValidatedAdapter]:
        """Load a served adapter with the validator (blocking). With `verify`, files are re-hashed first."""
        with self.reading(name) as (path, manifest):
            if verify:
                try:
                    self._verify_dir(path, name)
                except AdapterValidationError as err:
                    raise AdapterValidationError(f"adapter {name!r} changed on disk: {err}") from None
            return manifest, self._validate(path)

    # ------------------------------------------------------------------ writing
    def begin_upload(
        self,
        name: str,
        *,
        overwrite: bool = False,
        description: str = "",
        base_fingerprint: str | None = None,
        max_bytes: int | None = None,
    ) -> UploadSession:
        """Start an upload. Refuses a bad name, a taken name (without `overwrite`) or a foreign base now,
        before any byte is written. Feed it with `write(filename, chunk)` then `commit()`."""
        validate_name(name)
        if not isinstance(description, str) or len(description) > MAX_DESCRIPTION_CHARS:
            raise InvalidArgumentError(
                f"description must be a string of at most {MAX_DESCRIPTION_CHARS} characters"
            )
        if not overwrite and os.path.lexists(self.root / name):
            raise AlreadyExistsError(f"adapter {name!r} already exists (upload with overwrite to replace it)")
        self._check_base(base_fingerprint, "the uploaded adapter")
        cap = self.max_adapter_bytes if max_bytes is None else min(max_bytes, self.max_adapter_bytes)
        tmp = self.root / f"{UPLOAD_PREFIX}{uuid.uuid4().hex}"
        tmp.mkdir(mode=0o755)
        return UploadSession(
            self,
            name,
            tmp,
            overwrite=overwrite,
            description=description,
            base_fingerprint=base_fingerprint,
            max_bytes=cap,
        )

    def _install_upload(self, session: UploadSession, files: dict) -> CommitResult:
        """Validate the session's folder and rename it into place (called by UploadSession.commit)."""
        name, tmp = session.name, session.tmp_dir
        _fsync_dir(tmp)
        validated = self._validate(tmp)
        with self._mutate:
            old = self._manifests.get(name)
            exists = os.path.lexists(self.root / name)
            if exists and not session.overwrite:
                raise AlreadyExistsError(
                    f"adapter {name!r} already exists (upload with overwrite to replace it)"
                )
            previous = max(old.version if old else 0, self._last_version.get(name, 0))
            manifest = Manifest.build(
                name=name,
                version=previous + 1,
                uid=uuid.uuid4().hex,
                info=validated.info,
                files=files,
                base_fingerprint=self.base_fingerprint or session.base_fingerprint,
                description=session.description,
            )
            mpath = tmp / MANIFEST_FILE
            fd = os.open(mpath, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
            try:
                os.write(fd, manifest.to_bytes())
                os.fsync(fd)
            finally:
                os.close(fd)
            _fsync_dir(tmp)
            with self._rw.write():
                live = self.root / name
                if exists:
                    parked = self.root / f"{REPLACED_PREFIX}{uuid.uuid4().hex}-{name}"
                    os.rename(live, parked)
                    os.rename(tmp, live)
                    _fsync_dir(self.root)
                    self._remove_tree(parked)
                else:
                    os.rename(tmp, live)
                    _fsync_dir(self.root)
                self._manifests[name] = manifest
                self._failed.pop(name, None)
        return CommitResult(
            manifest=manifest, replaced=old, received_bytes=session.received_bytes, validated=validated
        )

    def upload(
        self,
        name: str,
        files: Iterable[tuple[str, bytes]],
        *,
        overwrite: bool = False,
        description: str = "",
        base_fingerprint: str | None = None,
        max_bytes: int | None = None,
    ) -> CommitResult:
        """Store an adapter from (file name, chunk) pairs (blocking)."""
        with self.begin_upload(
            name,
            overwrite=overwrite,
            description=description,
            base_fingerprint=base_fingerprint,
            max_bytes=max_bytes,
        ) as session:
            for filename, chunk in files:
                session.write(filename, chunk)
            return session.commit()

    async def upload_async(
        self,
        name: str,
        files: AsyncIterable[tuple[str, bytes]],
        *,
        overwrite: bool = False,
        description: str = "",
        base_fingerprint: str | None = None,
        max_bytes: int | None = None,
    ) -> CommitResult:
        """Store an adapter from an async stream of (file name, chunk) pairs (e.g. gRPC messages)."""
        session = await asyncio.to_thread(
            self.begin_upload,
            name,
            overwrite=overwrite,
            description=description,
            base_fingerprint=base_fingerprint,
            max_bytes=max_bytes,
        )
        try:
            async for filename, chunk in files:
                await asyncio.to_thread(session.write, filename, chunk)
            return await asyncio.to_thread(session.commit)
        finally:
            await asyncio.to_thread(session.abort)

    def put_dir(
        self,
        src: Path,
        name: str,
        *,
        overwrite: bool = False,
        description: str = "",
        base_fingerprint: str | None = None,
        chunk_bytes: int = 1 << 20,
    ) -> CommitResult:
        """Store a local PEFT adapter folder (its adapter_config.json and adapter_model.safetensors;
        other files such as PEFT's README.md are not sent)."""

        def chunks() -> Iterator[tuple[str, bytes]]:
            for fname in ACCEPTED_FILES:
                path = Path(src) / fname
                if not path.is_file():
                    continue
                with open(path, "rb") as f:
                    while data := f.read(chunk_bytes):
                        yield fname, data

        return self.upload(
            name, chunks(), overwrite=overwrite, description=description, base_fingerprint=base_fingerprint
        )

    def delete(self, name: str) -> Manifest | None:
        """Remove an adapter atomically; returns its manifest (None for an entry that was not served)."""
        validate_name(name)
        with self._mutate:
            live = self.root / name
            if name not in self._manifests and name not in self._failed:
                raise NotFoundError(f"adapter {name!r} not found")
            with self._rw.write():
                parked = self.root / f"{DELETED_PREFIX}{uuid.uuid4().hex}-{name}"
                os.rename(live, parked)
                _fsync_dir(self.root)
                old = self._manifests.pop(name, None)
                self._failed.pop(name, None)
                if old is not None:
                    self._last_version[name] = old.version
            self._remove_tree(parked)
        return old

    def verify(self, name: str) -> Manifest:
        """Re-hash a served adapter's files against its manifest (AdapterValidationError on mismatch)."""
        with self.reading(name) as (path, _):
            return self._verify_dir(path, name)
