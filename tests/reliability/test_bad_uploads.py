"""Hostile uploads against the real server: each refused with the right code, the store unchanged.

Uploads go through raw gRPC (not the SDK, whose own checks would stop some before the server sees
them). After every refusal the store directory is compared byte for byte with its state before.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from adapterserve.v1 import admin_pb2, admin_pb2_grpc, generation_pb2, generation_pb2_grpc
from tests.helpers.peft_adapters import tree_state
from tests.reliability.conftest import AUTH, MAX_UPLOAD_BYTES, wait_until
from tests.reliability.hostile import CONFIG, WEIGHTS, Files, bad_uploads

pytestmark = pytest.mark.timeout(240)
CHUNK = 65536


def messages(name: str, files: Files, *, chunk: int = CHUNK, overwrite: bool = False) -> Iterator:
    yield admin_pb2.UploadAdapterRequest(header=admin_pb2.UploadHeader(name=name, overwrite=overwrite))
    for fname, data in files:
        for start in range(0, max(len(data), 1), chunk):
            yield admin_pb2.UploadAdapterRequest(
                chunk=admin_pb2.FileChunk(filename=fname, data=data[start : start + chunk])
            )


def upload(target: str, name: str, files: Files, *, metadata=AUTH, **kw) -> tuple[str, str]:
    """(status code name, message) of one upload on a fresh channel."""
    with grpc.insecure_channel(target) as channel:
        try:
            admin_pb2_grpc.AdminStub(channel).UploadAdapter(
                messages(name, files, **kw), metadata=metadata, timeout=60
            )
        except grpc.RpcError as err:
            return err.code().name, err.details() or ""
    return "OK", ""


def files_of(path: Path) -> Files:
    return [(CONFIG, (path / CONFIG).read_bytes()), (WEIGHTS, (path / WEIGHTS).read_bytes())]


def stored_files(store: Path, name: str) -> Files:
    return files_of(store / name)


def temp_entries(store: Path) -> list[str]:
    return [p.name for p in store.iterdir() if p.name.startswith((".upload-", ".replaced-", ".deleted-"))]


def test_every_hostile_upload_is_refused_and_the_store_is_unchanged(shared, kind_dirs):
    cases = bad_uploads(kind_dirs["LORA"])
    assert len(cases) >= 30
    problems = []
    for case in cases:
        before = tree_state(shared.store)
        code, message = upload(shared.target, case.name, case.files)
        after = tree_state(shared.store)
        if code != case.code or case.says.lower() not in message.lower():
            problems.append(f"{case.id}: got {code} {message!r}, expected {case.code} saying {case.says!r}")
        if after != before:
            problems.append(f"{case.id}: the store changed")
    assert problems == []
    with grpc.insecure_channel(shared.target) as channel:
        listed = admin_pb2_grpc.AdminStub(channel).ListAdapters(
            admin_pb2.ListAdaptersRequest(), metadata=AUTH
        )
    assert not any(a.name.startswith("bad") for a in listed.adapters)


def test_uploads_without_the_right_token_never_touch_the_store(shared, kind_dirs):
    before = tree_state(shared.store)
    files = files_of(kind_dirs["LORA"])
    assert upload(shared.target, "no-token", files, metadata=())[0] == "UNAUTHENTICATED"
    wrong = (("authorization", "Bearer not-the-token"),)
    assert upload(shared.target, "no-token", files, metadata=wrong)[0] == "PERMISSION_DENIED"
    assert tree_state(shared.store) == before


def test_over_the_byte_cap_is_refused_mid_stream_without_leftovers(shared, kind_dirs):
    before = tree_state(shared.store)
    config, weights = files_of(kind_dirs["LORA"])
    padded = (WEIGHTS, weights[1] + bytes(MAX_UPLOAD_BYTES))
    code, message = upload(shared.target, "too-big", [config, padded])
    assert code == "RESOURCE_EXHAUSTED" and "max_upload_bytes" in message
    spaced = (CONFIG, config[1] + b" " * CHUNK)  # still valid JSON, sent as one chunk over the limit
    code, message = upload(shared.target, "too-big", [spaced, weights], chunk=2 * CHUNK)
    assert code == "RESOURCE_EXHAUSTED" and "upload_chunk_bytes" in message
    wait_until(lambda: temp_entries(shared.store) == [])
    assert tree_state(shared.store) == before


def test_a_cancelled_upload_leaves_nothing(shared, kind_dirs):
    before = tree_state(shared.store)
    config, weights = files_of(kind_dirs["LORA"])
    release = threading.Event()

    def stalled() -> Iterator:
        yield from messages("cancelled", [config])
        yield admin_pb2.UploadAdapterRequest(
            chunk=admin_pb2.FileChunk(filename=WEIGHTS, data=weights[1][:1000])
        )
        release.wait(30)  # the client stops sending mid-file

    with grpc.insecure_channel(shared.target) as channel:
        future = admin_pb2_grpc.AdminStub(channel).UploadAdapter.future(stalled(), metadata=AUTH, timeout=60)
        wait_until(lambda: temp_entries(shared.store) != [], timeout=20)  # the upload is being written
        future.cancel()
        release.set()
        assert future.cancelled()
    wait_until(lambda: temp_entries(shared.store) == [], timeout=20)
    assert tree_state(shared.store) == before


def test_two_concurrent_uploads_of_one_name_never_mix(shared, kind_dirs):
    a, b = files_of(kind_dirs["LORA"]), files_of(kind_dirs["IA3"])
    for round_ in range(4):
        overwrite = round_ % 2 == 1
        name = f"race-{round_}"
        results: dict[str, tuple[str, str]] = {}
        start = threading.Barrier(2)

        def send(
            label: str, files: Files, name=name, overwrite=overwrite, start=start, results=results
        ) -> None:
            start.wait(10)
            results[label] = upload(shared.target, name, files, chunk=4096, overwrite=overwrite)

        threads = [threading.Thread(target=send, args=args) for args in (("a", a), ("b", b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        codes = sorted(code for code, _ in results.values())
        if overwrite:
            assert codes == ["OK", "OK"], results  # they serialize
        else:
            assert codes == ["ALREADY_EXISTS", "OK"], results  # one wins
        stored = stored_files(shared.store, name)
        assert stored in (a, b), "the stored adapter mixes the files of two uploads"
        if not overwrite:
            winner = a if results["a"][0] == "OK" else b
            assert stored == winner
    assert temp_entries(shared.store) == []


def test_a_symlink_planted_in_the_store_is_never_followed(shared, kind_dirs, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / CONFIG).write_text("not yours")
    (shared.store / "planted").symlink_to(outside, target_is_directory=True)
    before = tree_state(shared.store)
    outside_before = tree_state(outside)
    files = files_of(kind_dirs["LORA"])
    assert upload(shared.target, "planted", files)[0] == "ALREADY_EXISTS"
    assert tree_state(shared.store) == before
    with grpc.insecure_channel(shared.target) as channel:
        with pytest.raises(grpc.RpcError) as info:
            generation_pb2_grpc.GenerationStub(channel).Generate(
                generation_pb2.GenerateRequest(prompt="hi", adapter="planted"), timeout=30
            )
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    # Replacing it swaps the link itself out; the directory it pointed to is untouched.
    assert upload(shared.target, "planted", files, overwrite=True)[0] == "OK"
    assert not (shared.store / "planted").is_symlink() and stored_files(shared.store, "planted") == files
    assert tree_state(outside) == outside_before
