"""Fixtures for the adapter-source tests: a real S3-compatible server (rclone serve s3) on 127.0.0.1,
PEFT adapters of the tiny base, and a store + registry wired to sources with the server's own loader."""

from __future__ import annotations

import functools
import uuid
from pathlib import Path

import pytest

from adapterserve.server.adapters.loader import load_adapter_dir
from adapterserve.server.settings import CacheSettings, EngineSettings, SourceSettings
from adapterserve.server.store.registry import AdapterRegistry
from adapterserve.server.store.sources import parse_source
from adapterserve.server.store.sources.fetcher import SourceFetcher
from adapterserve.server.store.store import AdapterStore
from tests.helpers.object_store import S3Server


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with S3Server(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture
def s3_env(s3, monkeypatch):
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    return s3.env()


@pytest.fixture
def bucket(s3) -> str:
    """A fresh bucket (a folder of the server's data directory) for one test."""
    name = f"b{uuid.uuid4().hex[:12]}"
    (s3.data / name).mkdir()
    return name


@pytest.fixture
def make_registry(tiny_base, tmp_path):
    """make_registry(uris, **source_settings) -> AdapterRegistry over a fresh store with those sources."""
    validate = functools.partial(
        load_adapter_dir, spec=tiny_base.spec, settings=EngineSettings(), max_bytes=1 << 20
    )

    def make(uris: list[str], *, root: Path | None = None, sources=None, **fields) -> AdapterRegistry:
        """`sources`: source objects to use instead of parsing `uris` (e.g. a Hub source on a test endpoint)."""
        fields.setdefault("fetch_timeout_s", 5.0)
        settings = SourceSettings(uris=tuple(uris), **fields)
        store = AdapterStore(
            root or tmp_path / "store",
            validate,
            base_fingerprint=tiny_base.fingerprint,
            max_adapter_bytes=1 << 20,
        )
        if sources is None:
            sources = [parse_source(u, timeout_s=settings.fetch_timeout_s) for u in uris]
        return AdapterRegistry(store, CacheSettings(), sources=SourceFetcher(store, sources, settings))

    return make


def leftovers(store: AdapterStore) -> list[str]:
    """Temporary folders left in the store (there must be none after any fetch)."""
    return sorted(
        p.name for p in store.root.iterdir() if p.name.startswith((".upload-", ".replaced-", ".deleted-"))
    )
