"""https:// (a local web folder), hf:// (the Hub's resolve endpoints on a local server, through
huggingface_hub) and file:// sources, fetched on first use through the registry."""

from __future__ import annotations

import asyncio
import shutil

import pytest

from adapterserve.server.errors import InvalidArgumentError, NotFoundError, UnavailableError
from adapterserve.server.store.sources import parse_source
from adapterserve.server.store.sources.base import redact
from adapterserve.server.store.sources.hf import HubSource
from tests.helpers.peft_adapters import write_lora_dir
from tests.helpers.server_process import free_port
from tests.helpers.web_sources import FolderServer, HubServer
from tests.server.store.sources.conftest import leftovers

pytestmark = pytest.mark.timeout(120)
WEIGHTS = "adapter_model.safetensors"


@pytest.fixture
def lora(tiny_base, tmp_path):
    return lambda i, r=2: write_lora_dir(tmp_path / f"src-{i}-{r}", tiny_base.spec, seed=i, r=r)


async def test_https_folder_single_flight_and_not_found(tmp_path, lora, make_registry):
    web = tmp_path / "web"
    shutil.copytree(lora(1), web / "models" / "web-1")
    with FolderServer(web) as server:
        registry = make_registry([f"{server.url}/models"])
        results = await asyncio.gather(*(registry.get("web-1") for _ in range(32)))
        assert len({r.uid for r in results}) == 1
        assert server.gets[f"/models/web-1/{WEIGHTS}"] == 1
        origin = registry.store.manifest("web-1").origin
        assert origin.source == f"{server.url}/models" and origin.tag  # Last-Modified
        with pytest.raises(NotFoundError) as caught:
            await registry.get("absent")
        assert f"{server.url}/models" in str(caught.value)
    assert leftovers(registry.store) == []


async def test_https_server_gone_is_unavailable(tmp_path, lora, make_registry):
    registry = make_registry([f"http://127.0.0.1:{free_port()}/models"], fetch_timeout_s=2.0)
    with pytest.raises(UnavailableError):
        await registry.get("x")
    assert registry.store.names() == [] and leftovers(registry.store) == []


async def test_hub_source_pins_the_commit_sends_the_token_and_refreshes(
    tmp_path, lora, make_registry, monkeypatch
):
    hub_root = tmp_path / "hub"
    shutil.copytree(lora(2), hub_root / "team" / "task-a" / "main")
    shutil.copytree(lora(3), hub_root / "team" / "task-a" / "v1")
    monkeypatch.setenv("HF_TOKEN", "hf_testtoken_abcdefghijklmnop")
    with HubServer(hub_root) as hub:
        main = HubSource("hf://team", timeout_s=5.0, endpoint=hub.url)
        pinned = HubSource("hf://team@v1", timeout_s=5.0, endpoint=hub.url)
        registry = make_registry(["hf://team"], sources=[main])
        fetched = await registry.get("task-a")
        origin = registry.store.manifest("task-a").origin
        assert origin.source == "hf://team"
        assert origin.revision == hub.commit(hub_root / "team" / "task-a" / "main")
        assert hub.gets[f"team/task-a/{WEIGHTS}"] == 1
        assert "Bearer hf_testtoken_abcdefghijklmnop" in hub.auth
        with pytest.raises(NotFoundError) as caught:
            await registry.get("task-b")  # the Hub's RepoNotFound
        assert "hf://team" in str(caught.value)

        # a new push to main: refresh sees a new commit and swaps it in
        shutil.rmtree(hub_root / "team" / "task-a" / "main")
        shutil.copytree(lora(4, r=4), hub_root / "team" / "task-a" / "main")
        result = await registry.refresh("task-a")
        assert result.changed and (await registry.get("task-a")).info.rank == 4
        assert fetched.info.rank == 2

        other = make_registry(["hf://team@v1"], root=tmp_path / "store-v1", sources=[pinned])
        await other.get("task-a")
        assert other.store.manifest("task-a").origin.revision == hub.commit(
            hub_root / "team" / "task-a" / "v1"
        )


async def test_hub_endpoint_comes_from_huggingface_hub(tmp_path, lora, make_registry, monkeypatch):
    """HF_ENDPOINT points hf:// sources at a Hub mirror or a private Hub."""
    hub_root = tmp_path / "hub"
    shutil.copytree(lora(5), hub_root / "org" / "m" / "main")
    with HubServer(hub_root) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        registry = make_registry(["hf://org"])
        assert (await registry.get("m")).info.kind == "lora"


async def test_file_source_never_follows_links_out_of_it(tmp_path, lora, make_registry):
    root = tmp_path / "dir"
    shutil.copytree(lora(6), root / "ok")
    outside = lora(7)
    (root / "linked").symlink_to(outside)  # a folder link leading out of the source
    (root / "filelinks").mkdir()
    for name in ("adapter_config.json", WEIGHTS):
        (root / "filelinks" / name).symlink_to(outside / name)
    registry = make_registry([f"file://{root}"])
    assert (await registry.get("ok")).info.kind == "lora"
    for name in ("linked", "filelinks"):
        with pytest.raises(NotFoundError):
            await registry.get(name)
    assert registry.store.names() == ["ok"] and leftovers(registry.store) == []


@pytest.mark.parametrize(
    "uri",
    [
        "ftp://host/x",
        "gs://bucket",
        "s3://",
        "hf://",
        "hf://a/b",
        "file://host/dir",
        "file:relative",
        "https://u:p@h/x",
    ],
)
def test_bad_source_uris_are_refused_at_start(uri):
    with pytest.raises(InvalidArgumentError) as caught:
        parse_source(uri, timeout_s=1.0)
    assert "u:p@" not in str(caught.value)


def test_redact_removes_secrets_user_info_and_queries(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "topsecretvalue123")
    text = redact(
        "GET https://user:pw@host/b/k?X-Amz-Signature=abc failed with topsecretvalue123\nsecond line"
    )
    assert "topsecretvalue123" not in text and "pw@" not in text and "abc" not in text
    assert "second line" not in text and "https://***@host/b/k?***" in text


async def test_a_source_too_slow_is_unavailable_within_the_timeout_and_leaves_nothing(
    tmp_path, tiny_base, make_registry
):
    web = tmp_path / "slow-web"
    shutil.copytree(write_lora_dir(tmp_path / "big", tiny_base.spec, seed=1, r=16), web / "slow")
    with FolderServer(web, delay_s=0.25) as server:  # ~32 KiB in 4 KiB pieces: about 2 s
        registry = make_registry([server.url], fetch_timeout_s=1.0)
        started = asyncio.get_running_loop().time()
        with pytest.raises(UnavailableError) as caught:
            await registry.get("slow")
        assert asyncio.get_running_loop().time() - started < 1.5
        assert "1 s" in str(caught.value)
        for _ in range(60):  # the copy stops at its own deadline, between two pieces
            if not registry.sources.inflight():
                break
            await asyncio.sleep(0.1)
        assert not registry.sources.inflight()
        assert registry.store.names() == [] and leftovers(registry.store) == []
        server.delay_s = 0.0
        assert (await registry.get("slow")).info.kind == "lora"  # not remembered: the next request retries
