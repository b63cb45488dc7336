"""Untrusted weight files: the project's caps on safetensors files, and pickle refusal.

A safetensors file is `u64 little-endian N` + `N bytes of JSON header` + `data`. The `safetensors`
library checks the format itself (JSON structure, `data_offsets` in bounds, contiguous, no overlaps, the
data section exactly covered, byte counts equal to shape x dtype, metadata strings) and is trusted for
that. What is checked here, before the library sees the bytes, is what only this project asks:

- the file and the header length are capped; the header is UTF-8 JSON without repeated keys (the
  library keeps the last of two equal names silently);
- dtypes come from an allowlist (floating point only), shapes have a bounded rank, tensor count and
  name length are capped.

`read_safetensors_checked` reads the file ONCE into memory, checks those bytes and deserializes the
same bytes, so the file cannot change between check and load. Pickle is never loaded: any file whose
bytes look like a pickle (or a zip/npy container, which is how torch and numpy wrap pickles) is refused
whatever its name.
"""

from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterserve.server.errors import AdapterValidationError

# Bytes per element of each accepted dtype (the safetensors dtype names).
DTYPE_SIZES: dict[str, int] = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}

MAX_HEADER_BYTES = 16 << 20  # ~100k tensors; a LoRA on every linear of an 80-layer model is ~0.2 MiB
MAX_TENSORS = 100_000
MAX_NAME_CHARS = 1024
MAX_RANK = 8  # dimensions per tensor
MAX_METADATA_ENTRIES = 1024

_PICKLE_PROTOCOL_OPCODE = 0x80  # PROTO opcode, followed by the protocol number (2..5)
# First opcodes of protocol 0/1 pickles (MARK, GLOBAL, EMPTY_DICT/LIST/TUPLE, NONE, ...).
_OLD_PICKLE_FIRST = frozenset(b"(c}])NIFSVLJ")
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")  # torch.save's zip format wraps a pickle
_NPY_MAGIC = b"\x93NUMPY"  # .npy with object arrays is a pickle
_GZIP_MAGIC = b"\x1f\x8b"  # joblib / compressed pickles


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as described by a checked header. Offsets are absolute in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    """What a checked safetensors header says: tensors in file order, metadata, and sizes."""

    tensors: tuple[TensorEntry, ...]
    metadata: dict[str, str]
    header_bytes: int
    file_bytes: int

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def num_parameters(self) -> int:
        return sum(t.numel for t in self.tensors)


def _reject(where: str, why: str) -> AdapterValidationError:
    return AdapterValidationError(f"{where}: {why}")


def _no_duplicates(where: str):
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise _reject(where, f"tensor or key {key[:100]!r} appears twice in the header")
            out[key] = value
        return out

    return hook


def _header_length(prefix: bytes, file_bytes: int, where: str, max_header_bytes: int) -> int:
    if file_bytes < 8 or len(prefix) < 8:
        raise _reject(
            where, f"not a safetensors file ({file_bytes} bytes, shorter than the 8-byte header length)"
        )
    n = int.from_bytes(prefix[:8], "little")
    if n > max_header_bytes:
        raise _reject(
            where, f"safetensors header is {n} bytes; at most {max_header_bytes} bytes are accepted"
        )
    if n < 2 or 8 + n > file_bytes:
        raise _reject(where, f"safetensors header length {n} does not fit in a file of {file_bytes} bytes")
    return n


def _library_error(where: str, err: Exception) -> AdapterValidationError:
    return _reject(where, f"safetensors refused the file ({err})")


