"""A real `kill -9` of a child process writing to the store: after restart, only complete adapters are
listed, each verifies against its manifest, and no temporary folder is left."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from adapterserve.server.store.upload import UploadRequest
from tests.server.store.disk import entries, records

REPO = Path(__file__).resolve().parents[3]

CHILD = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from adapterserve.server.model.spec import BaseModelSpec
    from adapterserve.server.store.store import AdapterStore
    from adapterserve.server.store.upload import UploadRequest
    from tests.server.store.validators import make_validator

    root, spec_json, lora, mode = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4]
    raw = json.loads(spec_json)
    raw["linear_shapes"] = {k: tuple(v) for k, v in raw["linear_shapes"].items()}
    store = AdapterStore(Path(root), make_validator(BaseModelSpec(**raw)))
    config = (lora / "adapter_config.json").read_bytes()
    weights = (lora / "adapter_model.safetensors").read_bytes()
    if mode == "slow":
        store.put_dir(lora, UploadRequest("complete"))
        session = store.begin_upload(UploadRequest("half-written"))
        session.write("adapter_config.json", config)
        session.write("adapter_model.safetensors", weights[: len(weights) // 2])
        print("MID", flush=True)
        time.sleep(60)  # killed here, mid-upload
    else:  # busy: puts, replaces and deletes as fast as possible until killed
        print("MID", flush=True)
        i = 0
        while True:
            name = f"a{i % 7}"
            store.put_dir(lora, UploadRequest(name, overwrite=True))
            if i % 3 == 0:
                store.delete(name)
            i += 1
    """
)


def start_child(store_root: Path, spec, lora: Path, mode: str) -> subprocess.Popen:
    spec_json = json.dumps(dataclasses.asdict(spec))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(store_root), spec_json, str(lora), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
        env=env,
        text=True,
    )
    line = proc.stdout.readline()
    if line.strip() != "MID":
        proc.kill()
        pytest.fail(f"child did not start: {line!r} {proc.stderr.read()}")
    return proc


def kill9(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL


def test_kill9_mid_upload_leaves_only_complete_adapters(make_store, spec, lora_dirs, tmp_path):
    root = tmp_path / "store"
    proc = start_child(root, spec, lora_dirs[0], "slow")
    assert any(n.startswith(".upload-") for n in os.listdir(root))  # the half upload is on disk
    kill9(proc)

    store = make_store()
    assert store.names() == ["complete"]
    assert store.failed == {}
    assert len(store.scan_report.cleaned) == 1
    assert entries(root) == ["complete"] and records(root) == {"complete": 1}
    store.verify("complete")


@pytest.mark.parametrize("delay", [0.1, 0.6])
def test_kill9_during_busy_puts_replaces_and_deletes(make_store, spec, lora_dirs, tmp_path, delay):
    root = tmp_path / "store"
    proc = start_child(root, spec, lora_dirs[1], "busy")
    time.sleep(delay)
    kill9(proc)

    store = make_store()
    assert store.failed == {}
    assert entries(root) == store.names()  # no temporary folder left, nothing unserved
    recorded = records(root)  # no half-written record left
    for name in store.names():
        assert recorded[name] >= store.manifest(name).version  # the record is never behind the disk
        store.verify(name)
        manifest, loaded = store.load(name)
        assert loaded.info.rank == 2
    for i in range(7):  # deleted or not, a name's next version is above any it had before the kill
        name = f"a{i}"
        assert store.put_dir(
            lora_dirs[1], UploadRequest(name, overwrite=True)
        ).manifest.version > recorded.get(name, 0)
