"""Pins: persisted across restarts, loaded into a device slot, and following a name to its new version;
a replaced or deleted version's device slot is freed."""

from __future__ import annotations

import pytest

from adapterserve.server.api.wiring import start_runtime
from adapterserve.server.settings import ServerSettings
from adapterserve.server.store.upload import UploadRequest

pytestmark = pytest.mark.timeout(180)


def _settings(tiny_model_dir, store) -> ServerSettings:
    return ServerSettings(
        base_model=str(tiny_model_dir), quantize="none", device="cpu", store=store, demo_adapters=True
    )


async def _files(directory):
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        yield name, (directory / name).read_bytes()


async def test_pins_survive_restart_and_follow_replacements(tiny_model_dir, tmp_path):
    store = tmp_path / "store"
    started = await start_runtime(_settings(tiny_model_dir, store))
    engine, catalog = started.runtime.engine, started.runtime.catalog
    try:
        v1 = await catalog.pin("demo-ia3")
        assert v1.pinned and engine.is_resident("demo-ia3", v1.version)
        assert (store / ".pins.json").is_file()
        # Replace the pinned adapter (same files, new version): the pin moves to the new version,
        # the old version's device slot is freed.
        copy = tmp_path / "ia3-copy"
        copy.mkdir()
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            (copy / name).write_bytes((store / "demo-ia3" / name).read_bytes())
        result = await catalog.upload(
            UploadRequest("demo-ia3", overwrite=True, description="v2", max_bytes=1 << 24), _files(copy)
        )
        v2 = result.record
        assert result.replaced and v2.version > v1.version and v2.pinned
        assert engine.is_resident("demo-ia3", v2.version)
        assert not engine.is_resident("demo-ia3", v1.version)
        pinned_slots = [e for e in engine.core.bank.table.entries.values() if e.pinned]
        assert [e.key for e in pinned_slots] == [("demo-ia3", v2.version)]
        # Another pin, then delete it: its device slot goes and the pin is forgotten.
        lora = await catalog.pin("demo-lora")
        await catalog.delete("demo-lora")
        assert not engine.is_resident("demo-lora", lora.version)
    finally:
        await started.stop()

    restarted = await start_runtime(_settings(tiny_model_dir, store))
    try:
        engine, catalog = restarted.runtime.engine, restarted.runtime.catalog
        record = await catalog.get("demo-ia3")
        assert record.pinned and engine.is_resident("demo-ia3", record.version)
        assert [e.key[0] for e in engine.core.bank.table.entries.values() if e.pinned] == ["demo-ia3"]
        await catalog.unpin("demo-ia3")
    finally:
        await restarted.stop()
    again = await start_runtime(_settings(tiny_model_dir, store))
    try:
        assert not (await again.runtime.catalog.get("demo-ia3")).pinned
    finally:
        await again.stop()
