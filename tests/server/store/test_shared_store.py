"""A store directory shared by several servers (Ray Serve replicas): what one process writes, another
finds with `refresh(name)`, without reopening the store."""

from __future__ import annotations

import pytest

from adapterserve.server.errors import NotFoundError
from adapterserve.server.store.store import AdapterStore
from tests.server.store.validators import make_validator


def test_refresh_adopts_what_another_process_wrote_replaced_and_deleted(tmp_path, spec, lora_dirs):
    root = tmp_path / "shared"
    writer = AdapterStore(root, make_validator(spec))
    reader = AdapterStore(root, make_validator(spec))
    writer.put_dir(lora_dirs[0], "late")
    assert "late" not in reader  # opened before the write
    assert reader.refresh("late").uid == writer.manifest("late").uid
    assert reader.load("late")[0].uid == writer.manifest("late").uid

    writer.put_dir(lora_dirs[1], "late", overwrite=True)
    assert reader.manifest("late").uid != writer.manifest("late").uid  # stale until refreshed
    assert reader.refresh("late").uid == writer.manifest("late").uid

    writer.delete("late")
    with pytest.raises(NotFoundError):
        reader.refresh("late")
    assert "late" not in reader


def test_refresh_of_a_tampered_entry_is_not_found_with_the_reason(tmp_path, spec, lora_dirs):
    root = tmp_path / "shared"
    writer = AdapterStore(root, make_validator(spec))
    reader = AdapterStore(root, make_validator(spec))
    writer.put_dir(lora_dirs[0], "x")
    (root / "x" / "adapter_model.safetensors").write_bytes(b"not the uploaded bytes")
    with pytest.raises(NotFoundError, match="failed verification"):
        reader.refresh("x")
    with pytest.raises(NotFoundError):
        reader.refresh("never-written")
