"""Adapter sources: where an adapter that is not in the store is fetched from on first use.

- base.py     the one interface (`AdapterSource`: `stat` a name, stream its `chunks`), `RemoteAdapter`,
              the errors, and `redact` (no credential ever reaches a message)
- s3.py       s3://bucket/prefix (any S3-compatible store, through obstore)
- http.py     https://host/path and http:// (httpx)
- hf.py       hf://org[@revision]: the Hugging Face Hub repository org/<name> (huggingface_hub)
- local.py    file:///dir
- fetcher.py  SourceFetcher: single flight per name, timeouts, the negative cache, streaming into the
              store's own upload session (exactly the checks an upload passes), refresh and TTL, stats
- disk.py     DiskTier: fetched adapters on disk as a cache, least recently used evicted first

`parse_source` turns a configured URI into its source.
"""

from __future__ import annotations

from adapterserve.server.errors import InvalidArgumentError
from adapterserve.server.store.sources.base import AdapterSource, redact

SCHEMES = ("s3", "hf", "https", "http", "file")


def parse_source(uri: str, *, timeout_s: float) -> AdapterSource:
    """The source of a configured URI (s3://, hf://, https://, http://, file://).
    Raises InvalidArgumentError for another scheme or a malformed URI."""
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if scheme == "s3":
        from adapterserve.server.store.sources.s3 import S3Source

        return S3Source(uri, timeout_s=timeout_s)
    if scheme == "hf":
        from adapterserve.server.store.sources.hf import HubSource

        return HubSource(uri, timeout_s=timeout_s)
    if scheme in ("https", "http"):
        from adapterserve.server.store.sources.http import HttpSource

        return HttpSource(uri, timeout_s=timeout_s)
    if scheme == "file":
        from adapterserve.server.store.sources.local import LocalSource

        return LocalSource(uri)
    raise InvalidArgumentError(
        f"adapter source {redact(uri)!r}: the scheme must be one of {', '.join(s + '://' for s in SCHEMES)}"
    )
