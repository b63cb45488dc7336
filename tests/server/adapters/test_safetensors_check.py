"""Safetensors header checks (before any tensor is read) and pickle refusal under any file name."""

from __future__ import annotations

import io
import json
import pickle
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from adapterserve.server.adapters.safetensors_check import (
    check_not_pickle,
    check_safetensors_file,
    read_safetensors_checked,
    sniff_pickle,
)
from adapterserve.server.errors import AdapterValidationError

MB = 1 << 20


def raw_safetensors(header: dict, data: bytes, *, length: int | None = None) -> bytes:
    """Bytes of a safetensors file with an arbitrary (possibly hostile) header."""
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h) if length is None else length) + h + data


def good_header() -> dict:
    return {
        "__metadata__": {"format": "pt"},
        "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "b": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]},
    }


def write(tmp_path: Path, content: bytes, name: str = "adapter_model.safetensors") -> Path:
    p = tmp_path / name
    p.write_bytes(content)
    return p


def test_real_peft_files_pass_and_load_exactly(peft_adapter_dirs):
    from safetensors.torch import load_file

    for peft_type, d in peft_adapter_dirs.items():
        path = d / "adapter_model.safetensors"
        header = check_safetensors_file(path, max_bytes=MB)
        tensors = read_safetensors_checked(path, max_bytes=MB)
        reference = load_file(path)
        assert set(tensors) == set(reference) == {t.name for t in header.tensors}, peft_type
        for name, t in tensors.items():
            assert torch.equal(t, reference[name])
        assert header.metadata == {"format": "pt"}
        assert header.data_bytes == sum(t.numel() * t.element_size() for t in tensors.values())


def test_hand_made_header_is_parsed(tmp_path):
    path = write(tmp_path, raw_safetensors(good_header(), bytes(32)))
    header = check_safetensors_file(path, max_bytes=MB)
    assert [(t.name, t.dtype, t.shape, t.nbytes) for t in header.tensors] == [
        ("a", "F32", (2, 3), 24),
        ("b", "BF16", (4,), 8),
    ]
    tensors = read_safetensors_checked(path, max_bytes=MB)
    assert tensors["a"].shape == (2, 3) and tensors["b"].dtype == torch.bfloat16


