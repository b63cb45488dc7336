"""`hf://org` (or `hf://org@revision`): the Hugging Face Hub repository `org/N` for a name N.

huggingface_hub builds the URLs, the headers (token from `HF_TOKEN`, endpoint from `HF_ENDPOINT`,
both as the library reads them) and reads the Hub's file metadata. The config's HEAD pins the
repository's commit (`X-Repo-Commit`): the weights are then read at that commit, so a push during a
fetch can never mix two revisions. The revision is `main` unless the source names one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from adapterserve.server.errors import InvalidArgumentError
from adapterserve.server.store.layout import CONFIG_FILE, WEIGHTS_FILE
from adapterserve.server.store.sources.base import (
    RemoteAdapter,
    SourceChangedError,
    SourceUnavailableError,
    unavailable,
)

CHUNK_BYTES = 1 << 20


def _is_missing(exc: BaseException) -> bool:
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, EntryNotFoundError | RepositoryNotFoundError | RevisionNotFoundError):
        return True
    response = getattr(exc, "response", None)
    return isinstance(exc, HfHubHTTPError) and getattr(response, "status_code", None) == 404


def _default_endpoint() -> str:
    """HF_ENDPOINT as set now, else huggingface_hub's endpoint (the Hub, or HF_ENDPOINT at its import)."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


class HubSource:
    """Hub repositories `org/<name>`, at one revision."""

    scheme = "hf"

    def __init__(self, uri: str, *, timeout_s: float, endpoint: str | None = None) -> None:
        rest = uri[len("hf://") :].strip("/")
        org, _, revision = rest.partition("@")
        if not org or "/" in org or "?" in rest or "#" in rest:
            raise InvalidArgumentError(f"adapter source {uri!r}: use hf://org or hf://org@revision")
        self.uri = f"hf://{org}" + (f"@{revision}" if revision else "")
        self._org = org
        self._revision = revision or "main"
        self._timeout_s = timeout_s
        self._endpoint = endpoint or _default_endpoint()

    def _url(self, name: str, filename: str, revision: str) -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(f"{self._org}/{name}", filename, revision=revision, endpoint=self._endpoint)

    def _metadata(self, name: str, filename: str, revision: str):  # -> HfFileMetadata | None
        from huggingface_hub import get_hf_file_metadata

        try:
            return get_hf_file_metadata(
                self._url(name, filename, revision), timeout=self._timeout_s, endpoint=self._endpoint
            )
        except Exception as exc:  # noqa: BLE001 (httpx errors, the Hub's errors)
            if _is_missing(exc):
                return None
            raise unavailable(self.uri, f"HEAD {self._org}/{name}/{filename}", exc) from None

    def stat(self, name: str) -> RemoteAdapter | None:
        config = self._metadata(name, CONFIG_FILE, self._revision)
        if config is None:
            return None
        commit = config.commit_hash or self._revision
        sizes: dict[str, int | None] = {CONFIG_FILE: config.size}
        etags = {CONFIG_FILE: config.etag or ""}
        weights = self._metadata(name, WEIGHTS_FILE, commit)
        if weights is not None:
            sizes[WEIGHTS_FILE] = weights.size
            etags[WEIGHTS_FILE] = weights.etag or ""
        return RemoteAdapter(
            name=name, source=self.uri, tag=commit, sizes=sizes, revision=commit, etags=etags
        )

    def chunks(self, remote: RemoteAdapter, filename: str) -> Iterator[bytes]:
        from huggingface_hub.utils import build_hf_headers, get_session

        url = self._url(remote.name, filename, remote.revision or self._revision)
        headers = build_hf_headers()
        headers["Accept-Encoding"] = "identity"
        try:
            with get_session().stream(
                "GET", url, headers=headers, timeout=self._timeout_s, follow_redirects=True
            ) as response:
                if response.status_code == 404:
                    raise SourceChangedError(
                        f"adapter {remote.name!r}: {filename} disappeared from {self.uri} during the fetch"
                    )
                if response.status_code != 200:
                    raise SourceUnavailableError(
                        f"adapter source {self.uri} is unavailable (GET {self._org}/{remote.name}/{filename}): "
                        f"HTTP {response.status_code}"
                    )
                yield from response.iter_bytes(CHUNK_BYTES)
        except SourceUnavailableError:
            raise
        except Exception as exc:  # noqa: BLE001 (the session's transport errors)
            raise unavailable(self.uri, f"GET {self._org}/{remote.name}/{filename}", exc) from None