def parse_safetensors_header(
    header: bytes,
    *,
    file_bytes: int,
    where: str = "safetensors file",
    max_header_bytes: int = MAX_HEADER_BYTES,
) -> SafetensorsHeader:
    """The project's caps on the JSON header bytes (without the 8-byte length) of a file of `file_bytes`
    bytes. The format itself (offsets, sizes, metadata types) is the safetensors library's to check.

    Raises AdapterValidationError naming the first problem found.
    """
    n = len(header)
    if n > max_header_bytes:
        raise _reject(
            where, f"safetensors header is {n} bytes; at most {max_header_bytes} bytes are accepted"
        )
    try:
        text = header.decode("utf-8")
    except UnicodeDecodeError:
        raise _reject(where, "safetensors header is not UTF-8") from None
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates(where))
    except json.JSONDecodeError as err:
        raise _reject(where, f"safetensors header is not valid JSON ({err.msg} at char {err.pos})") from None
    except RecursionError:
        raise _reject(where, "safetensors header is nested too deeply") from None
    if not isinstance(obj, dict):
        raise _reject(where, "safetensors header is not a JSON object")
    raw_meta = obj.pop("__metadata__", None)
    metadata = dict(raw_meta) if isinstance(raw_meta, dict) else {}
    if len(metadata) > MAX_METADATA_ENTRIES:
        raise _reject(where, f"__metadata__ has more than {MAX_METADATA_ENTRIES} entries")
    if len(obj) > MAX_TENSORS:
        raise _reject(where, f"{len(obj)} tensors; at most {MAX_TENSORS} are accepted")
    data_start = 8 + n
    entries: list[TensorEntry] = []
    for name, info in obj.items():
        label = f"tensor {name[:100]!r}"
        if not name or len(name) > MAX_NAME_CHARS:
            raise _reject(where, f"{label}: a tensor name must have 1 to {MAX_NAME_CHARS} characters")
        if not isinstance(info, dict):
            raise _reject(where, f"{label}: entry is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in DTYPE_SIZES:
            allowed = ", ".join(DTYPE_SIZES)
            raise _reject(where, f"{label}: dtype {str(dtype)[:20]!r} is not accepted (accepted: {allowed})")
        if isinstance(shape, list) and len(shape) > MAX_RANK:
            raise _reject(where, f"{label}: shape has {len(shape)} dimensions, at most {MAX_RANK}")
        ok = isinstance(shape, list) and isinstance(offsets, list) and len(offsets) == 2
        if ok and all(type(v) is int for v in [*shape, *offsets]):  # noqa: E721 (else the library refuses)
            entries.append(
                TensorEntry(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])
            )
    return SafetensorsHeader(
        tuple(entries), {k: v for k, v in metadata.items() if isinstance(v, str)}, n, file_bytes
    )


def _open_regular(path: Path) -> int:
    """Open a regular file read-only without following a symlink at the last component."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as err:
        raise _reject(path.name, f"cannot be opened ({err.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _reject(path.name, "is not a regular file")
    return fd


def _read_exact(fd: int, size: int) -> bytes:
    chunks: list[bytes] = []
    remaining = size
    while remaining > 0:
        chunk = os.read(fd, min(remaining, 8 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def check_safetensors_file(
    path: Path, *, max_bytes: int, max_header_bytes: int = MAX_HEADER_BYTES
) -> SafetensorsHeader:
    """Check a safetensors file's size and header without reading any tensor data."""
    fd = _open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if size > max_bytes:
            raise _reject(path.name, f"is {size} bytes; at most {max_bytes} bytes are accepted")
        head = _read_exact(fd, min(size, 64))
        reason = sniff_pickle(head, _tail_byte(fd, size), size)
        if reason is not None:
            raise _reject(path.name, f"holds {reason}; pickle is never loaded")
        n = _header_length(head, size, path.name, max_header_bytes)
        os.lseek(fd, 8, os.SEEK_SET)
        header = _read_exact(fd, n)
    finally:
        os.close(fd)
    checked = parse_safetensors_header(
        header, file_bytes=size, where=path.name, max_header_bytes=max_header_bytes
    )
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:  # the library's format checks, no data read
            f.keys()
    except (SafetensorError, OSError, ValueError) as err:
        raise _library_error(path.name, err) from None
    return checked


