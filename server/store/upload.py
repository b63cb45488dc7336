"""Uploads into the store: staging in a private folder, validation, and the atomic publish.

`begin_upload` refuses a bad name, a taken name (without overwrite), a long description or a foreign
base before any byte is written, and makes a private .upload-<hex> folder. An `UploadSession` streams
(file name, chunk) pairs into it. Nothing derived from the request reaches the file system unchecked:
each file name is checked against the two names a PEFT adapter has, every byte is counted against the
cap, and files are created with O_EXCL | O_NOFOLLOW inside the folder the store made. `commit()` hands
the files to `publish_upload`, which runs the store's validator once (the loader parses the config
against the allowlist, reads the safetensors file (caps, pickle refusal, the library's format checks)
and checks it against the served base; the adapter it returns goes into the host cache), writes the
manifest and renames the folder into place (layout.move_into_place). Any failure removes the temporary
folder, so a refused upload leaves the store exactly as it was. The new version is above any the name
ever had (`StoreIndex.next_version`) and is recorded on disk before the rename (versions.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import threading
import uuid
from collections.abc import AsyncIterable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from adapterserve.server.adapters.safetensors_check import sniff_pickle
from adapterserve.server.cpu.omp_pools import run_releasing_pool
from adapterserve.server.errors import (
    AdapterValidationError,
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    ResourceExhaustedError,
)
from adapterserve.server.store.layout import (
    ACCEPTED_FILES,
    CONFIG_FILE,
    WEIGHTS_FILE,
    fsync_dir,
    move_into_place,
    new_upload_dir,
)
from adapterserve.server.store.manifest import FileEntry, Manifest, Origin, check_base, write_manifest
from adapterserve.server.store.names import validate_name
from adapterserve.server.store.validator import AdapterValidator, ValidatedAdapter
from adapterserve.server.store.versions import raise_record

if TYPE_CHECKING:
    from adapterserve.server.store.lookup import StoreIndex

# Pickle (and pickle-wrapping) formats, refused by name before a byte is written.
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib", ".npy", ".npz"})
MAX_FILE_NAME_CHARS = 255
MAX_DESCRIPTION_CHARS = 1024


@dataclass(frozen=True)
class CommitResult:
    """A stored upload."""

    manifest: Manifest
    replaced: Manifest | None  # the previous version, when the name was overwritten
    received_bytes: int
    validated: ValidatedAdapter | None = None  # what the validator returned (ready for the host cache)


@dataclass(frozen=True)
class UploadRequest:
    """One upload's envelope, whichever way it came in (the Admin RPC, a local folder, the demo
    adapters), checked once, when it is made: the name and the description. The files follow it.

    base_fingerprint: the base the client says the adapter was made for (refused if it is not the
    served one); max_bytes: the caller's cap on the files (the store's own cap applies as well)."""

    name: str
    overwrite: bool = False
    description: str = ""
    base_fingerprint: str | None = None
    max_bytes: int | None = None
    # None: the next version of the name. Set: publish under this version, which must be above the served
    # one (an in-place updated adapter written to disk keeps the version its responses reported; live.py)
    version: int | None = None
    origin: Origin | None = None

    def __post_init__(self) -> None:
        validate_name(self.name)
        if self.version is not None and (not isinstance(self.version, int) or self.version < 1):
            raise InvalidArgumentError("version must be a positive integer")
        if not isinstance(self.description, str) or len(self.description) > MAX_DESCRIPTION_CHARS:
            raise InvalidArgumentError(
                f"description must be a string of at most {MAX_DESCRIPTION_CHARS} characters"
            )


# What `UploadSession.commit` calls with the session and its files: validate and install them.
Publisher = Callable[["UploadSession", dict[str, FileEntry]], CommitResult]


def check_upload_filename(filename: object) -> str:
    """Return `filename` if an upload may carry it; else AdapterValidationError saying why."""
    if (
        not isinstance(filename, str)
        or not filename
        or len(filename) > MAX_FILE_NAME_CHARS
        or any(c in filename for c in "/\\\0")
        or filename in (".", "..")
    ):
        shown = repr(filename)[:80]
        raise AdapterValidationError(f"file name {shown} is invalid: a plain file name without directories")
    suffix = os.path.splitext(filename)[1].lower()
    if suffix in PICKLE_SUFFIXES:
        raise AdapterValidationError(
            f"file {filename!r} is refused: {suffix} files are pickle, which is never loaded; "
            f"save the adapter with safetensors ({WEIGHTS_FILE})"
        )
    if filename not in ACCEPTED_FILES:
        raise AdapterValidationError(
            f"file {filename!r} is not accepted: an adapter upload holds exactly {CONFIG_FILE} and {WEIGHTS_FILE}"
        )
    return filename


@dataclass
class _OpenFile:
    fd: int
    sha: hashlib._Hash = field(default_factory=hashlib.sha256)
    size: int = 0
    head: bytes = b""


class UploadSession:
    """Writes one upload into a temporary folder of the store. Use as a context manager, or call
    `abort()` on failure; `commit()` installs it atomically. `write`, `commit` and `abort` run one at a
    time: an abort from another thread (a cancelled async upload) waits for a write or commit still
    running, so nothing is written into the folder once its removal has begun."""

    def __init__(self, request: UploadRequest, tmp_dir: Path, *, publish: Publisher, max_bytes: int) -> None:
        """max_bytes: the cap on the files, the request's and the store's together."""
        self.request, self.tmp_dir, self._publish = request, tmp_dir, publish
        self.name, self.max_bytes = request.name, max_bytes
        self.received_bytes = 0
        self._files: dict[str, FileEntry] = {}
        self._current: tuple[str, _OpenFile] | None = None
        self._done = False
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ streaming
    def write(self, filename: str, chunk: bytes) -> None:
        """Append `chunk` to `filename`. Chunks of one file arrive together; a file may not come back."""
        with self._lock:
            if self._done:
                raise RuntimeError("upload session is finished")
            try:
                self._write(filename, bytes(chunk))
            except BaseException:
                self.abort()
                raise

    def _write(self, filename: str, chunk: bytes) -> None:
        check_upload_filename(filename)
        self.received_bytes += len(chunk)
        if self.received_bytes > self.max_bytes:
            raise ResourceExhaustedError(f"upload is larger than the cap of {self.max_bytes} bytes")
        if self._current is None or self._current[0] != filename:
            if filename in self._files:
                raise AdapterValidationError(
                    f"file {filename!r} was sent twice or interleaved with another file"
                )
            self._close_current()
            flags = (
                os.O_WRONLY
                | os.O_CREAT
                | os.O_EXCL
                | getattr(os, "O_NOFOLLOW", 0)
                | getattr(os, "O_CLOEXEC", 0)
            )
            self._current = (filename, _OpenFile(os.open(self.tmp_dir / filename, flags, 0o644)))
        fname, f = self._current
        if len(f.head) < 64:
            f.head += chunk[: 64 - len(f.head)]
            if len(f.head) >= 9:  # refuse a pickle as soon as its first bytes are in, not at the end
                reason = sniff_pickle(f.head, b"", self.max_bytes)
                if reason is not None:
                    raise AdapterValidationError(f"{fname}: holds {reason}; pickle is never loaded")
        view = memoryview(chunk)
        while view:
            written = os.write(f.fd, view)
            view = view[written:]
        f.sha.update(chunk)
        f.size += len(chunk)

    def _close_current(self) -> None:
        if self._current is None:
            return
        fname, f = self._current
        self._current = None
        try:
            os.fsync(f.fd)
        finally:
            os.close(f.fd)
        self._files[fname] = FileEntry(size=f.size, sha256=f.sha.hexdigest())

    # ------------------------------------------------------------------ finishing
    def commit(self) -> CommitResult:
        """Check everything, then install atomically. Raises ServeError subclasses; the store is
        unchanged on any failure."""
        with self._lock:
            if self._done:
                raise RuntimeError("upload session is finished")
            try:
                self._close_current()
                missing = [f for f in ACCEPTED_FILES if f not in self._files]
                if missing:
                    raise AdapterValidationError(f"upload is missing {' and '.join(missing)}")
                return self._publish(self, dict(self._files))  # validates, once
            finally:
                self.abort()  # after a successful install the folder is gone and this is a no-op

    def feed(self, files: Iterable[tuple[str, bytes]]) -> CommitResult:
        """Write every (file name, chunk) pair, then commit (blocking); aborts on any failure."""
        with self:
            for filename, chunk in files:
                self.write(filename, chunk)
            return self.commit()

    async def feed_async(self, files: AsyncIterable[tuple[str, bytes]]) -> CommitResult:
        """`feed` from an async stream (e.g. gRPC messages); the blocking work runs in threads."""
        try:
            async for filename, chunk in files:
                await asyncio.to_thread(self.write, filename, chunk)
            return await run_releasing_pool(self.commit)  # validation parses tensors
        finally:
            await asyncio.to_thread(self.abort)

    def abort(self) -> None:
        """Drop the upload: close files, remove the temporary folder. Safe to call more than once, from
        any thread (it waits for a write or commit in progress)."""
        with self._lock:
            if self._current is not None:
                try:
                    os.close(self._current[1].fd)
                except OSError:
                    pass
                self._current = None
            self._done = True
            if self.tmp_dir.exists():
                shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def __enter__(self) -> UploadSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()


def begin_upload(
    root: Path,
    request: UploadRequest,
    *,
    publish: Publisher,
    served_base: str | None,
    max_adapter_bytes: int,
) -> UploadSession:
    """Check what can be checked before any byte is written, then make the upload's private folder."""
    if not request.overwrite and os.path.lexists(root / request.name):
        raise AlreadyExistsError(
            f"adapter {request.name!r} already exists (upload with overwrite to replace it)"
        )
    check_base(request.base_fingerprint, served_base, "the uploaded adapter")
    cap = max_adapter_bytes if request.max_bytes is None else min(request.max_bytes, max_adapter_bytes)
    return UploadSession(request, new_upload_dir(root), publish=publish, max_bytes=cap)


