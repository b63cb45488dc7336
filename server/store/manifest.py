"""The small manifest stored next to each adapter's PEFT files: what it is and the hash of every file.

`manifest.json` is written (`write_manifest`) after validation, before the folder is renamed into place;
on start, and before each load, it is read back and every file re-hashed against it (`verify_dir`), so a
truncated or tampered adapter is reported and not served.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import stat
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from adapterserve.server.adapters.types import AdapterInfo
from adapterserve.server.errors import AdapterValidationError, BaseMismatchError
from adapterserve.server.store.layout import ACCEPTED_FILES, read_small_file, write_new_file

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
MAX_MANIFEST_BYTES = 256 << 10
_HASH_CHUNK = 1 << 20


class FileEntry(BaseModel):
    """One stored file: its size and sha256 (hex)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: Annotated[int, Field(ge=0)]
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class Origin(BaseModel):
    """Where a fetched adapter came from (store/sources/); uploads have none."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: Annotated[str, Field(max_length=1024)]  # the source's URI, without credentials
    tag: Annotated[str, Field(max_length=1024)] = ""  # the version there: ETags, or the Hub's commit
    revision: str | None = None  # the Hub's commit sha (hf://)
    fetched_at: dt.datetime


class Manifest(BaseModel):
    """What the store knows about one adapter. `version` strictly increases each time a name is replaced."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: int = MANIFEST_FORMAT
    name: str
    version: Annotated[int, Field(ge=1)]
    uid: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]  # unique per stored upload
    kind: Annotated[str, Field(min_length=1, max_length=64)]  # a registered kind's name
    peft_type: str
    rank: int | None = None
    num_virtual_tokens: int | None = None
    target_modules: tuple[str, ...] = ()
    num_parameters: int = 0
    nbytes: int = 0  # bytes of the served tensors (a host-cache entry's cost)
    base_fingerprint: str | None = None
    files: dict[str, FileEntry]
    created_at: dt.datetime
    description: Annotated[str, Field(max_length=1024)] = ""
    origin: Origin | None = None  # set for adapters fetched from a source

    @property
    def size(self) -> int:
        """Bytes of the adapter's files on disk (manifest excluded)."""
        return sum(f.size for f in self.files.values())

    @property
    def digest(self) -> str:
        """sha256 over the sorted (file name, file sha256) pairs: one hash for the whole adapter."""
        h = hashlib.sha256()
        for name in sorted(self.files):
            h.update(f"{name}\0{self.files[name].sha256}\n".encode())
        return h.hexdigest()

    @property
    def info(self) -> AdapterInfo:
        """The AdapterInfo recorded at upload time."""
        return AdapterInfo(
            kind=self.kind,
            peft_type=self.peft_type,
            rank=self.rank,
            num_virtual_tokens=self.num_virtual_tokens,
            target_modules=tuple(self.target_modules),
            num_parameters=self.num_parameters,
            nbytes=self.nbytes,
        )

    @classmethod
    def build(
        cls,
        *,
        name: str,
        version: int,
        uid: str,
        info: AdapterInfo,
        files: dict[str, FileEntry],
        base_fingerprint: str | None,
        description: str,
        created_at: dt.datetime | None = None,
        origin: Origin | None = None,
    ) -> Manifest:
        return cls(
            name=name,
            version=version,
            uid=uid,
            kind=info.kind,
            peft_type=info.peft_type,
            rank=info.rank,
            num_virtual_tokens=info.num_virtual_tokens,
            target_modules=tuple(info.target_modules),
            num_parameters=info.num_parameters,
            nbytes=info.nbytes,
            base_fingerprint=base_fingerprint,
            files=files,
            created_at=created_at or dt.datetime.now(dt.timezone.utc),  # noqa: UP017 (py3.10)
            description=description,
            origin=origin,
        )

    def to_bytes(self) -> bytes:
        return self.model_dump_json(indent=1).encode() + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        if len(data) > MAX_MANIFEST_BYTES:
            raise AdapterValidationError(f"{MANIFEST_FILE} is larger than {MAX_MANIFEST_BYTES} bytes")
        try:
            return cls.model_validate_json(data)
        except ValidationError as err:
            first = err.errors(include_url=False)[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "(root)"
            raise AdapterValidationError(f"{MANIFEST_FILE} is invalid: {where}: {first.get('msg')}") from None


def sha256_file(path: Path) -> FileEntry:
    """Size and sha256 of a regular file, read without following a symlink."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        h = hashlib.sha256()
        size = 0
        while chunk := os.read(fd, _HASH_CHUNK):
            h.update(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    return FileEntry(size=size, sha256=h.hexdigest())


def write_manifest(folder: Path, manifest: Manifest) -> None:
    """Create `folder`/manifest.json (it must not exist) and fsync it."""
    write_new_file(folder / MANIFEST_FILE, manifest.to_bytes())


def check_base(fingerprint: str | None, served: str | None, what: str) -> None:
    """BaseMismatchError when both fingerprints are known and differ."""
    if fingerprint and served and fingerprint != served:
        raise BaseMismatchError(
            f"{what} was made for base {fingerprint[:16]}..., this server serves {served[:16]}..."
        )


def verify_dir(path: Path, name: str, base_fingerprint: str | None) -> Manifest:
    """Read the folder's manifest and re-hash every file against it; check it was made for the served
    base. Raises AdapterValidationError (BaseMismatchError) or OSError."""
    manifest = Manifest.from_bytes(read_small_file(path / MANIFEST_FILE, MAX_MANIFEST_BYTES))
    if manifest.name != name:
        raise AdapterValidationError(f"manifest names {manifest.name!r}, not the folder {name!r}")
    expected = set(manifest.files)
    if expected != set(ACCEPTED_FILES):
        raise AdapterValidationError(f"manifest lists {sorted(expected)}, expected {list(ACCEPTED_FILES)}")
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
    check_base(manifest.base_fingerprint, base_fingerprint, f"adapter {name!r}")
    return manifest
