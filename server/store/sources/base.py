"""The one interface every adapter source implements, the object it describes, and its errors.

A source maps a valid adapter name N to a PEFT folder `<source>/N/` holding `adapter_config.json` and
`adapter_model.safetensors`. It answers two questions, both blocking (the fetcher runs them in a worker
thread) and both bounded by the client's own timeouts:

- `stat(name)`: is N there, at which version (ETag or revision), how large is each file? `None` when the
  source does not hold N; `SourceUnavailableError` when the source cannot be asked;
- `chunks(remote, file)`: the bytes of one file of that version, streamed. A file that changed since
  `stat` raises `SourceChangedError`, so a fetch never commits half of one version and half of another.

Names reach a source only after `validate_name` (one relative path component, no '..', no '/', no '%',
no '?', no '#', no scheme), so a source never reads outside its prefix. Messages never carry
credentials: `redact` removes secrets known to the process and the user part and query of any URL.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from adapterserve.server.errors import NotFoundError, UnavailableError

# Environment variables whose values must never appear in a message.
SECRET_ENV = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "ADAPTERSERVE_ADMIN_TOKEN",
)
_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]*@")
_URL_QUERY = re.compile(r"(?P<url>[a-zA-Z][a-zA-Z0-9+.-]*://[^\s?#\"']*)[?#][^\s\"']*")
MAX_MESSAGE_CHARS = 300


class SourceUnavailableError(UnavailableError):
    """A source could not be asked or read (network, timeout, server error): try again later."""


class SourceNotFoundError(NotFoundError):
    """A name in none of the sources (the message names the sources tried)."""


class SourceChangedError(SourceUnavailableError):
    """A file changed in the source while the adapter was fetched: the fetch is dropped, retried later."""


@dataclass(frozen=True)
class RemoteAdapter:
    """One version of an adapter in one source, as `stat` found it."""

    name: str
    source: str  # the source's display URI (no credentials)
    tag: str  # what identifies this version: the files' ETags, or the Hub revision's commit
    sizes: dict[str, int | None] = field(default_factory=dict)  # file -> bytes (None: not told)
    revision: str | None = None  # the Hub's commit sha, for hf://
    etags: dict[str, str] = field(default_factory=dict)  # file -> ETag, where the source has them

    @property
    def known_bytes(self) -> int:
        """The sum of the sizes the source told (0 for those it did not)."""
        return sum(s for s in self.sizes.values() if s is not None)


class AdapterSource(Protocol):
    """Where adapters are fetched from. Implementations: s3.py, http.py, hf.py, local.py."""

    @property
    def uri(self) -> str:
        """The source as configured, without credentials: what errors, listings and metrics show."""
        ...

    @property
    def scheme(self) -> str:
        """The metrics label: "s3", "hf", "https" or "file"."""
        ...

    def stat(self, name: str) -> RemoteAdapter | None:
        """The adapter's version and file sizes; None when the source does not hold `name`.
        Raises SourceUnavailableError."""
        ...

    def chunks(self, remote: RemoteAdapter, filename: str) -> Iterator[bytes]:
        """The bytes of `filename` (one of ACCEPTED_FILES) of exactly that version, in chunks.
        Raises SourceUnavailableError, SourceChangedError."""
        ...


def redact(message: str, extra_secrets: tuple[str, ...] = ()) -> str:
    """`message` without credentials: known secret values, URL user info and URL queries (presigned
    URLs carry signatures there) are replaced; the first line only, at most MAX_MESSAGE_CHARS."""
    text = (message or "").strip().splitlines()[0] if (message or "").strip() else ""
    for secret in (*extra_secrets, *(os.environ.get(k, "") for k in SECRET_ENV)):
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    text = _URL_USERINFO.sub(r"\g<scheme>***@", text)
    text = _URL_QUERY.sub(r"\g<url>?***", text)
    if len(text) > MAX_MESSAGE_CHARS:
        text = text[: MAX_MESSAGE_CHARS - 3] + "..."
    return text


def unavailable(uri: str, what: str, exc: BaseException) -> SourceUnavailableError:
    """The error for a source that could not be asked: the source, what was tried, the cause (redacted)."""
    cause = redact(str(exc)) or type(exc).__name__
    return SourceUnavailableError(f"adapter source {uri} is unavailable ({what}): {cause}")
