"""`https://host/path` (and `http://`): adapters as plain files behind a web server or a CDN.

A name N is `<base>/N/adapter_config.json` and `<base>/N/adapter_model.safetensors`. HEAD tells each
file's size (Content-Length) and version (ETag, else Last-Modified); each GET must come back with the
same ETag (or Last-Modified), so a file replaced during a fetch is noticed. Uses httpx.
"""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import quote

from adapterserve.server.errors import InvalidArgumentError
from adapterserve.server.store.layout import ACCEPTED_FILES
from adapterserve.server.store.sources.base import (
    RemoteAdapter,
    SourceChangedError,
    SourceUnavailableError,
    redact,
    unavailable,
)

CHUNK_BYTES = 1 << 20


def _version(headers: object) -> str:
    get = headers.get  # type: ignore[attr-defined]
    return str(get("etag") or get("last-modified") or "")


class HttpSource:
    """A web folder holding one PEFT folder per adapter name."""

    def __init__(self, uri: str, *, timeout_s: float) -> None:
        import httpx

        if "@" in uri.split("//", 1)[1].split("/", 1)[0] or "?" in uri or "#" in uri:
            raise InvalidArgumentError(
                f"adapter source {redact(uri)!r}: user info, queries and fragments are not allowed in a URL source"
            )
        self.scheme = uri.split("://", 1)[0].lower()
        self.uri = uri.rstrip("/")
        self._timeout_s = timeout_s
        self._client = httpx.Client(
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0)), follow_redirects=True
        )

    def _url(self, name: str, filename: str) -> str:
        return f"{self.uri}/{quote(name, safe='')}/{filename}"

    def stat(self, name: str) -> RemoteAdapter | None:
        import httpx

        sizes: dict[str, int | None] = {}
        etags: dict[str, str] = {}
        for filename in ACCEPTED_FILES:
            try:
                response = self._client.head(self._url(name, filename))
            except httpx.HTTPError as exc:
                raise unavailable(self.uri, f"HEAD {name}/{filename}", exc) from None
            if response.status_code in (404, 410):
                continue
            if response.status_code != 200:
                raise SourceUnavailableError(
                    f"adapter source {self.uri} is unavailable (HEAD {name}/{filename}): "
                    f"HTTP {response.status_code}"
                )
            length = response.headers.get("content-length")
            sizes[filename] = int(length) if length and length.isdigit() else None
            etags[filename] = _version(response.headers)
        if not sizes:
            return None
        tag = ",".join(etags.get(f, "") for f in ACCEPTED_FILES)
        return RemoteAdapter(name=name, source=self.uri, tag=tag, sizes=sizes, etags=etags)

    def chunks(self, remote: RemoteAdapter, filename: str) -> Iterator[bytes]:
        import httpx

        try:
            with self._client.stream("GET", self._url(remote.name, filename)) as response:
                if response.status_code in (404, 410):
                    raise SourceChangedError(
                        f"adapter {remote.name!r}: {filename} disappeared from {self.uri} during the fetch"
                    )
                if response.status_code != 200:
                    raise SourceUnavailableError(
                        f"adapter source {self.uri} is unavailable (GET {remote.name}/{filename}): "
                        f"HTTP {response.status_code}"
                    )
                expected = remote.etags.get(filename, "")
                if expected and _version(response.headers) != expected:
                    raise SourceChangedError(
                        f"adapter {remote.name!r}: {filename} changed in {self.uri} during the fetch"
                    )
                yield from response.iter_bytes(CHUNK_BYTES)
        except httpx.HTTPError as exc:
            raise unavailable(self.uri, f"GET {remote.name}/{filename}", exc) from None
