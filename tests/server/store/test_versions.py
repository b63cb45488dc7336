"""Versions never repeat: the on-disk record (.versions/<name>) outlives deletes and restarts, stores
written before it existed are covered by their manifests, and a broken record is survived."""

from __future__ import annotations

import logging
import shutil

import pytest

from adapterserve.server.errors import FailedPreconditionError
from adapterserve.server.store.layout import VERSIONS_DIR
from adapterserve.server.store.store import AdapterStore
from adapterserve.server.store.upload import UploadRequest
from tests.server.store.disk import entries, records
from tests.server.store.validators import make_validator


def test_a_store_without_records_numbers_above_its_manifests(make_store, lora_dirs):
    """A store written before records existed: the versions in its manifests are the floor."""
    store = make_store()
    store.put_dir(lora_dirs[0], UploadRequest("a"))
    store.put_dir(lora_dirs[1], UploadRequest("a", overwrite=True))
    store.put_dir(lora_dirs[0], UploadRequest("b"))
    shutil.rmtree(store.root / VERSIONS_DIR)

    reopened = make_store()
    assert reopened.put_dir(lora_dirs[2], UploadRequest("b", overwrite=True)).manifest.version == 2
    reopened.delete("a")  # records v2 before the folder goes
    assert records(reopened.root) == {"a": 2, "b": 2}
    assert make_store().put_dir(lora_dirs[0], UploadRequest("a")).manifest.version == 3


def test_deleting_an_unserved_entry_records_its_manifest_version(make_store, lora_dirs):
    store = make_store()
    store.put_dir(lora_dirs[0], UploadRequest("a"))
    store.put_dir(lora_dirs[1], UploadRequest("a", overwrite=True))
    shutil.rmtree(store.root / VERSIONS_DIR)
    other = make_store(base_fingerprint="0" * 64)
    assert "a" in other.failed  # made for another base: not served, its version never read in
    other.delete("a")
    assert records(other.root) == {"a": 2}
    assert make_store().put_dir(lora_dirs[0], UploadRequest("a")).manifest.version == 3


def test_an_unwritten_folder_of_another_process_is_numbered_above(tmp_path, spec, lora_dirs):
    """Another process replaced the adapter and its record is gone: this one, not refreshed, still
    numbers above the manifest on disk."""
    root = tmp_path / "shared"
    here, there = AdapterStore(root, make_validator(spec)), AdapterStore(root, make_validator(spec))
    here.put_dir(lora_dirs[0], UploadRequest("a"))
    there.refresh("a")
    there.put_dir(lora_dirs[1], UploadRequest("a", overwrite=True))
    there.put_dir(lora_dirs[2], UploadRequest("a", overwrite=True))
    shutil.rmtree(root / VERSIONS_DIR)
    assert here.manifest("a").version == 1  # stale view
    assert here.put_dir(lora_dirs[3], UploadRequest("a", overwrite=True)).manifest.version == 4


def test_an_unreadable_record_is_ignored_with_a_warning_and_rewritten(make_store, lora_dirs, caplog):
    store = make_store()
    store.put_dir(lora_dirs[0], UploadRequest("a"))
    (store.root / VERSIONS_DIR / "a").write_bytes(b"not a number")
    with caplog.at_level(logging.WARNING):
        assert (
            store.put_dir(lora_dirs[1], UploadRequest("a", overwrite=True)).manifest.version == 2
        )  # the served v1
    assert "unreadable version record" in caplog.text
    assert records(store.root) == {"a": 2}


def test_a_versions_entry_that_is_not_a_folder_refuses_writes_and_changes_nothing(
    make_store, lora_dirs, tmp_path
):
    store = make_store()
    store.put_dir(lora_dirs[0], UploadRequest("a"))
    shutil.rmtree(store.root / VERSIONS_DIR)
    (tmp_path / "elsewhere").mkdir()
    (store.root / VERSIONS_DIR).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FailedPreconditionError, match="not a folder"):
        store.put_dir(lora_dirs[1], UploadRequest("b"))
    with pytest.raises(FailedPreconditionError, match="not a folder"):
        store.delete("a")
    assert store.names() == ["a"] and entries(store.root) == ["a"]
    assert list((tmp_path / "elsewhere").iterdir()) == []  # never written through the link
