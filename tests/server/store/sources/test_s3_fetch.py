"""Fetch on first use from a real S3-compatible server (rclone serve s3 on 127.0.0.1), through the
registry as every request path reaches it: single flight, the upload's checks, errors, refresh, disk tier."""

from __future__ import annotations

import asyncio
import json
import logging
import pickle
import time

import pytest

from adapterserve.server.errors import (
    AdapterValidationError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from adapterserve.server.store.upload import UploadRequest
from tests.helpers.object_store import SECRET_KEY, wait_for_log
from tests.helpers.peft_adapters import write_lora_dir
from tests.server.store.sources.conftest import leftovers

pytestmark = pytest.mark.timeout(120)

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


@pytest.fixture
def lora(tiny_base, tmp_path):
    return lambda i, r=2: write_lora_dir(tmp_path / f"src-{i}-{r}", tiny_base.spec, seed=i, r=r)


async def test_first_use_fetches_validates_commits_and_records_the_origin(
    s3, s3_env, bucket, lora, make_registry
):
    s3.put_dir(f"{bucket}/team/task-1", lora(1))
    registry = make_registry([f"s3://{bucket}/team"])
    assert "task-1" not in registry.store
    resolved = await registry.get("task-1")
    assert resolved.info.kind == "lora" and resolved.name == "task-1"
    manifest = registry.store.manifest("task-1")
    assert manifest.origin is not None
    assert manifest.origin.source == f"s3://{bucket}/team"
    assert manifest.origin.tag and '"' in manifest.origin.tag  # the objects' ETags
    assert manifest.files[WEIGHTS].size == (s3.data / bucket / "team/task-1" / WEIGHTS).stat().st_size
    assert registry.tier("task-1") == "host"  # the fetch's validated adapter went into the host cache
    assert leftovers(registry.store) == []
    again = await registry.get("task-1")
    assert again.uid == resolved.uid
    wait_for_log(s3, lambda log: log.count(f"task-1/{WEIGHTS}") >= 1)
    assert s3.object_gets(f"{bucket}/team/task-1/{WEIGHTS}") == 1


async def test_32_concurrent_first_requests_download_once(s3, s3_env, bucket, lora, make_registry):
    s3.put_dir(f"{bucket}/p/hot", lora(2))
    registry = make_registry([f"s3://{bucket}/p"])
    results = await asyncio.gather(*(registry.get("hot") for _ in range(32)))
    assert len({r.uid for r in results}) == 1
    time.sleep(0.5)  # rclone's log is written asynchronously
    assert s3.object_gets(f"{bucket}/p/hot/{WEIGHTS}") == 1
    assert s3.object_gets(f"{bucket}/p/hot/{CONFIG}") == 1
    assert registry.sources.stats.outcomes[(f"s3://{bucket}/p", "fetched")] == 1


async def test_sources_are_tried_in_order_and_not_found_names_them(
    s3, s3_env, bucket, lora, make_registry, tmp_path
):
    import shutil

    local = tmp_path / "local"
    shutil.copytree(lora(3), local / "only-local")
    s3.put_dir(f"{bucket}/a/both", lora(4))
    shutil.copytree(lora(5), local / "both")
    registry = make_registry([f"s3://{bucket}/a", f"file://{local}"])
    assert (await registry.get("only-local")).info.kind == "lora"
    assert registry.store.manifest("only-local").origin.source == f"file://{local}"
    await registry.get("both")
    assert registry.store.manifest("both").origin.source == f"s3://{bucket}/a"  # the first source wins
    with pytest.raises(NotFoundError) as caught:
        await registry.get("nowhere")
    message = str(caught.value)
    assert f"s3://{bucket}/a" in message and f"file://{local}" in message
    assert leftovers(registry.store) == []


@pytest.mark.parametrize(
    "name",
    ["../etc", "a/b", "a%2Fb", "%2e%2e", "/abs", "a?x=1", "a#f", "s3://other/x", "", ".hidden", "a" * 200],
)
async def test_hostile_names_never_reach_a_source(s3, s3_env, bucket, make_registry, name):
    registry = make_registry([f"s3://{bucket}/p"])
    before = s3.requests_mentioning(bucket)
    with pytest.raises(InvalidArgumentError):
        await registry.get(name)
    time.sleep(0.2)
    assert s3.requests_mentioning(bucket) == before
    assert registry.store.names() == [] and leftovers(registry.store) == []


def _pickle_weights() -> bytes:
    return pickle.dumps({"lora_A": [1.0, 2.0]}, protocol=4)


async def test_hostile_objects_get_the_uploads_errors_and_leave_nothing(
    s3, s3_env, bucket, lora, make_registry, tiny_base, tmp_path
):
    good = lora(6)
    config = (good / CONFIG).read_bytes()
    # pickle bytes under the safetensors name
    s3.put_bytes(f"{bucket}/h/pickled/{CONFIG}", config)
    s3.put_bytes(f"{bucket}/h/pickled/{WEIGHTS}", _pickle_weights())
    # only a pickle file (adapter_model.bin): the safetensors file is missing
    s3.put_bytes(f"{bucket}/h/binonly/{CONFIG}", config)
    s3.put_bytes(f"{bucket}/h/binonly/adapter_model.bin", _pickle_weights())
    # wrong shapes for the base (a LoRA made for another hidden size)
    wrong = tmp_path / "wrong"
    write_lora_dir(wrong, tiny_base.spec, seed=1)
    from safetensors.torch import load_file, save_file

    tensors = {
        k: v[:, :-1].contiguous() if "lora_A" in k else v for k, v in load_file(wrong / WEIGHTS).items()
    }
    save_file(tensors, wrong / WEIGHTS)
    s3.put_dir(f"{bucket}/h/shapes", wrong)
    # a broken config, and a config outside the allow-list
    s3.put_bytes(f"{bucket}/h/broken/{CONFIG}", b"{not json")
    s3.put_bytes(f"{bucket}/h/broken/{WEIGHTS}", (good / WEIGHTS).read_bytes())
    evil = json.loads(config) | {"peft_type": "EVIL_TYPE"}
    s3.put_bytes(f"{bucket}/h/kind/{CONFIG}", json.dumps(evil).encode())
    s3.put_bytes(f"{bucket}/h/kind/{WEIGHTS}", (good / WEIGHTS).read_bytes())
    # too large for --max-adapter-bytes (1 MiB in these tests): refused from its content length
    s3.put_bytes(f"{bucket}/h/huge/{CONFIG}", config)
    s3.put_bytes(f"{bucket}/h/huge/{WEIGHTS}", b"\0" * (2 << 20))

    registry = make_registry([f"s3://{bucket}/h"])
    for name in ("pickled", "binonly", "shapes", "broken", "kind"):
        with pytest.raises(AdapterValidationError):
            await registry.get(name)
    with pytest.raises(ResourceExhaustedError):
        await registry.get("huge")
    time.sleep(0.3)
    assert s3.object_gets(f"{bucket}/h/huge/{WEIGHTS}") == 0  # refused before the download
    assert s3.object_gets(f"{bucket}/h/binonly/adapter_model.bin") == 0  # never read
    assert registry.store.names() == [] and leftovers(registry.store) == []
    assert sorted(p.name for p in registry.store.root.iterdir() if not p.name.startswith(".")) == []

    # the negative cache: a storm of requests for a broken name asks the bucket once
    gets = s3.object_gets(f"{bucket}/h/pickled/{WEIGHTS}")
    for _ in range(20):
        with pytest.raises(AdapterValidationError):
            await registry.get("pickled")
    time.sleep(0.3)
    assert s3.object_gets(f"{bucket}/h/pickled/{WEIGHTS}") == gets
    assert registry.sources.stats.negative_hits >= 20


async def test_negative_cache_expires(s3, s3_env, bucket, lora, make_registry):
    registry = make_registry([f"s3://{bucket}/n"], negative_ttl_s=0.3)
    with pytest.raises(NotFoundError):
        await registry.get("later")
    s3.put_dir(f"{bucket}/n/later", lora(7))
    with pytest.raises(NotFoundError):
        await registry.get("later")  # still remembered as missing
    await asyncio.sleep(0.35)
    assert (await registry.get("later")).info.kind == "lora"


async def test_store_down_is_unavailable_within_the_timeout_and_recovers(
    s3, s3_env, bucket, lora, make_registry
):
    s3.put_dir(f"{bucket}/o/x1", lora(8))
    registry = make_registry([f"s3://{bucket}/o"], fetch_timeout_s=3.0)
    s3.stop()
    try:
        started = time.monotonic()
        with pytest.raises(UnavailableError) as caught:
            await registry.get("x1")
        assert time.monotonic() - started < 3.5
        assert f"s3://{bucket}/o" in str(caught.value)
        assert registry.store.names() == [] and leftovers(registry.store) == []
    finally:
        s3.start()
    assert (await registry.get("x1")).info.kind == "lora"  # not remembered: the next request tries again


async def test_credentials_never_appear_in_errors_or_logs(
    s3, bucket, lora, make_registry, monkeypatch, caplog
):
    wrong_secret = "wrongSecretKeyValue/abcdefghijklmnop1234"
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong_secret)
    s3.put_dir(f"{bucket}/c/x", lora(9))
    registry = make_registry([f"s3://{bucket}/c"], fetch_timeout_s=3.0)
    with caplog.at_level(logging.DEBUG, logger="adapterserve"):
        with pytest.raises(UnavailableError) as caught:
            await registry.get("x")
    text = str(caught.value) + caplog.text
    assert wrong_secret not in text and SECRET_KEY not in text


