"""kill -9 of a real server while it fetches adapters from a (slow) source leaves only whole adapters:
the fetch was streaming into a private .upload-* folder, which the next start removes."""

from __future__ import annotations

import shutil
import threading
import time

import grpc
import pytest

from adapterserve.server.store.store import AdapterStore
from adapterserve.v1 import generation_pb2, generation_pb2_grpc
from tests.helpers.peft_adapters import write_lora_dir
from tests.helpers.server_process import start_server
from tests.helpers.web_sources import FolderServer

pytestmark = pytest.mark.timeout(240)


def _no_validation(path):  # the store's scan re-hashes files against manifests; it never loads them
    raise AssertionError("not called by a scan")


def test_kill_9_during_fetches_leaves_only_whole_adapters(tiny_model_dir, tiny_base, tmp_path):
    web = tmp_path / "web"
    for i in range(4):
        shutil.copytree(write_lora_dir(tmp_path / f"src{i}", tiny_base.spec, seed=i, r=16), web / f"slow-{i}")
    store_dir = tmp_path / "store"
    with FolderServer(web, delay_s=0.2) as source:
        server = start_server(
            tiny_model_dir,
            store_dir,
            extra_args=["--adapter-source", source.url, "--adapter-fetch-timeout", "60"],
        )
        try:
            channel = grpc.insecure_channel(server.target)
            stub = generation_pb2_grpc.GenerationStub(channel)

            def ask(name: str) -> None:
                request = generation_pb2.GenerateRequest(
                    adapter=name, prompt="Hi", sampling=generation_pb2.SamplingParams(max_new_tokens=2)
                )
                try:
                    stub.Generate(request, timeout=60)
                except grpc.RpcError:
                    pass  # the server dies under it

            ask("slow-0")  # one whole adapter before the crash
            threads = [threading.Thread(target=ask, args=(f"slow-{i}",), daemon=True) for i in (1, 2, 3)]
            for t in threads:
                t.start()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                partial = [p for p in store_dir.glob(".upload-*") if any(p.iterdir())]
                if partial:
                    break
                time.sleep(0.02)
            assert partial, "no fetch in progress was seen"
            server.proc.kill()  # kill -9 in the middle of streaming
            server.proc.wait(10)
            channel.close()
        finally:
            if server.proc.poll() is None:
                server.proc.kill()
    store = AdapterStore(store_dir, _no_validation)
    report = store.scan_report
    assert report.failed == {}
    assert any(name.startswith(".upload-") for name in report.cleaned)
    assert "slow-0" in report.served and set(report.served) <= {f"slow-{i}" for i in range(4)}
    for name in report.served:
        assert store.manifest(name).origin is not None
    assert not list(store_dir.glob(".upload-*"))
