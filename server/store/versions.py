"""The highest version each adapter name ever had, kept on disk so that a version is never issued twice.

An adapter's version is part of the key the engine caches it under ((name, version): device slots,
host copies) and what clients see, so a (name, version) must never name two different uploads: not
after a delete, not after a restart, not when another process sharing the store wrote in between.

Layout (`root/.versions/`, see layout.py):
    <name>          ASCII decimal: the highest version ever published or deleted under <name>
    .<hex>.tmp      a record being written (removed by `layout.recover` after a crash)

Contract (the writers keep it under the index's `mutating` lock):
- before a folder whose manifest says version v is renamed into place as <name>, and before <name> is
  parked for delete, `raise_record(root, name, v)` has made the record >= v, durably (temp file, fsync,
  rename, fsync of `.versions`), so a kill -9 at any point leaves a record >= every version on disk;
- the next version of <name> is above the record (see `StoreIndex.next_version`).
A record is never lowered or removed (one small file per name ever stored), so it holds across
restarts and deletes. An unreadable record (tampered with) reads as 0 with a warning: the next version
is then above what the process saw and the folder on disk only, and that write replaces the record.
Across processes the guarantee assumes the documented single writer: writes through several processes
one after another, never two at the same instant (no lock spans processes). An entry removed by hand
(`rm -rf root/<name>`) keeps the record its last store write left.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

from adapterserve.server.errors import FailedPreconditionError, ServeError
from adapterserve.server.store.layout import VERSIONS_DIR, fsync_dir, read_small_file, write_new_file
from adapterserve.server.store.manifest import MANIFEST_FILE, MAX_MANIFEST_BYTES, Manifest

log = logging.getLogger(__name__)

MAX_RECORD_BYTES = 32


def read_record(root: Path, name: str) -> int:
    """The recorded highest version of `name` (a valid name); 0 when there is none or it is unreadable
    (a symlinked `.versions` is never followed)."""
    path = root / VERSIONS_DIR / name
    if path.parent.is_symlink():
        return 0
    try:
        text = read_small_file(path, MAX_RECORD_BYTES).decode("ascii").strip()
        version = int(text)
    except FileNotFoundError:
        return 0
    except (OSError, ValueError, ServeError) as err:
        log.warning("ignoring unreadable version record %s: %s", path, err)
        return 0
    return max(version, 0)


def raise_record(root: Path, name: str, version: int) -> None:
    """Make the record of `name` at least `version`, durably; a no-op when it already is."""
    if read_record(root, name) >= version:
        return
    folder = _records_folder(root)
    tmp = folder / f".{uuid.uuid4().hex}.tmp"
    try:
        write_new_file(tmp, f"{version}\n".encode("ascii"))
        os.replace(tmp, folder / name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(folder)


def folder_version(path: Path) -> int:
    """The version in `path`/manifest.json, read without re-hashing the files; 0 when unreadable.
    For an entry this process has not verified (written by another process, or not served). A
    symlinked entry is never followed (0)."""
    if path.is_symlink():
        return 0
    try:
        return Manifest.from_bytes(read_small_file(path / MANIFEST_FILE, MAX_MANIFEST_BYTES)).version
    except (OSError, ServeError):
        return 0


def _records_folder(root: Path) -> Path:
    """`root/.versions`, made (durably) on first use; refused if something else holds the name."""
    folder = root / VERSIONS_DIR
    try:
        folder.mkdir(mode=0o755)
    except FileExistsError:
        pass
    else:
        fsync_dir(root)
    if folder.is_symlink() or not folder.is_dir():
        raise FailedPreconditionError(
            f"store entry {VERSIONS_DIR!r} is not a folder; versions cannot be recorded"
        )
    return folder
