"""Hypothesis fuzzing of every parser that takes untrusted bytes, bounded in examples and time.

The property is always the same: whatever the bytes, the parser either accepts them (and then what it
accepted satisfies its invariants) or refuses them with the server's own error type (ServeError, which
maps to a status code), never another exception; and a refused upload leaves the store as it was.
"""

from __future__ import annotations

import asyncio
import functools
import json
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapterserve.server.adapters.config_parsing import parse_adapter_config
from adapterserve.server.adapters.safetensors_check import (
    DTYPE_SIZES,
    check_safetensors_file,
    parse_safetensors_header,
    sniff_pickle,
)
from adapterserve.server.api.grpc.admin import decode_page_token, upload_chunks
from adapterserve.server.api.grpc.decoding import Undecodable, _tolerant
from adapterserve.server.errors import AdapterValidationError, ServeError
from adapterserve.server.settings import EngineSettings, LimitSettings
from adapterserve.server.store.upload import UploadRequest
from adapterserve.v1 import admin_pb2, generation_pb2
from tests.helpers.peft_adapters import tree_state
from tests.reliability.hostile import CONFIG, WEIGHTS, split_safetensors

pytestmark = pytest.mark.timeout(300)

# Bounded for CI: a fixed number of examples per property, no example database written to disk.
FUZZ = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
PEFT_KEYS = (
    "peft_type",
    "task_type",
    "r",
    "lora_alpha",
    "target_modules",
    "lora_dropout",
    "bias",
    "fan_in_fan_out",
    "num_virtual_tokens",
    "token_dim",
    "num_layers",
    "feedforward_modules",
    "use_dora",
    "modules_to_save",
    "base_model_name_or_path",
    "auto_mapping",
    "encoder_hidden_size",
)
configs = st.dictionaries(
    st.sampled_from(PEFT_KEYS) | st.text(max_size=10),
    json_values | st.sampled_from(["LORA", "IA3", "PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "CAUSAL_LM"]),
    max_size=10,
)


@FUZZ
@given(data=st.binary(max_size=2048))
def test_adapter_config_arbitrary_bytes(data):
    try:
        parse_adapter_config(data)
    except ServeError:
        pass


@FUZZ
@given(obj=configs)
def test_adapter_config_structured(obj):
    try:
        config = parse_adapter_config(json.dumps(obj, allow_nan=True).encode())
    except ServeError:
        return
    assert config.peft_type in {"LORA", "ADALORA", "IA3", "PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING"}


def check_accepted(header, file_bytes: int) -> None:
    ranges = sorted((t.begin, t.end) for t in header.tensors)
    for (_, e0), (b1, _) in zip(ranges, ranges[1:], strict=False):
        assert e0 <= b1, "overlapping tensors accepted"
    for t in header.tensors:
        assert 0 <= t.begin <= t.end <= file_bytes
        assert t.dtype in DTYPE_SIZES and t.nbytes == t.numel * DTYPE_SIZES[t.dtype]


@FUZZ
@given(data=st.binary(max_size=4096), file_bytes=st.integers(0, 1 << 40))
def test_safetensors_header_arbitrary_bytes(data, file_bytes):
    """The header-only pass applies the project's caps (the format is the library's, checked on the
    whole file below): it refuses cleanly or returns entries within those caps, never crashes."""
    try:
        header = parse_safetensors_header(data, file_bytes=file_bytes)
    except AdapterValidationError:
        return
    assert all(t.dtype in DTYPE_SIZES and t.name for t in header.tensors)


tensor_entries = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from([*DTYPE_SIZES, "I64", "Q4", "", "f32"]),
        "shape": st.lists(st.integers(-2, 9), max_size=3),
        "data_offsets": st.lists(st.integers(-5, 600), min_size=0, max_size=3),
    }
)


@FUZZ
@given(
    entries=st.dictionaries(st.text(max_size=8), tensor_entries, max_size=5),
    body=st.integers(0, 600),
    metadata=st.none() | st.dictionaries(st.text(max_size=5), json_scalars, max_size=3),
)
def test_safetensors_header_structured(entries, body, metadata):
    header = dict(entries)
    if metadata is not None:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    file_bytes = 8 + len(raw) + body
    with tempfile.TemporaryDirectory() as tmp:  # the whole file: the project's caps, then the library's
        path = Path(tmp) / WEIGHTS
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(body))
        try:
            parsed = check_safetensors_file(path, max_bytes=1 << 20)
        except AdapterValidationError:
            return
    check_accepted(parsed, file_bytes)


