"""The committed gRPC code in clients/python/adapterserve/v1 matches what proto/generate.py produces."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
COMMITTED = REPO / "clients" / "python" / "adapterserve" / "v1"


def _load_generator():
    spec = importlib.util.spec_from_file_location("proto_generate", REPO / "proto" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def test_committed_generated_code_is_current(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    generator = _load_generator()
    written = generator.generate(tmp_path)
    assert written, "no .proto files found"
    stale = []
    for fresh in written:
        committed = COMMITTED / fresh.name
        if not committed.is_file() or committed.read_bytes() != fresh.read_bytes():
            stale.append(fresh.name)
    assert not stale, f"regenerate with `python proto/generate.py`; stale or missing: {stale}"
    generated_here = {p.name for p in COMMITTED.glob("*_pb2*.py*")}
    assert generated_here == {p.name for p in written}, "remove generated files of deleted protos"


def test_services_have_the_contract_methods() -> None:
    from adapterserve.v1 import admin_pb2, generation_pb2

    generation = generation_pb2.DESCRIPTOR.services_by_name["Generation"]
    admin = admin_pb2.DESCRIPTOR.services_by_name["Admin"]
    assert generation.full_name == "adapterserve.v1.Generation"
    assert {"Generate", "GenerateStream"} <= set(generation.methods_by_name)
    assert generation.methods_by_name["GenerateStream"].server_streaming
    assert {
        "UploadAdapter",
        "DeleteAdapter",
        "ListAdapters",
        "GetAdapter",
        "PinAdapter",
        "UnpinAdapter",
    } <= set(admin.methods_by_name)
    assert admin.methods_by_name["UploadAdapter"].client_streaming


def test_optional_fields_track_presence() -> None:
    from adapterserve.v1 import generation_pb2

    params = generation_pb2.SamplingParams(temperature=0.0)
    assert not params.HasField("top_p")
    assert not params.HasField("seed")
    params.seed = 0
    assert params.HasField("seed")
