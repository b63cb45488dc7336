"""A store directory shared by several servers (Ray Serve replicas): what one process writes, another
finds with `refresh(name)`, without reopening the store."""

from __future__ import annotations

import pytest

from adapterserve.server.errors import NotFoundError
from adapterserve.server.store.store import AdapterStore
from adapterserve.server.store.upload import UploadRequest
from tests.server.store.validators import make_validator


def test_refresh_adopts_what_another_process_wrote_replaced_and_deleted(tmp_path, spec, lora_dirs):
    root = tmp_path / "shared"
    writer = AdapterStore(root, make_validator(spec))
    reader = AdapterStore(root, make_validator(spec))
    writer.put_dir(lora_dirs[0], UploadRequest("late"))
    assert "late" not in reader  # opened before the write
    assert reader.refresh("late").uid == writer.manifest("late").uid
    assert reader.load("late")[0].uid == writer.manifest("late").uid

    writer.put_dir(lora_dirs[1], UploadRequest("late", overwrite=True))
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
    writer.put_dir(lora_dirs[0], UploadRequest("x"))
    (root / "x" / "adapter_model.safetensors").write_bytes(b"not the uploaded bytes")
    with pytest.raises(NotFoundError, match="failed verification"):
        reader.refresh("x")
    with pytest.raises(NotFoundError):
        reader.refresh("never-written")


def test_versions_never_repeat_across_replicas_after_a_delete_elsewhere(tmp_path, spec, lora_dirs):
    """Replica B learns of a delete by refresh; a re-upload through B, then through A, gets a version
    above every version the name ever had in either view (the engine caches by (name, version))."""
    root = tmp_path / "shared"
    a = AdapterStore(root, make_validator(spec))
    b = AdapterStore(root, make_validator(spec))
    assert a.put_dir(lora_dirs[0], UploadRequest("a")).manifest.version == 1
    assert b.refresh("a").version == 1
    a.delete("a")
    with pytest.raises(NotFoundError):
        b.refresh("a")
    via_b = b.put_dir(lora_dirs[1], UploadRequest("a")).manifest.version
    assert via_b >= 2
    via_a = a.put_dir(
        lora_dirs[2], UploadRequest("a", overwrite=True)
    ).manifest.version  # A has not refreshed
    assert via_a > via_b


def test_versions_never_repeat_after_a_delete_and_a_restart(tmp_path, spec, lora_dirs):
    """The highest version of a name is kept on disk: a delete, then a restart (or another process
    that never saw the name), then a re-upload still gets a new version."""
    root = tmp_path / "shared"
    first = AdapterStore(root, make_validator(spec))
    first.put_dir(lora_dirs[0], UploadRequest("a"))
    first.put_dir(lora_dirs[1], UploadRequest("a", overwrite=True))
    first.delete("a")
    restarted = AdapterStore(root, make_validator(spec))
    assert restarted.put_dir(lora_dirs[2], UploadRequest("a")).manifest.version == 3