def bad(header_changes: dict | None = None, data: bytes = bytes(32), **kw) -> bytes:
    header = good_header()
    for key, value in (header_changes or {}).items():
        if value is None:
            header.pop(key)
        else:
            header[key] = value
    return raw_safetensors(header, data, **kw)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "shorter than the 8-byte header length"),
        (b"\x01\x00", "shorter than the 8-byte header length"),
        (struct.pack("<Q", 1 << 40) + b"{}", "at most"),
        (struct.pack("<Q", 1000) + b"{}", "does not fit in a file"),
        (struct.pack("<Q", 4) + b"[1] ", "not a JSON object"),
        (struct.pack("<Q", 4) + b"\xff\xfe\xfd\xfc", "not UTF-8"),
        (struct.pack("<Q", 5) + b"{bad}", "not valid JSON"),
        (bad({"a": {"dtype": "I64", "shape": [3], "data_offsets": [0, 24]}}), "dtype 'I64' is not accepted"),
        (bad({"a": {"dtype": "F8_E4M3", "shape": [24], "data_offsets": [0, 24]}}), "dtype 'F8_E4M3'"),
        (
            bad({"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 999]}}),
            "safetensors refused the file",
        ),
        (
            bad({"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [-8, 24]}}),
            "safetensors refused the file",
        ),
        (
            bad({"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [24, 0]}}),
            "safetensors refused the file",
        ),
        (
            bad({"a": {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 24]}}),
            "safetensors refused the file",
        ),
        (
            bad({"a": {"dtype": "F32", "shape": [2, -3], "data_offsets": [0, 24]}}),
            "safetensors refused the file",
        ),
        (
            bad({"a": {"dtype": "F32", "shape": [True, 6], "data_offsets": [0, 24]}}),
            "safetensors refused the file",
        ),
        (bad({"a": {"dtype": "F32", "shape": [1] * 9 + [6], "data_offsets": [0, 24]}}), "at most 8"),
        (
            bad({"b": {"dtype": "BF16", "shape": [4], "data_offsets": [16, 24]}}),
            "safetensors refused the file",
        ),
        (
            bad({"b": {"dtype": "BF16", "shape": [2], "data_offsets": [28, 32]}}),
            "safetensors refused the file",
        ),
        (bad(data=bytes(40)), "safetensors refused the file"),
        (bad({"__metadata__": {"format": 1}}), "safetensors refused the file"),
        (bad({"__metadata__": ["x"]}), "safetensors refused the file"),
    ],
)
def test_hostile_headers_are_refused_before_reading_tensors(tmp_path, content, message):
    # Project caps are checked here; the format itself (offsets, sizes, metadata) by the safetensors
    # library, whose refusal is reported as "safetensors refused the file (...)".
    path = write(tmp_path, content)
    with pytest.raises(AdapterValidationError, match=re.escape(message)):
        check_safetensors_file(path, max_bytes=MB)
    with pytest.raises(AdapterValidationError, match=re.escape(message)):
        read_safetensors_checked(path, max_bytes=MB)


def test_duplicate_tensor_names_are_refused(tmp_path):
    h = (
        b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},'
        b' "a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}'
    )
    path = write(tmp_path, struct.pack("<Q", len(h)) + h + bytes(8))
    with pytest.raises(AdapterValidationError, match="'a' appears twice"):
        read_safetensors_checked(path, max_bytes=MB)


def test_size_caps(tmp_path):
    path = tmp_path / "big.safetensors"
    save_file({"w": torch.zeros(1024)}, path)
    with pytest.raises(AdapterValidationError, match="at most 1000 bytes"):
        read_safetensors_checked(path, max_bytes=1000)
    with pytest.raises(AdapterValidationError, match="safetensors header is .* at most 10 bytes"):
        check_safetensors_file(path, max_bytes=MB, max_header_bytes=10)


def test_symlinks_and_non_files_are_not_followed(tmp_path):
    target = tmp_path / "real.safetensors"
    save_file({"w": torch.zeros(4)}, target)
    link = tmp_path / "link.safetensors"
    link.symlink_to(target)
    with pytest.raises(AdapterValidationError, match="cannot be opened"):
        read_safetensors_checked(link, max_bytes=MB)
    with pytest.raises(AdapterValidationError, match="not a regular file"):
        check_safetensors_file(tmp_path, max_bytes=MB)


def pickle_payloads() -> dict[str, bytes]:
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)  # zip container with a pickle inside
    legacy = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    return {
        "protocol 2": pickle.dumps({"a": 1}, protocol=2),
        "protocol 4": pickle.dumps({"a": [1, 2]}, protocol=4),
        "protocol 5": pickle.dumps({"a": 1}, protocol=5),
        "protocol 0": pickle.dumps({"a": 1}, protocol=0),
        "protocol 1": pickle.dumps([1, 2], protocol=1),
        "torch zip": buf.getvalue(),
        "torch legacy": legacy.getvalue(),
        "npy": b"\x93NUMPY\x01\x00" + bytes(60),
        "gzip": b"\x1f\x8b\x08\x00" + bytes(20),
    }


@pytest.mark.parametrize("kind", list(pickle_payloads()))
@pytest.mark.parametrize("name", ["adapter_model.safetensors", "adapter_config.json", "weights.bin", "noext"])
def test_pickle_bytes_are_refused_under_any_name(tmp_path, kind, name):
    path = write(tmp_path, pickle_payloads()[kind], name)
    with pytest.raises(AdapterValidationError, match="pickle is never loaded"):
        check_not_pickle(path)
    if name.endswith(".safetensors"):
        with pytest.raises(AdapterValidationError, match="pickle is never loaded"):
            read_safetensors_checked(path, max_bytes=MB)


def test_safetensors_whose_length_starts_with_0x80_is_not_called_pickle(tmp_path):
    # A header of 0x0280 = 640 bytes makes the file start with 0x80 0x02, like a pickle's PROTO 2.
    def header(pad: int) -> bytes:
        return json.dumps(
            {"__metadata__": {"p": "y" * pad}, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
        ).encode()

    h = header(0x280 - len(header(0)))
    content = struct.pack("<Q", len(h)) + h + bytes(4)
    assert content[:2] == b"\x80\x02"
    path = write(tmp_path, content)
    check_not_pickle(path)
    assert read_safetensors_checked(path, max_bytes=MB)["w"].shape == (1,)


def test_json_and_safetensors_are_not_pickle():
    assert sniff_pickle(b'{"peft_type": "LORA"}', b"}", 21) is None
    assert sniff_pickle(b"", b"", 0) is None
