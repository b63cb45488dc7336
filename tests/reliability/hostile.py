"""Hostile variants of a valid adapter's files, for the upload tests and the fuzzers.

Everything here only builds bytes; nothing is ever loaded with pickle.
"""

from __future__ import annotations

import json
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
Files = list[tuple[str, bytes]]


def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    """(header dict, data section) of a safetensors file."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join_safetensors(header: dict, body: bytes, *, length: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + body


def _tensors(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def with_header(weights: bytes, change: Callable[[dict], None]) -> bytes:
    header, body = split_safetensors(weights)
    change(header)
    return join_safetensors(header, body)


def _overlap(h: dict) -> None:
    first, second = _tensors(h)[:2]
    h[second]["data_offsets"] = list(h[first]["data_offsets"])


def _unknown_dtype(h: dict) -> None:
    h[_tensors(h)[0]]["dtype"] = "Q4_K"


def _reshape(h: dict) -> None:
    """Same element count, wrong shape: passes the header checks, must fail the base's shape check."""
    t = h[_tensors(h)[0]]
    a, b = t["shape"]
    t["shape"] = [a * 2, b // 2]


def _offsets_past_end(h: dict) -> None:
    t = h[_tensors(h)[-1]]
    t["data_offsets"] = [t["data_offsets"][0], t["data_offsets"][1] + 4096]


def _negative_shape(h: dict) -> None:
    h[_tensors(h)[0]]["shape"] = [-1, 4]


@dataclass(frozen=True)
class BadUpload:
    """One hostile upload: the adapter name, the (file name, bytes) stream, the status it must get."""

    id: str
    name: str
    files: Files
    code: str  # grpc.StatusCode name
    says: str = ""  # a phrase the refusal message must contain (case-insensitive)


def bad_uploads(adapter_dir: Path) -> list[BadUpload]:
    """Every hostile upload the suite sends, built from a valid LoRA adapter directory."""
    config = (adapter_dir / CONFIG).read_bytes()
    weights = (adapter_dir / WEIGHTS).read_bytes()
    header, body = split_safetensors(weights)
    cfg = json.loads(config)
    pickled = pickle.dumps({"weights": [1.0, 2.0]}, protocol=4)  # bytes only; never unpickled

    def ok(w: bytes = weights, c: bytes = config) -> Files:
        return [(CONFIG, c), (WEIGHTS, w)]

    def cfg_with(**changes) -> bytes:
        return json.dumps({**cfg, **changes}).encode()

    cases = [
        BadUpload("overlapping-offsets", "bad-a", ok(with_header(weights, _overlap)), "INVALID_ARGUMENT"),
        BadUpload(
            "unknown-dtype", "bad-a", ok(with_header(weights, _unknown_dtype)), "INVALID_ARGUMENT", "dtype"
        ),
        BadUpload(
            "offsets-past-end", "bad-a", ok(with_header(weights, _offsets_past_end)), "INVALID_ARGUMENT"
        ),
        BadUpload("negative-shape", "bad-a", ok(with_header(weights, _negative_shape)), "INVALID_ARGUMENT"),
        BadUpload("wrong-shape-for-base", "bad-a", ok(with_header(weights, _reshape)), "INVALID_ARGUMENT"),
        BadUpload(
            "header-length-2**63",
            "bad-a",
            ok(join_safetensors(header, body, length=1 << 63)),
            "INVALID_ARGUMENT",
        ),
        BadUpload(
            "header-not-json", "bad-a", ok(struct.pack("<Q", 6) + b"{nope!" + body), "INVALID_ARGUMENT"
        ),
        BadUpload("truncated-weights", "bad-a", ok(weights[: len(weights) // 2]), "INVALID_ARGUMENT"),
        BadUpload("empty-weights", "bad-a", ok(b""), "INVALID_ARGUMENT"),
        BadUpload("pickle-as-safetensors", "bad-a", ok(pickled), "INVALID_ARGUMENT", "pickle"),
        BadUpload(
            "torch-zip-as-safetensors", "bad-a", ok(b"PK\x03\x04" + bytes(200)), "INVALID_ARGUMENT", "pickle"
        ),
        BadUpload(
            "pickle-file-name",
            "bad-a",
            [(CONFIG, config), ("adapter_model.bin", pickled)],
            "INVALID_ARGUMENT",
            "pickle",
        ),
        BadUpload("path-traversal-file", "bad-a", [("../adapter_config.json", config)], "INVALID_ARGUMENT"),
        BadUpload("absolute-path-file", "bad-a", [("/etc/passwd", config)], "INVALID_ARGUMENT"),
        BadUpload("nul-in-file-name", "bad-a", [("adapter\x00config.json", config)], "INVALID_ARGUMENT"),
        BadUpload("extra-file", "bad-a", [*ok(), ("README.md", b"hello")], "INVALID_ARGUMENT"),
        BadUpload("missing-weights", "bad-a", [(CONFIG, config)], "INVALID_ARGUMENT", "missing"),
        BadUpload(
            "file-sent-twice",
            "bad-a",
            [(CONFIG, config), (WEIGHTS, weights), (CONFIG, config)],
            "INVALID_ARGUMENT",
        ),
        BadUpload("config-not-json", "bad-a", ok(c=b"{not json"), "INVALID_ARGUMENT"),
        BadUpload("config-json-array", "bad-a", ok(c=b"[1, 2]"), "INVALID_ARGUMENT"),
        BadUpload(
            "config-duplicate-keys",
            "bad-a",
            ok(c=b'{"peft_type": "LORA", "peft_type": "IA3"}'),
            "INVALID_ARGUMENT",
        ),
        BadUpload("config-nan", "bad-a", ok(c=cfg_with(lora_dropout=float("nan"))), "INVALID_ARGUMENT"),
        BadUpload("config-unknown-peft-type", "bad-a", ok(c=cfg_with(peft_type="MAGIC")), "INVALID_ARGUMENT"),
        BadUpload("config-rank-above-cap", "bad-a", ok(c=cfg_with(r=100_000)), "INVALID_ARGUMENT"),
        BadUpload(
            "config-remote-code",
            "bad-a",
            ok(c=cfg_with(auto_mapping={"x": "evil.Module"})),
            "INVALID_ARGUMENT",
        ),
        BadUpload("name-nul", "bad\x00name", ok(), "INVALID_ARGUMENT", "adapter name"),
        BadUpload("name-10000-chars", "n" * 10_000, ok(), "INVALID_ARGUMENT", "adapter name"),
        BadUpload("name-dot-dot", "..", ok(), "INVALID_ARGUMENT", "adapter name"),
        BadUpload("name-slash", "a/b", ok(), "INVALID_ARGUMENT", "adapter name"),
        BadUpload("name-hidden", ".upload-123", ok(), "INVALID_ARGUMENT", "adapter name"),
        BadUpload("name-empty", "", ok(), "INVALID_ARGUMENT", "adapter name"),
        BadUpload("name-unicode", "lörä", ok(), "INVALID_ARGUMENT", "adapter name"),
    ]
    return cases