def read_safetensors_checked(
    path: Path, *, max_bytes: int, max_header_bytes: int = MAX_HEADER_BYTES
) -> dict[str, Any]:
    """Read, check and deserialize a safetensors file: name -> CPU torch.Tensor, in header order.

    The file is read once (at most `max_bytes`); the header checks run on those bytes, and the same
    bytes are handed to safetensors, so nothing read is ever unchecked.
    """
    fd = _open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if size > max_bytes:
            raise _reject(path.name, f"is {size} bytes; at most {max_bytes} bytes are accepted")
        data = _read_exact(fd, size + 1)  # one extra byte detects a file that grew after fstat
    finally:
        os.close(fd)
    if len(data) != size:
        raise _reject(path.name, "changed size while it was read")
    return load_safetensors_checked(data, where=path.name, max_header_bytes=max_header_bytes)


def load_safetensors_checked(
    data: bytes, *, where: str = "safetensors data", max_header_bytes: int = MAX_HEADER_BYTES
) -> dict[str, Any]:
    """Check and deserialize the bytes of a safetensors file held in memory (the same checks as
    `read_safetensors_checked`, which reads a file and calls this): name -> CPU torch.Tensor."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors_bytes

    size = len(data)
    reason = sniff_pickle(data[:64], data[-1:], size)
    if reason is not None:
        raise _reject(where, f"holds {reason}; pickle is never loaded")
    n = _header_length(data, size, where, max_header_bytes)
    header = parse_safetensors_header(
        data[8 : 8 + n], file_bytes=size, where=where, max_header_bytes=max_header_bytes
    )
    try:
        tensors = load_safetensors_bytes(data)  # the library's format checks
    except SafetensorError as err:
        raise _library_error(where, err) from None
    return {t.name: tensors[t.name] for t in header.tensors}


def _tail_byte(fd: int, size: int) -> bytes:
    if size == 0:
        return b""
    return os.pread(fd, 1, size - 1)


def _plausible_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n <= size - 8 and head[8:9] == b"{"


def sniff_pickle(head: bytes, tail: bytes, size: int) -> str | None:
    """Say what pickle-like container `head` (first bytes) and `tail` (last byte) reveal, or None.

    A real safetensors file can start with 0x80 (a header length of 0x..80 bytes), so a file that is a
    plausible safetensors file (u64 length that fits, then '{') is never called a pickle here; its
    header is checked strictly afterwards anyway.
    """
    if _plausible_safetensors(head, size):
        return None
    if head.startswith(_ZIP_MAGICS):
        return "a zip archive (torch.save's format, which wraps a pickle)"
    if head.startswith(_NPY_MAGIC):
        return "a numpy .npy array (may hold pickled objects)"
    if head.startswith(_GZIP_MAGIC):
        return "gzip-compressed data (joblib / compressed pickle)"
    if len(head) >= 2 and head[0] == _PICKLE_PROTOCOL_OPCODE and 1 <= head[1] <= 5:
        return f"pickle data (protocol {head[1]})"
    if head[:1] and head[0] in _OLD_PICKLE_FIRST and tail == b".":
        return "pickle data (protocol 0/1)"
    return None


def check_not_pickle(path: Path) -> None:
    """Refuse a file (any name) whose bytes are a pickle or a pickle container. Reads 64 bytes + 1."""
    fd = _open_regular(path)
    try:
        size = os.fstat(fd).st_size
        head = _read_exact(fd, min(size, 64))
        tail = _tail_byte(fd, size)
    finally:
        os.close(fd)
    reason = sniff_pickle(head, tail, size)
    if reason is not None:
        raise _reject(path.name, f"holds {reason}; pickle is never loaded")


__all__ = [
    "DTYPE_SIZES",
    "MAX_HEADER_BYTES",
    "SafetensorsHeader",
    "TensorEntry",
    "check_not_pickle",
    "check_safetensors_file",
    "parse_safetensors_header",
    "read_safetensors_checked",
    "sniff_pickle",
]