async def test_refresh_picks_up_a_new_etag_atomically(s3, s3_env, bucket, lora, make_registry):
    s3.put_dir(f"{bucket}/r/task", lora(10))
    registry = make_registry([f"s3://{bucket}/r"])
    first = await registry.get("task")
    unchanged = await registry.refresh("task")
    assert not unchanged.changed and unchanged.manifest.uid == first.uid
    s3.put_dir(f"{bucket}/r/task", lora(11, r=4))
    changed = await registry.refresh("task")
    assert changed.changed and changed.manifest.version > first.version
    second = await registry.get("task")
    assert second.uid == changed.manifest.uid and second.info.rank == 4
    assert first.info.rank == 2  # a request holding the old version keeps it whole
    assert leftovers(registry.store) == []


async def test_refresh_of_an_uploaded_adapter_is_refused(s3, s3_env, bucket, lora, make_registry):
    registry = make_registry([f"s3://{bucket}/u"])
    registry.store.put_dir(lora(12), UploadRequest("uploaded"))
    with pytest.raises(FailedPreconditionError):
        await registry.refresh("uploaded")
    with pytest.raises(NotFoundError):
        await registry.refresh("missing")


async def test_ttl_revalidates_in_the_background(s3, s3_env, bucket, lora, make_registry):
    s3.put_dir(f"{bucket}/t/task", lora(13))
    registry = make_registry([f"s3://{bucket}/t"], ttl_s=0.2)
    first = await registry.get("task")
    s3.put_dir(f"{bucket}/t/task", lora(14, r=4))
    await asyncio.sleep(0.3)
    served = await registry.get("task")  # the old version at once; the refresh runs behind it
    assert served.uid == first.uid
    for _ in range(100):
        await asyncio.sleep(0.05)
        if registry.store.manifest("task").uid != first.uid:
            break
    assert (await registry.get("task")).info.rank == 4


