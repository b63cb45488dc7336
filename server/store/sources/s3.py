"""`s3://bucket/prefix`: any S3-compatible object store, through obstore (the Rust object_store crate).

Credentials, region and endpoint come from the standard AWS environment, as every AWS tool reads them:
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION` / `AWS_DEFAULT_REGION`,
and `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL` for a store other than AWS (MinIO, Ceph, R2, rclone...);
an `http://` endpoint is allowed as such. Requests are signed by the client library, never here.

A name N is the two objects `prefix/N/adapter_config.json` and `prefix/N/adapter_model.safetensors`;
their ETags (from HEAD) are the version, and each GET checks it got the same ETag back.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from adapterserve.server.errors import InvalidArgumentError
from adapterserve.server.store.layout import ACCEPTED_FILES
from adapterserve.server.store.sources.base import (
    RemoteAdapter,
    SourceChangedError,
    unavailable,
)

CHUNK_BYTES = 1 << 20


def _missing(exc: BaseException) -> bool:
    from obstore.exceptions import NotFoundError

    return isinstance(exc, FileNotFoundError | NotFoundError)


class S3Source:
    """An S3 bucket (and prefix) holding one PEFT folder per adapter name."""

    scheme = "s3"

    def __init__(self, uri: str, *, timeout_s: float, environ: dict[str, str] | None = None) -> None:
        from obstore.store import S3Store

        rest = uri[len("s3://") :]
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise InvalidArgumentError(f"adapter source {uri!r}: s3:// needs a bucket (s3://bucket/prefix)")
        self.uri = f"s3://{bucket}/{prefix.strip('/')}".rstrip("/")
        self._prefix = prefix.strip("/")
        env = os.environ if environ is None else environ
        endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        config: dict[str, Any] = {}
        if endpoint:
            config["endpoint"] = endpoint
        if not (env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")):
            config["region"] = "us-east-1"  # the SDKs' default; a custom endpoint usually ignores it
        timeout = timedelta(seconds=timeout_s)
        self._store = S3Store(
            bucket,
            config=config,  # type: ignore[arg-type]
            client_options={
                "allow_http": bool(endpoint and endpoint.startswith("http://")),
                "timeout": timeout,
                "connect_timeout": timedelta(seconds=min(timeout_s, 5.0)),
            },
            retry_config={
                "max_retries": 2,
                "retry_timeout": timeout,
                "backoff": {
                    "init_backoff": timedelta(milliseconds=50),
                    "max_backoff": timedelta(seconds=1),
                    "base": 2,
                },
            },
        )

    def _key(self, name: str, filename: str) -> str:
        return f"{self._prefix}/{name}/{filename}" if self._prefix else f"{name}/{filename}"

    def stat(self, name: str) -> RemoteAdapter | None:
        import obstore

        sizes: dict[str, int | None] = {}
        etags: dict[str, str] = {}
        for filename in ACCEPTED_FILES:
            try:
                meta = obstore.head(self._store, self._key(name, filename))
            except Exception as exc:  # noqa: BLE001 (the client's errors have no common base besides these)
                if _missing(exc):
                    continue
                raise unavailable(self.uri, f"HEAD {name}/{filename}", exc) from None
            sizes[filename] = int(meta["size"])
            etags[filename] = str(meta.get("e_tag") or "")
        if not sizes:
            return None
        tag = ",".join(etags.get(f, "") for f in ACCEPTED_FILES)
        return RemoteAdapter(name=name, source=self.uri, tag=tag, sizes=sizes, etags=etags)

    def chunks(self, remote: RemoteAdapter, filename: str) -> Iterator[bytes]:
        import obstore

        key = self._key(remote.name, filename)
        try:
            result = obstore.get(self._store, key)
        except Exception as exc:  # noqa: BLE001
            if _missing(exc):
                raise SourceChangedError(
                    f"adapter {remote.name!r}: {filename} disappeared from {self.uri} during the fetch"
                ) from None
            raise unavailable(self.uri, f"GET {remote.name}/{filename}", exc) from None
        etag = str(result.meta.get("e_tag") or "")
        expected = remote.etags.get(filename, "")
        if expected and etag and etag != expected:
            raise SourceChangedError(
                f"adapter {remote.name!r}: {filename} changed in {self.uri} during the fetch"
            )
        try:
            for chunk in result.stream(min_chunk_size=CHUNK_BYTES):
                yield bytes(chunk)
        except Exception as exc:  # noqa: BLE001
            raise unavailable(self.uri, f"reading {remote.name}/{filename}", exc) from None
