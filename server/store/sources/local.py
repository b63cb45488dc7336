"""`file:///dir`: adapters in a local or mounted folder (NFS, a synced bucket, a training run's output).

A name N is `dir/N/adapter_config.json` and `dir/N/adapter_model.safetensors`. The version is each
file's size and modification time. Files are opened without following symlinks, so a link in the
folder cannot make the server read outside it.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

from adapterserve.server.errors import InvalidArgumentError
from adapterserve.server.store.layout import ACCEPTED_FILES
from adapterserve.server.store.sources.base import RemoteAdapter, SourceChangedError, unavailable

CHUNK_BYTES = 1 << 20
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def _tag(st: os.stat_result) -> str:
    return f"{st.st_size}-{st.st_mtime_ns}"


class LocalSource:
    """A folder holding one PEFT folder per adapter name."""

    scheme = "file"

    def __init__(self, uri: str) -> None:
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
            raise InvalidArgumentError(f"adapter source {uri!r}: use file:///absolute/dir")
        self.root = Path(unquote(parts.path))
        if not self.root.is_absolute():
            raise InvalidArgumentError(f"adapter source {uri!r}: use file:///absolute/dir")
        self.uri = f"file://{self.root}"

    def stat(self, name: str) -> RemoteAdapter | None:
        folder = self.root / name
        sizes: dict[str, int | None] = {}
        etags: dict[str, str] = {}
        if folder.is_symlink():
            return None  # a link never leads out of the source
        for filename in ACCEPTED_FILES:
            try:
                st = os.lstat(folder / filename)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise unavailable(self.uri, f"stat {name}/{filename}", exc) from None
            if not stat.S_ISREG(st.st_mode):
                continue
            sizes[filename] = st.st_size
            etags[filename] = _tag(st)
        if not sizes:
            if not self.root.is_dir():
                raise unavailable(self.uri, f"looking up {name}", FileNotFoundError("folder not found"))
            return None
        tag = ",".join(etags.get(f, "") for f in ACCEPTED_FILES)
        return RemoteAdapter(name=name, source=self.uri, tag=tag, sizes=sizes, etags=etags)

    def chunks(self, remote: RemoteAdapter, filename: str) -> Iterator[bytes]:
        path = self.root / remote.name / filename
        try:
            fd = os.open(path, _OPEN_FLAGS)
        except FileNotFoundError:
            raise SourceChangedError(
                f"adapter {remote.name!r}: {filename} disappeared from {self.uri} during the fetch"
            ) from None
        except OSError as exc:
            raise unavailable(self.uri, f"open {remote.name}/{filename}", exc) from None
        try:
            if _tag(os.fstat(fd)) != remote.etags.get(filename):
                raise SourceChangedError(
                    f"adapter {remote.name!r}: {filename} changed in {self.uri} during the fetch"
                )
            while chunk := os.read(fd, CHUNK_BYTES):
                yield chunk
        finally:
            os.close(fd)
