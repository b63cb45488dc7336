"""The store's folder on disk: what each entry is, the renames that change it, and their undo at start.

Layout (`root/`):
    <name>/adapter_config.json, adapter_model.safetensors, manifest.json   a served adapter
    .upload-<hex>/                                                         an upload in progress
    .replaced-<hex32>-<name>/                                              the old folder during a replace
    .deleted-<hex32>-<name>/                                               a folder being deleted
    .pins.json                                                             names pinned through the admin API
    .versions/<name>                                                       highest version <name> ever had

Every change is a rename inside `root` (atomic on POSIX), after the new files are fsynced:
- put:     write + fsync into .upload-*, validate, then rename to <name>;
- replace: rename <name> to .replaced-*-<name>, rename the upload to <name>, remove the old one;
- delete:  rename <name> to .deleted-*-<name>, then remove it.
Before a put/replace or a delete renames anything, .versions/<name> is raised to the version concerned
(temp file, fsync, rename), so versions never repeat, even after a delete and a restart.
A crash at any point leaves the old or the new state: at start (`recover`), .upload-* and .deleted-*
folders and .versions/.*.tmp files are removed, and a .replaced-*-<name> folder is renamed back to
<name> if the new one never got there (else removed). Symlinks are never followed: files are opened
O_NOFOLLOW, and removing a symlinked entry unlinks the link.

This module knows paths and file operations only; manifests are manifest.py's, the served set lookup.py's.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import uuid
from collections.abc import Container
from pathlib import Path

from adapterserve.server.errors import AdapterValidationError, ServeError
from adapterserve.server.store.names import is_valid_name

log = logging.getLogger(__name__)

UPLOAD_PREFIX = ".upload-"
REPLACED_PREFIX = ".replaced-"
DELETED_PREFIX = ".deleted-"
_PARK_ID_CHARS = 33  # "<hex32>-" between a parking prefix and the adapter's name
PINS_FILE = ".pins.json"  # names pinned through the admin API, kept across restarts
VERSIONS_DIR = ".versions"  # one record per name: the highest version it ever had (versions.py)
MAX_PINS_BYTES = 256 << 10

# The two files of a stored adapter (PEFT's names), besides its manifest.json.
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ACCEPTED_FILES = (CONFIG_FILE, WEIGHTS_FILE)


# ---------------------------------------------------------------------- file primitives
def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_small_file(path: Path, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes, read without following a symlink."""
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


def write_new_file(path: Path, data: bytes) -> None:
    """Create `path` (it must not exist, not even as a symlink), write `data` and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_tree(path: Path) -> None:
    """Remove a store folder. shutil.rmtree never follows symlinks (it unlinks them)."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------- the renames
def new_upload_dir(root: Path) -> Path:
    """Make a private .upload-<hex> folder for one upload."""
    tmp = root / f"{UPLOAD_PREFIX}{uuid.uuid4().hex}"
    tmp.mkdir(mode=0o755)
    return tmp


def _parked_path(root: Path, prefix: str, name: str) -> Path:
    return root / f"{prefix}{uuid.uuid4().hex}-{name}"


def move_into_place(root: Path, tmp: Path, name: str, *, replace: bool) -> None:
    """Rename the complete folder `tmp` to `name`. With `replace`, the live folder is parked as
    .replaced-*-<name> first (so a crash leaves one of the two versions) and removed after."""
    live = root / name
    if replace:
        parked = _parked_path(root, REPLACED_PREFIX, name)
        os.rename(live, parked)
        os.rename(tmp, live)
        fsync_dir(root)
        remove_tree(parked)
    else:
        os.rename(tmp, live)
        fsync_dir(root)


def park_for_delete(root: Path, name: str) -> Path:
    """Rename <name> to .deleted-*-<name> (durably); the caller removes the returned folder."""
    parked = _parked_path(root, DELETED_PREFIX, name)
    os.rename(root / name, parked)
    fsync_dir(root)
    return parked


def recover(root: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Undo what a crash left: remove uploads, deletions, pins and version-record writes in progress;
    roll back a replace whose new version never arrived. Returns (entries removed, adapter names restored)."""
    cleaned: list[str] = _remove_record_temps(root)
    restored: list[str] = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        n = entry.name
        if n.startswith((UPLOAD_PREFIX, DELETED_PREFIX)):
            remove_tree(root / n)
            cleaned.append(n)
        elif n.startswith(PINS_FILE + ".") and n.endswith(".tmp") and entry.is_file(follow_symlinks=False):
            os.unlink(root / n)  # a pins write that never got renamed into place
            cleaned.append(n)
        elif n.startswith(REPLACED_PREFIX):
            name = n[len(REPLACED_PREFIX) + _PARK_ID_CHARS :]
            live = root / name
            if is_valid_name(name) and not os.path.lexists(live):
                os.rename(root / n, live)  # the new version never arrived: roll back
                restored.append(name)
            else:
                remove_tree(root / n)
                cleaned.append(n)
    if cleaned or restored:
        fsync_dir(root)
    return tuple(cleaned), tuple(restored)


def _remove_record_temps(root: Path) -> list[str]:
    """Remove .versions/.*.tmp (version-record writes that never got renamed); their paths in `root`."""
    folder = root / VERSIONS_DIR
    if folder.is_symlink() or not folder.is_dir():
        return []
    removed = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if (
            entry.name.startswith(".")
            and entry.name.endswith(".tmp")
            and entry.is_file(follow_symlinks=False)
        ):
            os.unlink(folder / entry.name)
            removed.append(f"{VERSIONS_DIR}/{entry.name}")
    if removed:
        fsync_dir(folder)
    return removed


# ---------------------------------------------------------------------- pins
def read_pins(root: Path, served: Container[str]) -> list[str]:
    """Names in PINS_FILE that are valid and in `served`, sorted ([] when the file is absent or unreadable)."""
    path = root / PINS_FILE
    try:
        raw = json.loads(read_small_file(path, MAX_PINS_BYTES))
    except FileNotFoundError:
        return []
    except (OSError, ValueError, ServeError) as err:
        log.warning("ignoring unreadable %s: %s", PINS_FILE, err)
        return []
    names = raw.get("pinned", []) if isinstance(raw, dict) else []
    return sorted(n for n in names if isinstance(n, str) and is_valid_name(n) and n in served)


def write_pins(root: Path, names: set[str]) -> None:
    """Persist the pinned names atomically (temp file, fsync, rename, fsync of the folder)."""
    tmp = root / f"{PINS_FILE}.{uuid.uuid4().hex}.tmp"
    write_new_file(tmp, json.dumps({"pinned": sorted(names)}, indent=1).encode())
    os.replace(tmp, root / PINS_FILE)
    fsync_dir(root)
