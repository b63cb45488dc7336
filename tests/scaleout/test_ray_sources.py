"""Two Ray Serve replicas on one adapter source and nothing uploaded: each replica fetches the adapters it
is routed on first use, and every adapter answers with the same greedy text whichever replica serves it."""

from __future__ import annotations

import collections
import concurrent.futures
import shutil
import time

import httpx
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from tests.helpers.peft_adapters import write_lora_dir  # noqa: E402
from tests.helpers.server_process import free_port  # noqa: E402
from tests.helpers.web_sources import FolderServer  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

ADAPTERS = [f"task-{i:02d}" for i in range(8)]
PROMPT = "The capital of France is"


def test_replicas_fetch_from_one_source_with_no_upload_step(tiny_model_dir, tiny_base, tmp_path):
    from adapterserve.server.scaleout.app import application
    from adapterserve.server.scaleout.settings import ScaleOutSettings
    from adapterserve.server.settings import EngineSettings, ServerSettings, SourceSettings

    web = tmp_path / "web"
    for i, name in enumerate(ADAPTERS):
        shutil.copytree(write_lora_dir(tmp_path / "src" / name, tiny_base.spec, seed=i, r=4), web / name)
    with FolderServer(web) as source:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, object_store_memory=80 << 20)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        settings = ScaleOutSettings(
            num_replicas=2,
            max_adapters_per_replica=8,
            max_ongoing_requests=8,
            num_cpus_per_replica=1,
            server=ServerSettings(
                base_model=str(tiny_model_dir),
                quantize="none",
                device="cpu",
                store=tmp_path / "store",  # starts empty: nothing is uploaded
                served_model_name="tiny-base",
                engine=EngineSettings(max_batch_size=8, adapter_slots=9),
                sources=SourceSettings(uris=(source.url,)),
            ),
        )
        try:
            serve.run(application(settings), name="adapterserve", route_prefix="/")
            url = f"http://127.0.0.1:{port}"
            texts: dict[str, set[str]] = collections.defaultdict(set)
            replicas: dict[str, set[str]] = collections.defaultdict(set)

            def ask(name: str) -> None:
                body = {"model": name, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
                with httpx.Client(base_url=url, timeout=120) as client:
                    for attempt in range(6):
                        reply = client.post("/v1/completions", json=body)
                        if reply.status_code == 200:
                            texts[name].add(reply.json()["choices"][0]["text"])
                            replicas[name].add(reply.headers["x-adapterserve-replica"])
                            return
                        assert reply.status_code in (429, 503), reply.text
                        time.sleep(0.5 * (attempt + 1))
                    raise AssertionError(f"{name}: no answer")

            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                list(pool.map(ask, ADAPTERS * 4))
            assert set(texts) == set(ADAPTERS)
            assert all(len(t) == 1 for t in texts.values()), texts  # one greedy text per adapter
            with httpx.Client(base_url=url, timeout=60) as client:
                missing = client.post(
                    "/v1/completions", json={"model": "nope", "prompt": PROMPT, "max_tokens": 2}
                )
            assert missing.status_code == 404 and source.url in missing.json()["error"]["message"]
            # each adapter's weights crossed the wire at most once per replica that served it
            for name in ADAPTERS:
                assert source.gets[f"/{name}/adapter_model.safetensors"] <= len(replicas[name])
        finally:
            serve.shutdown()
            ray.shutdown()
