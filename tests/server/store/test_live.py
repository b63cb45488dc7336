"""In-place updates in the store tiers (live.py): versions, persistence every k, restart, supersession."""

from __future__ import annotations

import functools

import pytest
import torch
from safetensors.torch import load_file

from adapterserve.server.adapters.loader import build_adapter, load_adapter_dir
from adapterserve.server.errors import AdapterValidationError, NotFoundError
from adapterserve.server.settings import EngineSettings
from adapterserve.server.store.live import LiveAdapters, tensor_from_bytes
from adapterserve.server.store.registry import AdapterRegistry
from adapterserve.server.store.upload import UploadRequest


def _tensors(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.fixture
def make_store(make_store, spec):
    """Stores validated by the real loader (the served form, as in the server)."""
    validate = functools.partial(load_adapter_dir, spec=spec, settings=EngineSettings())
    return functools.partial(make_store, validate=validate)


@pytest.fixture
def live_of(spec):
    def make(store, every: int) -> LiveAdapters:
        build = functools.partial(build_adapter, spec=spec, settings=EngineSettings())
        return LiveAdapters(AdapterRegistry(store), build, persist_every=every)

    return make


async def test_updates_persist_every_k_and_a_restart_loses_at_most_k(make_store, live_of, lora_dirs):
    store = make_store()
    store.put_dir(lora_dirs[0], UploadRequest("a", description="kept"))
    stored = store.manifest("a").version
    live = live_of(store, every=2)

    first = await live.update("a", _tensors(lora_dirs[1]))
    assert first.previous_version == stored and first.resolved.version > stored and not first.persisted
    assert (await live.get("a")).version == first.resolved.version
    assert store.manifest("a").version == stored  # not on disk yet

    second = await live.update("a", _tensors(lora_dirs[2]))
    assert second.persisted and second.persisted_version == second.resolved.version
    assert second.resolved.version == first.resolved.version + 1
    manifest = store.manifest("a")
    assert manifest.version == second.resolved.version and manifest.description == "kept"
    with store.reading("a") as (path, _):
        on_disk = _tensors(path)
    for name, value in _tensors(lora_dirs[2]).items():
        assert torch.equal(on_disk[name], value)
    assert (await live.get("a")).version == second.resolved.version  # still the live entry, new uid

    third = await live.update("a", _tensors(lora_dirs[3]))
    assert not third.persisted and third.persisted_version == second.resolved.version

    reopened = make_store()  # a restart: the newest written version is served, the third is lost
    assert reopened.manifest("a").version == second.resolved.version
    # versions never repeat: the next upload is numbered above every version an update issued
    assert reopened.next_version("a") > third.resolved.version
    again = live_of(reopened, every=2)
    fourth = await again.update("a", _tensors(lora_dirs[0]))
    assert fourth.resolved.version > third.resolved.version


async def test_persist_on_request_and_an_upload_supersedes_the_live_version(make_store, live_of, lora_dirs):
    store = make_store()
    store.put_dir(lora_dirs[0], UploadRequest("a"))
    live = live_of(store, every=0)
    for _ in range(3):
        result = await live.update("a", _tensors(lora_dirs[1]))
    assert not result.persisted and store.manifest("a").version < result.resolved.version
    assert await live.persist("a") == result.resolved.version
    assert store.manifest("a").version == result.resolved.version

    later = await live.update("a", _tensors(lora_dirs[2]))
    store.put_dir(lora_dirs[3], UploadRequest("a", overwrite=True))  # an upload replaces the name
    uploaded = store.manifest("a").version
    assert uploaded > later.resolved.version
    got = await live.get("a")
    assert got.version == uploaded and live.live_version("a") is None
    store.delete("a")
    with pytest.raises(NotFoundError):
        await live.get("a")
    with pytest.raises(NotFoundError):
        await live.update("a", _tensors(lora_dirs[1]))


async def test_an_update_must_fit_the_stored_layout(make_store, live_of, lora_dirs):
    store = make_store()
    store.put_dir(lora_dirs[0], UploadRequest("a"))
    live = live_of(store, every=1)
    good = _tensors(lora_dirs[1])
    name = sorted(good)[0]
    bad_shapes = dict(good, **{name: good[name][:1]})
    with pytest.raises(AdapterValidationError, match="shape"):
        await live.update("a", bad_shapes)
    with pytest.raises(AdapterValidationError, match="infinite"):
        await live.update("a", dict(good, **{name: torch.full_like(good[name], float("inf"))}))
    assert live.live_version("a") is None and store.manifest("a").version == 1


def test_tensor_bytes_are_checked_against_dtype_and_shape():
    t = tensor_from_bytes("x", "F32", (2, 3), torch.arange(6, dtype=torch.float32).numpy().tobytes())
    assert t.shape == (2, 3) and t[1, 2] == 5
    with pytest.raises(AdapterValidationError, match="bytes"):
        tensor_from_bytes("x", "F32", (2, 3), b"\0" * 20)
    with pytest.raises(AdapterValidationError, match="dtype"):
        tensor_from_bytes("x", "I64", (1,), b"\0" * 8)
