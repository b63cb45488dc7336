"""Which files an upload sends, the local refusal of pickles, chunking and progress."""

from __future__ import annotations

import io
import json

import pytest

from adapterserve.errors import AdapterRefused
from adapterserve.progress import ProgressBar, format_bytes
from adapterserve.upload import (
    ProgressTracker,
    UploadProgress,
    collect_adapter_files,
    iter_file_chunks,
)


def _adapter_dir(tmp_path, weights: bytes = b"w" * 1000, extra: dict[str, bytes] | None = None):
    d = tmp_path / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (d / "adapter_model.safetensors").write_bytes(weights)
    for name, data in (extra or {}).items():
        (d / name).write_bytes(data)
    return d


def test_only_config_and_safetensors_are_sent_config_first(tmp_path):
    d = _adapter_dir(tmp_path, extra={"README.md": b"# hi", "tokenizer.json": b"{}"})
    files = collect_adapter_files(d)
    assert [f.name for f in files] == ["adapter_config.json", "adapter_model.safetensors"]
    assert files[1].size == 1000


@pytest.mark.parametrize("pickle_name", ["adapter_model.bin", "weights.pt", "x.pth", "state.pkl", "m.ckpt"])
def test_pickle_files_are_refused_with_the_reason(tmp_path, pickle_name):
    d = _adapter_dir(tmp_path, extra={pickle_name: b"\x80\x04"})
    with pytest.raises(AdapterRefused) as info:
        collect_adapter_files(d)
    assert pickle_name in info.value.message
    assert "safetensors" in info.value.message


def test_missing_config_weights_or_bad_json_are_refused(tmp_path):
    with pytest.raises(AdapterRefused, match="not a directory"):
        collect_adapter_files(tmp_path / "nope")
    d = _adapter_dir(tmp_path)
    (d / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterRefused, match="no .safetensors"):
        collect_adapter_files(d)
    (d / "adapter_model.safetensors").write_bytes(b"x")
    (d / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterRefused, match="not valid JSON"):
        collect_adapter_files(d)
    (d / "adapter_config.json").unlink()
    with pytest.raises(AdapterRefused, match="no adapter_config.json"):
        collect_adapter_files(d)


def test_chunks_are_bounded_in_order_and_reassemble(tmp_path):
    payload = bytes(range(256)) * 10  # 2560 bytes
    d = _adapter_dir(tmp_path, weights=payload)
    files = collect_adapter_files(d)
    chunks = list(iter_file_chunks(files, chunk_bytes=1000))
    assert all(len(data) <= 1000 for _, _, data in chunks)
    weights = [(off, data) for f, off, data in chunks if f.name == "adapter_model.safetensors"]
    assert [off for off, _ in weights] == [0, 1000, 2000]
    assert b"".join(data for _, data in weights) == payload
    assert chunks[0][0].name == "adapter_config.json"


def test_exact_multiple_and_empty_files(tmp_path):
    d = _adapter_dir(tmp_path, weights=b"a" * 2000)
    files = collect_adapter_files(d)
    sizes = [len(data) for f, _, data in iter_file_chunks(files[1:], 1000)]
    assert sizes == [1000, 1000]
    (d / "adapter_model.safetensors").write_bytes(b"")
    files = collect_adapter_files(d)
    assert [len(data) for _, _, data in iter_file_chunks(files[1:], 1000)] == [0]


def test_progress_tracker_reports_cumulative_bytes():
    seen: list[UploadProgress] = []
    t = ProgressTracker(30, seen.append)
    t.advance("a", 10)
    t.advance("b", 20)
    assert [(p.file_name, p.sent_bytes, p.total_bytes) for p in seen] == [("a", 10, 30), ("b", 30, 30)]
    assert seen[-1].fraction == 1.0


def test_progress_bar_writes_the_final_line_when_not_a_terminal():
    out = io.StringIO()
    with ProgressBar(out, width=10) as bar:
        bar(UploadProgress("f", 512, 2048))
        bar(UploadProgress("f", 2048, 2048))
    text = out.getvalue()
    assert text == "[##########] 100.0%  2.0 KiB/2.0 KiB\n"
    assert bar.render(UploadProgress("f", 1024, 2048)).startswith("[#####.....]  50.0%")


def test_format_bytes():
    assert format_bytes(0) == "0 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(3 * 1024**3) == "3.0 GiB"