def publish_upload(
    session: UploadSession,
    files: dict[str, FileEntry],
    *,
    index: StoreIndex,
    validate: AdapterValidator,
    base_fingerprint: str | None,
) -> CommitResult:
    """Validate the session's folder, write its manifest and rename it into place atomically."""
    name, tmp, root = session.name, session.tmp_dir, index.root
    fsync_dir(tmp)
    validated = validate(tmp)
    with index.mutating:
        old = index.current(name)
        exists = os.path.lexists(root / name)
        if exists and not session.request.overwrite:
            raise AlreadyExistsError(f"adapter {name!r} already exists (upload with overwrite to replace it)")
        version = session.request.version or index.next_version(name)
        if version <= (old.version if old else 0):
            raise FailedPreconditionError(
                f"adapter {name!r} is served at version {old.version if old else 0}; cannot store version {version}"
            )
        manifest = Manifest.build(
            name=name,
            version=version,
            uid=uuid.uuid4().hex,
            info=validated.info,
            files=files,
            base_fingerprint=base_fingerprint or session.request.base_fingerprint,
            description=session.request.description,
            origin=session.request.origin,
        )
        write_manifest(tmp, manifest)
        fsync_dir(tmp)
        raise_record(root, name, manifest.version)  # durable before the rename: versions never repeat
        with index.renaming():
            move_into_place(root, tmp, name, replace=exists)
            index.served(name, manifest)
    return CommitResult(
        manifest=manifest, replaced=old, received_bytes=session.received_bytes, validated=validated
    )


def adapter_dir_chunks(src: Path, chunk_bytes: int) -> Iterator[tuple[str, bytes]]:
    """(file name, chunk) pairs of a local PEFT adapter folder's accepted files (others are not sent)."""
    for fname in ACCEPTED_FILES:
        path = Path(src) / fname
        if not path.is_file():
            continue
        with open(path, "rb") as f:
            while data := f.read(chunk_bytes):
                yield fname, data