async def test_disk_tier_evicts_fetched_lru_never_uploaded_or_pinned(s3, s3_env, bucket, lora, make_registry):
    for i in range(5):
        s3.put_dir(f"{bucket}/d/f{i}", lora(20 + i))
    one = (s3.data / bucket / "d/f0" / WEIGHTS).stat().st_size + (
        s3.data / bucket / "d/f0" / CONFIG
    ).stat().st_size
    registry = make_registry([f"s3://{bucket}/d"], store_max_bytes=int(one * 2.5))
    registry.store.put_dir(lora(30), UploadRequest("uploaded"))
    await registry.get("f0")
    await registry.pin("f0")
    await registry.get("f1")
    await registry.get("f2")  # over budget: f1 (least recently used, not pinned) goes
    assert set(registry.store.names()) == {"uploaded", "f0", "f2"}
    await registry.get("f3")
    await registry.get("f4")
    assert set(registry.store.names()) == {"uploaded", "f0", "f4"}
    assert registry.sources.disk.evictions == 3
    assert registry.sources.disk.bytes() <= int(one * 2.5)
    assert (await registry.get("f1")).info.kind == "lora"  # evicted names come back on use
    assert leftovers(registry.store) == []


async def test_two_servers_on_one_store_folder_share_what_either_fetched(
    s3, s3_env, bucket, lora, make_registry, tmp_path
):
    s3.put_dir(f"{bucket}/s/x", lora(40))
    s3.put_dir(f"{bucket}/s/y", lora(41))
    root = tmp_path / "shared-store"
    a = make_registry([f"s3://{bucket}/s"], root=root)
    b = make_registry([f"s3://{bucket}/s"], root=root)
    first = await a.get("x")
    second = await b.get("x")  # found in the folder another server wrote: no download
    assert second.uid == first.uid
    both = await asyncio.gather(a.get("y"), b.get("y"))  # racing fetches: one commit, both serve it
    assert both[0].uid == both[1].uid
    time.sleep(0.3)
    assert s3.object_gets(f"{bucket}/s/x/{WEIGHTS}") == 1
    assert s3.object_gets(f"{bucket}/s/y/{WEIGHTS}") <= 2
    assert leftovers(a.store) == []
