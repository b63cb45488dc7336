"""One upload in progress: (file name, chunk) pairs streamed into a private temporary folder.

Nothing derived from the request reaches the file system unchecked: each file name is checked against
the two names a PEFT adapter has, every byte is counted against the cap, and files are created with
O_EXCL | O_NOFOLLOW inside a folder the store made. `commit()` checks the files (pickle refusal, config
the store's validator, once: the loader parses the config against the allowlist, reads the
safetensors file (caps, pickle refusal, the library's format checks) and checks it against the served
base; the adapter it returns goes into the host cache), writes the manifest and hands the folder to the store for an atomic rename. Any failure removes the
temporary folder, so a refused upload leaves the store exactly as it was.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from adapterserve.server.errors import AdapterValidationError, ResourceExhaustedError
from adapterserve.server.store.manifest import FileEntry
from adapterserve.server.store.safetensors_check import sniff_pickle

if TYPE_CHECKING:
    from adapterserve.server.store.store import AdapterStore, CommitResult

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ACCEPTED_FILES = (CONFIG_FILE, WEIGHTS_FILE)
# Pickle (and pickle-wrapping) formats, refused by name before a byte is written.
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib", ".npy", ".npz"})
MAX_FILE_NAME_CHARS = 255


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
    `abort()` on failure; `commit()` installs it atomically. Not thread-safe: one writer at a time."""

    def __init__(
        self,
        store: AdapterStore,
        name: str,
        tmp_dir: Path,
        *,
        overwrite: bool,
        description: str,
        base_fingerprint: str | None,
        max_bytes: int,
    ) -> None:
        self.store, self.name, self.tmp_dir = store, name, tmp_dir
        self.overwrite, self.description = overwrite, description
        self.base_fingerprint, self.max_bytes = base_fingerprint, max_bytes
        self.received_bytes = 0
        self._files: dict[str, FileEntry] = {}
        self._current: tuple[str, _OpenFile] | None = None
        self._done = False

    # ------------------------------------------------------------------ streaming
    def write(self, filename: str, chunk: bytes) -> None:
        """Append `chunk` to `filename`. Chunks of one file arrive together; a file may not come back."""
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
        if self._done:
            raise RuntimeError("upload session is finished")
        try:
            self._close_current()
            missing = [f for f in ACCEPTED_FILES if f not in self._files]
            if missing:
                raise AdapterValidationError(f"upload is missing {' and '.join(missing)}")
            return self.store._install_upload(self, dict(self._files))  # validates, once
        finally:
            self.abort()  # after a successful install the folder is gone and this is a no-op

    def abort(self) -> None:
        """Drop the upload: close files, remove the temporary folder. Safe to call more than once."""
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