@FUZZ
@given(data=st.binary(max_size=4096))
def test_safetensors_file_and_pickle_sniffing(data):
    reason = sniff_pickle(data[:64], data[-1:], len(data))
    assert reason is None or isinstance(reason, str)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / WEIGHTS
        path.write_bytes(data)
        try:
            check_safetensors_file(path, max_bytes=1 << 20)
        except AdapterValidationError:
            pass


@FUZZ
@given(token=st.text(max_size=60) | st.binary(max_size=60).map(lambda b: b.decode("latin-1")))
def test_page_token(token):
    try:
        assert isinstance(decode_page_token(token), str)
    except ServeError:
        pass


@FUZZ
@given(data=st.binary(max_size=512))
def test_request_bytes_never_crash_the_deserializer(data):
    for message_type in (generation_pb2.GenerateRequest, admin_pb2.UploadAdapterRequest):
        parsed = _tolerant(message_type.FromString)(data)
        assert isinstance(parsed, (message_type, Undecodable))


file_names = st.sampled_from(
    [CONFIG, WEIGHTS, "adapter_model.bin", "../x", "", "a\x00b", "README.md"]
) | st.text(max_size=12)
upload_message = st.one_of(
    st.builds(
        lambda name, data: admin_pb2.UploadAdapterRequest(
            chunk=admin_pb2.FileChunk(filename=name, data=data)
        ),
        file_names,
        st.binary(max_size=300),
    ),
    st.builds(
        lambda name: admin_pb2.UploadAdapterRequest(header=admin_pb2.UploadHeader(name=name)),
        st.text(max_size=8),
    ),
)


@FUZZ
@given(messages=st.lists(upload_message, max_size=8))
def test_upload_framing(messages):
    limits = LimitSettings(upload_chunk_bytes=256, max_upload_bytes=1024)

    async def drain() -> None:
        async def source():
            for m in messages:
                yield m

        counter = type("Counter", (), {"received": 0})()
        async for name, data in upload_chunks(source(), limits, counter):
            assert isinstance(name, str) and len(data) <= 256

    try:
        asyncio.run(drain())
    except ServeError:
        pass


@pytest.fixture(scope="module")
def fuzz_store(tiny_base, kind_dirs, tmp_path_factory):
    from adapterserve.server.adapters.loader import load_adapter_dir
    from adapterserve.server.store.store import AdapterStore

    validate = functools.partial(load_adapter_dir, spec=tiny_base.spec, settings=EngineSettings())
    store = AdapterStore(tmp_path_factory.mktemp("fuzz-store"), validate, max_adapter_bytes=1 << 20)
    store.put_dir(kind_dirs["LORA"], UploadRequest("kept"))
    return store


def mutate(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for pos, value in edits:
        if out:
            out[pos % len(out)] = value
    return bytes(out)


@FUZZ
@given(
    config_edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
    weight_edits=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=4),
    cut=st.none() | st.integers(0, 5000),
)
def test_mutated_uploads_into_a_real_store(fuzz_store, kind_dirs, config_edits, weight_edits, cut):
    """Bytes of a real adapter with random edits (header bytes and config mostly): stored whole or
    refused with the store unchanged."""
    config = mutate((kind_dirs["LORA"] / CONFIG).read_bytes(), config_edits)
    weights = mutate((kind_dirs["LORA"] / WEIGHTS).read_bytes(), weight_edits)
    if cut is not None:
        weights = weights[:cut]
    before = tree_state(fuzz_store.root)
    try:
        fuzz_store.upload(UploadRequest("fuzzed"), [(CONFIG, config), (WEIGHTS, weights)])
    except ServeError:
        assert tree_state(fuzz_store.root) == before
        return
    # Accepted: it is whole, and it loads.
    split_safetensors(weights)
    manifest, loaded = fuzz_store.load("fuzzed")
    assert loaded.nbytes > 0 and manifest.files[WEIGHTS].size == len(weights)
    fuzz_store.delete("fuzzed")
    assert "kept" in fuzz_store


@FUZZ
@given(files=st.lists(st.tuples(file_names, st.binary(max_size=200)), max_size=5), name=st.text(max_size=12))
def test_arbitrary_upload_streams_into_a_real_store(fuzz_store, files, name):
    before = tree_state(fuzz_store.root)
    try:
        fuzz_store.upload(UploadRequest(name or "x"), files)
    except ServeError:
        assert tree_state(fuzz_store.root) == before
        return
    raise AssertionError(f"accepted random files {[f for f, _ in files]!r}")


def test_header_length_prefix_is_checked_before_allocating(tmp_path):
    """A length prefix near 2**64 on a tiny file is refused without trying to read that much."""
    path = tmp_path / WEIGHTS
    path.write_bytes(struct.pack("<Q", (1 << 64) - 1) + b"{}")
    with pytest.raises(AdapterValidationError):
        check_safetensors_file(path, max_bytes=1 << 20)
