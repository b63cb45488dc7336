"""Reading a PEFT adapter directory for upload: which files go, refusal of pickles, chunking, progress.

Only `adapter_config.json` and `*.safetensors` files at the top of the directory are sent; other files
(README.md, tokenizer files, training logs) are skipped. A directory that holds pickle-format weights
(`.bin`, `.pt`, `.pth`, `.pkl`, `.pickle`, `.ckpt`) is refused here, before anything is sent: the server
would refuse it too, and loading pickles can run arbitrary code. Convert such an adapter with
`PeftModel.save_pretrained(dir, safe_serialization=True)`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from adapterserve.errors import AdapterRefused

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"})
DEFAULT_CHUNK_BYTES = 256 * 1024


def choose_chunk_bytes(requested: int | None, server_limit: int | None) -> int:
    """The chunk size of an upload: the caller's, else the default capped by the server's limit."""
    if requested is not None:
        return requested
    if server_limit:
        return min(DEFAULT_CHUNK_BYTES, server_limit)
    return DEFAULT_CHUNK_BYTES


@dataclass(frozen=True)
class UploadFile:
    """One file to send: its name inside the adapter directory, its path and size in bytes."""

    name: str
    path: Path
    size: int


@dataclass(frozen=True)
class UploadProgress:
    """Passed to the progress callback after each chunk is handed to gRPC."""

    file_name: str  # the file the last chunk came from
    sent_bytes: int  # all files so far
    total_bytes: int  # all files

    @property
    def fraction(self) -> float:
        return 1.0 if self.total_bytes == 0 else self.sent_bytes / self.total_bytes


ProgressCallback = Callable[[UploadProgress], None]


def collect_adapter_files(path: str | Path) -> list[UploadFile]:
    """The files of the adapter directory at `path` that an upload sends, config first.

    Raises:
        AdapterRefused: the path is not a directory, has no adapter_config.json or no .safetensors
            file, the config is not a JSON object, or the directory holds pickle files.
    """
    root = Path(path)
    if not root.is_dir():
        raise AdapterRefused(f"{root} is not a directory (expected a PEFT adapter directory)")
    entries = sorted(p for p in root.iterdir() if p.is_file())
    pickles = [p.name for p in entries if p.suffix.lower() in PICKLE_SUFFIXES]
    if pickles:
        raise AdapterRefused(
            f"{root} holds pickle files ({', '.join(pickles)}); only safetensors are accepted. "
            "Re-save the adapter with save_pretrained(dir, safe_serialization=True)"
        )
    config = root / CONFIG_NAME
    if not config.is_file():
        raise AdapterRefused(f"{root} has no {CONFIG_NAME} (expected a PEFT adapter directory)")
    try:
        parsed = json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterRefused(f"{config} is not valid JSON: {err}") from None
    if not isinstance(parsed, dict):
        raise AdapterRefused(f"{config} must hold a JSON object")
    weights = [p for p in entries if p.suffix == SAFETENSORS_SUFFIX]
    if not weights:
        raise AdapterRefused(f"{root} has no {SAFETENSORS_SUFFIX} weights file")
    return [UploadFile(p.name, p, p.stat().st_size) for p in [config, *weights]]


def iter_file_chunks(
    files: list[UploadFile], chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[tuple[UploadFile, int, bytes]]:
    """Yield (file, offset, data) with at most `chunk_bytes` of data each, file after file.

    An empty file yields one empty chunk, so the receiver still learns the file exists.
    """
    if chunk_bytes < 1:
        raise ValueError("chunk_bytes must be >= 1")
    for f in files:
        offset = 0
        with f.path.open("rb") as fh:
            while True:
                data = fh.read(chunk_bytes)
                if not data and offset > 0:
                    break
                yield f, offset, data
                offset += len(data)
                if len(data) < chunk_bytes:
                    break


class ProgressTracker:
    """Counts bytes as chunks go out and calls the user's callback (if any) with an UploadProgress."""

    def __init__(self, total_bytes: int, callback: ProgressCallback | None) -> None:
        self.total_bytes = total_bytes
        self.sent_bytes = 0
        self._callback = callback

    def advance(self, file_name: str, nbytes: int) -> None:
        self.sent_bytes += nbytes
        if self._callback is not None:
            self._callback(UploadProgress(file_name, self.sent_bytes, self.total_bytes))
