"""The store on disk: atomic put/replace/delete, every refused upload leaves the tree unchanged,
start-up recovery and hash verification, symlinks never followed."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import pickle
import shutil
import struct
import threading
import time
from pathlib import Path

import pytest
import torch

from adapterserve.server.errors import (
    AdapterValidationError,
    AlreadyExistsError,
    BaseMismatchError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnsupportedAdapterError,
)
from adapterserve.server.store import upload as upload_module
from adapterserve.server.store.manifest import MANIFEST_FILE, Manifest
from adapterserve.server.store.store import AdapterStore
from adapterserve.server.store.upload import UploadRequest
from tests.helpers.peft_adapters import tree_state, write_lora_dir
from tests.server.store.disk import entries, records
from tests.server.store.validators import make_validator

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def files_of(d: Path) -> list[tuple[str, bytes]]:
    return [(CONFIG, (d / CONFIG).read_bytes()), (WEIGHTS, (d / WEIGHTS).read_bytes())]


def test_put_lists_and_writes_peft_format_plus_manifest(make_store, lora_dirs, tiny_base):
    store = make_store()
    result = store.put_dir(lora_dirs[0], UploadRequest("task-a", description="first"))
    m = result.manifest
    assert result.replaced is None and result.received_bytes == sum(len(b) for _, b in files_of(lora_dirs[0]))
    assert store.names() == ["task-a"] and [x.name for x in store.list()] == ["task-a"]
    folder = store.root / "task-a"
    assert sorted(os.listdir(folder)) == [CONFIG, WEIGHTS, MANIFEST_FILE]
    assert (folder / WEIGHTS).read_bytes() == (lora_dirs[0] / WEIGHTS).read_bytes()
    assert (m.kind, m.peft_type, m.rank, m.target_modules) == ("lora", "LORA", 2, ("q_proj", "v_proj"))
    assert m.version == 1 and m.base_fingerprint == tiny_base.fingerprint and m.description == "first"
    assert m.files[WEIGHTS].size == (lora_dirs[0] / WEIGHTS).stat().st_size
    on_disk = Manifest.from_bytes((folder / MANIFEST_FILE).read_bytes())
    assert on_disk == m and len(m.digest) == 64
    assert entries(store.root) == ["task-a"] and records(store.root) == {"task-a": 1}


def test_real_peft_save_pretrained_dir_is_stored(make_store, peft_adapter_dirs):
    store = make_store()
    store.put_dir(
        peft_adapter_dirs["LORA"], UploadRequest("peft-lora")
    )  # README.md that PEFT writes is not sent
    assert store.manifest("peft-lora").rank == 4


def test_overwrite_replaces_atomically_and_bumps_version(make_store, lora_dirs):
    store = make_store()
    first = store.put_dir(lora_dirs[0], UploadRequest("a")).manifest
    with pytest.raises(AlreadyExistsError, match="'a' already exists"):
        store.put_dir(lora_dirs[1], UploadRequest("a"))
    second = store.put_dir(lora_dirs[1], UploadRequest("a", overwrite=True))
    assert second.replaced == first and second.manifest.version == 2 and second.manifest.uid != first.uid
    assert (store.root / "a" / WEIGHTS).read_bytes() == (lora_dirs[1] / WEIGHTS).read_bytes()
    assert entries(store.root) == ["a"] and records(store.root) == {"a": 2}


def test_delete_is_atomic_and_versions_never_repeat(make_store, lora_dirs):
    store = make_store()
    store.put_dir(lora_dirs[0], UploadRequest("a"))
    store.put_dir(lora_dirs[0], UploadRequest("a", overwrite=True))
    assert store.delete("a").version == 2
    assert entries(store.root) == [] and records(store.root) == {"a": 2}  # the record outlives the adapter
    with pytest.raises(NotFoundError, match="'a' not found"):
        store.manifest("a")
    with pytest.raises(NotFoundError):
        store.delete("a")
    assert store.put_dir(lora_dirs[0], UploadRequest("a")).manifest.version == 3
    assert (
        make_store().put_dir(lora_dirs[0], UploadRequest("a", overwrite=True)).manifest.version == 4
    )  # after a restart


# ------------------------------------------------------------------------------------ refusals
def pickle_bytes() -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)
    return buf.getvalue()


def refusals(lora: Path, other_base: Path):
    """(description, name, files, kwargs, error type, message fragment) for every refusal."""
    config, weights = (lora / CONFIG).read_bytes(), (lora / WEIGHTS).read_bytes()
    cfg = json.loads(config)
    hostile_header = b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 999]}}'
    return [
        (
            "bin file",
            "x",
            [(CONFIG, config), ("adapter_model.bin", b"\x80\x02}q\x00.")],
            {},
            AdapterValidationError,
            "'adapter_model.bin' is refused: .bin files are pickle",
        ),
        ("pt file", "x", [("model.pt", pickle_bytes())], {}, AdapterValidationError, ".pt files are pickle"),
        ("pth file", "x", [("w.pth", b"x")], {}, AdapterValidationError, ".pth files are pickle"),
        ("ckpt file", "x", [("w.ckpt", b"x")], {}, AdapterValidationError, ".ckpt files are pickle"),
        ("pkl file", "x", [("w.pkl", b"x")], {}, AdapterValidationError, ".pkl files are pickle"),
        (
            "pickle as safetensors",
            "x",
            [(CONFIG, config), (WEIGHTS, pickle.dumps({"a": 1}, protocol=4))],
            {},
            AdapterValidationError,
            "pickle data (protocol 4); pickle is never loaded",
        ),
        (
            "torch zip as safetensors",
            "x",
            [(CONFIG, config), (WEIGHTS, pickle_bytes())],
            {},
            AdapterValidationError,
            "zip archive",
        ),
        (
            "pickle as config",
            "x",
            [(CONFIG, pickle.dumps({"a": 1}, protocol=2)), (WEIGHTS, weights)],
            {},
            AdapterValidationError,
            "adapter_config.json: holds pickle data",
        ),
        (
            "other file name",
            "x",
            [("README.md", b"hi")],
            {},
            AdapterValidationError,
            "'README.md' is not accepted",
        ),
        (
            "path in file name",
            "x",
            [("../adapter_config.json", config)],
            {},
            AdapterValidationError,
            "is invalid: a plain file name",
        ),
        (
            "missing weights",
            "x",
            [(CONFIG, config)],
            {},
            AdapterValidationError,
            "missing adapter_model.safetensors",
        ),
        (
            "file twice",
            "x",
            [(CONFIG, config), (WEIGHTS, weights), (CONFIG, config)],
            {},
            AdapterValidationError,
            "sent twice",
        ),
        (
            "unknown config field",
            "x",
            [(CONFIG, json.dumps({**cfg, "zzz": 1}).encode()), (WEIGHTS, weights)],
            {},
            AdapterValidationError,
            "unknown field 'zzz'",
        ),
        (
            "remote code",
            "x",
            [(CONFIG, json.dumps({**cfg, "auto_map": {}}).encode()), (WEIGHTS, weights)],
            {},
            AdapterValidationError,
            "'auto_map' asks to import or run code",
        ),
        (
            "dora",
            "x",
            [(CONFIG, json.dumps({**cfg, "lora_bias": True}).encode()), (WEIGHTS, weights)],
            {},
            UnsupportedAdapterError,
            "lora_bias = True",
        ),
        (
            "bad header",
            "x",
            [(CONFIG, config), (WEIGHTS, struct.pack("<Q", len(hostile_header)) + hostile_header)],
            {},
            AdapterValidationError,
            "safetensors refused the file",
        ),
        (
            "too big",
            "x",
            [(CONFIG, config), (WEIGHTS, weights)],
            {"max_bytes": 1000},
            ResourceExhaustedError,
            "larger than the cap of 1000 bytes",
        ),
        ("other base shapes", "x", files_of(other_base), {}, BaseMismatchError, "the base needs"),
        (
            "foreign fingerprint",
            "x",
            files_of(lora),
            {"base_fingerprint": "f" * 64},
            BaseMismatchError,
            "was made for base ffffffffffffffff",
        ),
        (
            "bad name",
            "../evil",
            files_of(lora),
            {},
            InvalidArgumentError,
            "adapter name '../evil' is invalid",
        ),
        ("absolute name", "/etc", files_of(lora), {}, InvalidArgumentError, "is invalid"),
        ("name taken", "taken", files_of(lora), {}, AlreadyExistsError, "'taken' already exists"),
    ]


@pytest.fixture
def other_base_lora(spec, tmp_path) -> Path:
    """A LoRA whose shapes fit another base (hidden 96, not 64)."""
    from dataclasses import replace

    other = replace(spec, linear_shapes={k: (96, 96) for k in spec.linear_shapes})
    return write_lora_dir(tmp_path / "other", other, seed=9)


def test_every_refused_upload_has_a_precise_error_and_leaves_the_store_unchanged(
    make_store, lora_dirs, other_base_lora
):
    store = make_store()
    store.put_dir(lora_dirs[0], UploadRequest("taken"))
    before = tree_state(store.root)
    cases = refusals(lora_dirs[1], other_base_lora)
    for desc, name, files, kwargs, error, fragment in cases:
        with pytest.raises(error) as info:
            store.upload(UploadRequest(name, **kwargs), iter(files))
        assert fragment in str(info.value), (desc, str(info.value))
        assert tree_state(store.root) == before, desc
    assert store.names() == ["taken"]
    assert len(cases) >= 20


def test_refused_async_upload_midway_leaves_store_unchanged(make_store, lora_dirs):
    store = make_store()
    before = tree_state(store.root)

    async def stream():
        yield CONFIG, (lora_dirs[0] / CONFIG).read_bytes()
        yield WEIGHTS, (lora_dirs[0] / WEIGHTS).read_bytes()[:100]
        yield "adapter_model.pt", b"\x80\x04"

    with pytest.raises(AdapterValidationError, match="pickle"):
        asyncio.run(store.upload_async(UploadRequest("x"), stream()))
    assert tree_state(store.root) == before


def test_async_upload_in_chunks(make_store, lora_dirs):
    store = make_store()

    async def stream():
        for fname, data in files_of(lora_dirs[2]):
            for i in range(0, len(data), 333):
                yield fname, data[i : i + 333]

    result = asyncio.run(store.upload_async(UploadRequest("chunked", description="d"), stream()))
    assert (store.root / "chunked" / WEIGHTS).read_bytes() == (lora_dirs[2] / WEIGHTS).read_bytes()
    assert result.manifest.description == "d"


def uploads_in_progress(root: Path) -> list[str]:
    return [n for n in os.listdir(root) if n.startswith(".upload-")]


def test_abort_waits_for_a_write_still_running_in_its_thread(make_store, lora_dirs, monkeypatch):
    # A cancelled gRPC upload aborts from one worker thread while its last write may still run in
    # another: the abort must not remove the folder under that write (a file created after the removal
    # began kept the folder, a temporary left in a live store).
    store = make_store()
    session = store.begin_upload(UploadRequest("x"))
    inside, release = threading.Event(), threading.Event()
    real_write = upload_module.UploadSession._write

    def slow_write(self, filename, chunk):
        real_write(self, filename, chunk)
        inside.set()
        release.wait(10)

    monkeypatch.setattr(upload_module.UploadSession, "_write", slow_write)
    writer = threading.Thread(target=session.write, args=files_of(lora_dirs[0])[0])
    writer.start()
    assert inside.wait(10)
    aborter = threading.Thread(target=session.abort)
    aborter.start()
    time.sleep(0.2)
    assert aborter.is_alive()  # waits for the write
    release.set()
    writer.join(10)
    aborter.join(10)
    assert uploads_in_progress(store.root) == []
    with pytest.raises(RuntimeError, match="finished"):
        session.write(*files_of(lora_dirs[0])[1])
    assert uploads_in_progress(store.root) == []


@pytest.mark.parametrize("when", ["begin", "writing"])
def test_a_cancelled_async_upload_leaves_no_temporary(make_store, lora_dirs, monkeypatch, when):
    store = make_store()
    before = tree_state(store.root)
    started = threading.Event()
    if when == "begin":  # cancelled while its folder is being made in a worker thread
        real_new_dir = upload_module.new_upload_dir

        def slow_new_dir(root):
            started.set()
            time.sleep(0.3)
            return real_new_dir(root)

        monkeypatch.setattr(upload_module, "new_upload_dir", slow_new_dir)

    async def stream():
        for fname, data in files_of(lora_dirs[0]):
            for i in range(0, len(data), 64):
                started.set()
                await asyncio.sleep(0.01)
                yield fname, data[i : i + 64]

    async def cancel_midway():
        task = asyncio.create_task(store.upload_async(UploadRequest("x"), stream()))
        while not started.is_set():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.6)  # the worker thread finishes what it had started

    asyncio.run(cancel_midway())
    assert uploads_in_progress(store.root) == []
    assert tree_state(store.root) == before


# ------------------------------------------------------------------------------------ start-up
def test_restart_verifies_hashes_and_reports_tampered_adapters(make_store, lora_dirs):
    store = make_store()
    for i, name in enumerate(["good", "flipped", "truncated", "extra", "nomanifest"]):
        store.put_dir(lora_dirs[i % 4], UploadRequest(name))
    w = store.root / "flipped" / WEIGHTS
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    t = store.root / "truncated" / WEIGHTS
    t.write_bytes(t.read_bytes()[:-4])
    (store.root / "extra" / "adapter_model.bin").write_bytes(b"\x80\x02.")
    (store.root / "nomanifest" / MANIFEST_FILE).unlink()

    reopened = make_store()
    assert reopened.names() == ["good"]
    failed = reopened.failed
    assert "sha256" in failed["flipped"]
    assert "bytes; the manifest says" in failed["truncated"]
    assert "extra ['adapter_model.bin']" in failed["extra"]
    assert "nomanifest" in failed
    with pytest.raises(NotFoundError, match="in the store but not served: .*sha256"):
        reopened.manifest("flipped")
    # A failed adapter can be replaced (with overwrite) or deleted.
    reopened.put_dir(lora_dirs[0], UploadRequest("flipped", overwrite=True))
    reopened.delete("truncated")
    assert reopened.names() == ["flipped", "good"] and "truncated" not in reopened.failed


def test_adapters_of_another_base_are_not_served_after_restart(make_store, lora_dirs):
    make_store().put_dir(lora_dirs[0], UploadRequest("a"))
    other = make_store(base_fingerprint="0" * 64)
    assert other.names() == [] and "was made for base" in other.failed["a"]


def test_symlinks_are_never_followed(make_store, lora_dirs, tmp_path):
    store = make_store()
    store.put_dir(lora_dirs[0], UploadRequest("real"))
    outside = tmp_path / "outside"
    shutil.copytree(store.root / "real", outside)
    # an adapter folder that is a symlink to a perfect copy outside the store
    (store.root / "linked").symlink_to(outside, target_is_directory=True)
    # an adapter whose weights file is a symlink to a file outside the store
    shutil.copytree(store.root / "real", store.root / "filelink")
    (store.root / "filelink" / WEIGHTS).unlink()
    (store.root / "filelink" / WEIGHTS).symlink_to(outside / WEIGHTS)
    reopened = make_store()
    assert reopened.names() == ["real"]
    assert "symlink" in reopened.failed["linked"]
    assert "filelink" in reopened.failed
    # deleting the symlinked entry removes the link, never the target
    reopened.delete("linked")
    assert (outside / WEIGHTS).exists() and not os.path.lexists(store.root / "linked")


def test_crash_states_recover_to_old_or_new(make_store, lora_dirs, caplog):
    store = make_store()
    store.put_dir(lora_dirs[0], UploadRequest("kept"))
    store.put_dir(lora_dirs[1], UploadRequest("mid-replace"))
    store.put_dir(lora_dirs[2], UploadRequest("after-replace"))
    store.put_dir(lora_dirs[3], UploadRequest("mid-delete"))
    root = store.root
    old_mid = tree_state(root / "mid-replace")
    # crash after the old folder was parked but before the new one arrived: roll back
    os.rename(root / "mid-replace", root / f".replaced-{'a' * 32}-mid-replace")
    # crash after the new one arrived but before the old one was removed: keep the new one
    shutil.copytree(root / "after-replace", root / f".replaced-{'b' * 32}-after-replace")
    # crash during a delete (after the rename): the delete happened
    os.rename(root / "mid-delete", root / f".deleted-{'c' * 32}-mid-delete")
    # crash mid-upload: a half-written temporary folder
    (root / ".upload-123").mkdir()
    (root / ".upload-123" / WEIGHTS).write_bytes(b"partial")
    # crash mid-write of a version record: the temp file never got renamed over the record
    (root / ".versions" / f".{'d' * 32}.tmp").write_bytes(b"9")

    with caplog.at_level(logging.INFO, logger="adapterserve.server.store.store"):
        reopened = make_store()
    assert f"store {root}: removed 4 temporary entries left by an interrupted run" in caplog.text
    assert "rolled back 1 interrupted replace" in caplog.text
    assert reopened.names() == ["after-replace", "kept", "mid-replace"]
    assert reopened.scan_report.restored == ("mid-replace",)
    assert set(reopened.scan_report.cleaned) == {
        ".upload-123",
        f".replaced-{'b' * 32}-after-replace",
        f".deleted-{'c' * 32}-mid-delete",
        f".versions/.{'d' * 32}.tmp",
    }
    assert tree_state(root / "mid-replace") == old_mid
    assert not [n for n in entries(root) if n.startswith(".")]
    assert records(root) == dict.fromkeys(["kept", "mid-replace", "after-replace", "mid-delete"], 1)
    assert reopened.failed == {}


def test_load_rehashes_and_refuses_a_file_changed_after_start(make_store, lora_dirs):
    store = make_store()
    store.put_dir(lora_dirs[0], UploadRequest("a"))
    manifest, loaded = store.load("a")
    assert loaded.info.rank == 2 and manifest.name == "a"
    w = store.root / "a" / WEIGHTS
    data = bytearray(w.read_bytes())
    data[-1] ^= 1
    w.write_bytes(bytes(data))
    with pytest.raises(AdapterValidationError, match="changed on disk"):
        store.load("a")


def test_validator_runs_on_the_temp_folder_before_install(spec, tmp_path, lora_dirs):
    calls: list[Path] = []
    store = AdapterStore(tmp_path / "s", make_validator(spec, calls=calls))
    store.put_dir(lora_dirs[0], UploadRequest("a"))
    assert len(calls) == 1 and calls[0].name.startswith(".upload-") and calls[0].parent == store.root
    with pytest.raises(AdapterValidationError, match="above this server's cap of 1"):
        AdapterStore(tmp_path / "s2", make_validator(spec, max_rank=1)).put_dir(
            lora_dirs[0], UploadRequest("a")
        )


def test_real_loader_as_validator(make_store, tiny_base, lora_dirs, peft_adapter_dirs):
    """The server's own loader plugs in as the validator (skipped until it imports)."""
    import functools

    loader = pytest.importorskip("adapterserve.server.adapters.loader")
    from adapterserve.server.settings import EngineSettings

    validate = functools.partial(loader.load_adapter_dir, spec=tiny_base.spec, settings=EngineSettings())
    store = make_store(validate=validate)
    for peft_type, d in peft_adapter_dirs.items():
        store.put_dir(d, UploadRequest(peft_type.lower().replace("_", "-")))
    assert len(store) == len(peft_adapter_dirs)
    assert store.manifest("prefix-tuning").num_virtual_tokens == 4
