"""`Client`: the blocking Python SDK for an adapterserve server.

    from adapterserve import Client

    with Client("127.0.0.1:50051", admin_token="s3cret") as client:
        client.upload_adapter("out/my-lora", name="my-lora")
        result = client.generate("Translate to French: hello", adapter="my-lora", max_new_tokens=32)
        print(result.text)

Every failed call raises a subclass of `adapterserve.AdapterServeError` (see errors.py); retries follow
the client's `RetryPolicy` (see retry.py for which calls are retried). What each call sends and how its
reply reads is shared with `AsyncClient` (convert.py, base.py); this module performs the calls.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import grpc

from adapterserve import convert, health, replies
from adapterserve.base import ClientBase, UploadAttempts, takes_arguments_of
from adapterserve.errors import AdapterServeError, NotFound, Unavailable, Unimplemented, from_rpc_error
from adapterserve.models import (
    AdapterInfo,
    GenerateResult,
    HealthStatus,
    RefreshResult,
    ScoreResult,
    ServerInfo,
    StreamChunk,
    UpdateResult,
    UploadResult,
)
from adapterserve.names import check_adapter_name, name_taken
from adapterserve.retry import Attempts, call_with_retry
from adapterserve.updates import encode_tensors, update_messages, update_result_from_proto
from adapterserve.upload import ProgressCallback, choose_chunk_bytes, collect_adapter_files

T = TypeVar("T")


def _rpc(fn: Callable[[], T]) -> T:
    """Run one gRPC call, turning grpc.RpcError into the matching AdapterServeError."""
    try:
        return fn()
    except grpc.RpcError as err:
        raise from_rpc_error(err) from None


class Client(ClientBase):
    """A blocking client. Thread-safe: one client (one channel) may serve many threads.

    Args:
        target: "host:port"; default $ADAPTERSERVE_TARGET or 127.0.0.1:50051.
        admin_token: sent with admin calls (upload, delete, list, get, pin, unpin).
        token: sent with generation calls, for servers started with a generation token.
        timeout: seconds per call (each attempt of a retried call); None = no deadline.
        tls: None/False for plaintext, True for TLS with the system roots, or grpc.ChannelCredentials.
        retry: the retry policy; `RetryPolicy(max_attempts=1)` turns retries off.
        options: extra gRPC channel options, e.g. [("grpc.max_receive_message_length", 1 << 26)].
    """

    _grpc = grpc

    # -- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the channel; calls still running are cancelled."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _unary(self, call: convert.Call[T]) -> T:
        """Make `call`, retried on its codes under the client's policy; its converted reply."""
        method, meta, deadline = self._route(call)
        reply = call_with_retry(
            lambda: _rpc(lambda: method(call.request, timeout=deadline, metadata=meta)),
            self.connection.retry,
            call.retry_codes,
        )
        return call.reply(reply)

    # -- generation ------------------------------------------------------------------------------

    @takes_arguments_of(convert.generate_call)
    def generate(self, *args: Any, **kwargs: Any) -> GenerateResult:
        """Generate a completion of `prompt` (plain text) or `messages` (a chat, rendered by the server).

        A list passed as `prompt` is taken as chat messages ({"role": ..., "content": ...} dicts or
        ChatMessage). `adapter=None` uses the base model. Retried on UNAVAILABLE and RESOURCE_EXHAUSTED.
        """
        return self._unary(convert.generate_call(*args, **kwargs))

    @takes_arguments_of(convert.generate_batch_call)
    def generate_batch(self, *args: Any, **kwargs: Any) -> list[GenerateResult]:
        """Generate for every prompt of `prompts` (texts, token-id lists or chats) in one call: one
        result per prompt, in order, each what `generate` gives for that prompt alone (with its n
        choices). The server checks every prompt before queueing any (one bad prompt: InvalidArgument
        naming `requests[i]`) and runs them side by side in its batch. Retried on UNAVAILABLE and
        RESOURCE_EXHAUSTED."""
        return self._unary(convert.generate_batch_call(*args, **kwargs))

    @takes_arguments_of(convert.score_call)
    def score(self, *args: Any, **kwargs: Any) -> ScoreResult:
        """Log-likelihood of `continuation` right after `prompt` (text) or `messages` (a chat, rendered
        with the generation prompt), with `adapter` (None = the base model). Nothing is generated.

        The continuation is tokenized on its own and appended to the prompt's tokens. Use it for
        evaluation: perplexity (`result.perplexity`), preference margins, multiple choice. Retried on
        UNAVAILABLE and RESOURCE_EXHAUSTED.
        """
        return self._unary(convert.score_call(*args, **kwargs))

    @takes_arguments_of(convert.generate_call)
    def stream(self, *args: Any, **kwargs: Any) -> Iterator[StreamChunk]:
        """Like `generate`, yielding chunks as they are produced; the last one has `finish_reason` set.

        The call is retried (UNAVAILABLE, RESOURCE_EXHAUSTED) only until its first chunk arrived.
        Closing the iterator early (`break`, `.close()`) cancels the call, which frees the server's work.
        The request is checked when this is called; the call starts on the first `next()`.
        """
        return self._stream(replace(convert.generate_call(*args, **kwargs), method="GenerateStream"))

    @takes_arguments_of(convert.generate_batch_call)
    def stream_batch(self, *args: Any, **kwargs: Any) -> Iterator[replies.BatchChunk]:
        """Like `generate_batch`, yielding `(position, chunk)` pairs as they are produced: `position` is
        the prompt's in `prompts`, and each prompt's chunks are what `stream` yields for it alone (the
        prompts' chunks interleave; each choice of each prompt has its own last chunk). Retried and
        cancelled as `stream`."""
        call = replace(convert.generate_batch_call(*args, **kwargs), method="GenerateBatchStream")
        return self._stream(call, replies.batch_chunk_from_proto)

    def _stream(
        self, call: convert.Call[Any], chunk: Callable[[Any, int], T] = replies.chunk_from_proto
    ) -> Iterator[T]:
        method, meta, deadline = self._route(call)
        attempts = Attempts(self.connection.retry)
        index = 0
        while True:
            rpc = method(call.request, timeout=deadline, metadata=meta)
            try:
                for message in rpc:
                    yield chunk(message, index)
                    index += 1
                return
            except grpc.RpcError as rpc_err:
                wait = self._stream_retry_wait(attempts, rpc_err, index)
            finally:
                rpc.cancel()  # no-op once finished; frees the server's work on early close
            time.sleep(wait)

    def server_info(self, *, timeout: float | None = None) -> ServerInfo:
        """The served base model and the server's limits (a generation call: uses `token`)."""
        return self._unary(convert.server_info_call(timeout))

    # -- admin -----------------------------------------------------------------------------------

    def _server_chunk_limit(self) -> int | None:
        """The server's upload chunk limit, asked once; None when it cannot be asked."""
        if self._chunk_limit is None:
            try:  # one attempt, no retries: the upload's own retry policy covers an unreachable server
                info = self._unary(replace(convert.server_info_call(None), retry_codes=frozenset()))
            except AdapterServeError:
                return None
            self._chunk_limit = info.limits.upload_chunk_bytes
        return self._chunk_limit

    def _check_upload_target(self, name: str, overwrite: bool, timeout: float | None) -> None:
        """Refuse an invalid name, a taken name (without `overwrite`) or a wrong admin token before
        the first byte of the adapter is sent. The server checks again (a name may be taken meanwhile)."""
        check_adapter_name(name)
        if overwrite:
            return
        try:
            self.get_adapter(name, timeout=timeout)
        except (NotFound, Unimplemented):  # free, or a server without GetAdapter
            return
        raise name_taken(name)

    def upload_adapter(
        self,
        path: str | Path,
        name: str,
        *,
        overwrite: bool = False,
        description: str | None = None,
        progress: ProgressCallback | None = None,
        chunk_bytes: int | None = None,
        timeout: float | None = None,
    ) -> UploadResult:
        """Upload the PEFT adapter directory at `path` as `name`.

        Sends adapter_config.json and the *.safetensors files in chunks of `chunk_bytes` (default: 256 KiB,
        or the server's chunk limit if smaller, asked once), calling
        `progress(UploadProgress)` after each chunk. Raises AdapterRefused before sending anything if the
        directory holds pickle files or lacks the config or weights, InvalidArgument for an invalid
        name and AlreadyExists for a taken one (without `overwrite`), also before the first byte. Retried on UNAVAILABLE only while
        no file byte has left the client.
        """
        files = collect_adapter_files(path)
        self._check_upload_target(name, overwrite, timeout)
        if chunk_bytes is None:  # the default, capped by the server's own chunk limit
            chunk_bytes = choose_chunk_bytes(None, self._server_chunk_limit())
        upload = UploadAttempts(
            files, name, overwrite, description, chunk_bytes, progress, self.connection.retry
        )
        meta = self.connection.admin_metadata()
        deadline = self._timeout(timeout)
        while True:
            messages = upload.messages()
            try:
                reply = _rpc(lambda m=messages: self._admin.UploadAdapter(m, timeout=deadline, metadata=meta))
                return replies.upload_result_from_proto(reply)
            except AdapterServeError as err:
                wait = upload.retry_wait(err)
                if wait is None:
                    raise
            time.sleep(wait)

    def update_adapter(
        self,
        name: str,
        tensors: Mapping[str, Any],
        *,
        persist: bool = False,
        chunk_bytes: int | None = None,
        timeout: float | None = None,
    ) -> UpdateResult:
        """Replace the weights of stored adapter `name` in place with `tensors` (its state dict as PEFT
        saves it: every tensor, same names and shapes; torch tensors or numpy arrays of a float dtype).

        The reply's `version` is what requests get from now on (their results carry `adapter_version`);
        requests already running finish on their version. `persist` writes it to the server's store now.
        Never retried (each update is a new version)."""
        check_adapter_name(name)
        encoded = encode_tensors(tensors)
        if chunk_bytes is None:
            chunk_bytes = choose_chunk_bytes(None, self._server_chunk_limit())
        messages = update_messages(name, encoded, persist=persist, chunk_bytes=chunk_bytes)
        meta = self.connection.admin_metadata()
        deadline = self._timeout(timeout)
        reply = _rpc(lambda: self._admin.UpdateAdapter(messages, timeout=deadline, metadata=meta))
        return update_result_from_proto(reply)

    def list_adapters(
        self, *, name_prefix: str = "", page_size: int = 0, timeout: float | None = None
    ) -> list[AdapterInfo]:
        """All adapters (optionally only those whose name starts with `name_prefix`), in name order.

        Follows the server's paging until the last page.
        """
        out: list[AdapterInfo] = []
        token = ""
        while True:
            page, token = self._unary(convert.list_page_call(name_prefix, page_size, token, timeout))
            out.extend(page)
            if not token:
                return out

    def get_adapter(self, name: str, *, timeout: float | None = None) -> AdapterInfo:
        """Describe one adapter; NotFound if there is none of that name."""
        return self._unary(convert.adapter_call("GetAdapter", name, timeout))

    def delete_adapter(self, name: str, *, timeout: float | None = None) -> AdapterInfo:
        """Delete an adapter; returns it as it was. Never retried."""
        return self._unary(convert.adapter_call("DeleteAdapter", name, timeout))

    def pin(self, name: str, *, timeout: float | None = None) -> AdapterInfo:
        """Pin an adapter (loaded now, never evicted). Idempotent."""
        return self._unary(convert.adapter_call("PinAdapter", name, timeout))

    def unpin(self, name: str, *, timeout: float | None = None) -> AdapterInfo:
        """Unpin an adapter (evictable again). Idempotent."""
        return self._unary(convert.adapter_call("UnpinAdapter", name, timeout))

    def refresh_adapter(self, name: str, *, timeout: float | None = None) -> RefreshResult:
        """Ask a fetched adapter's source again (servers with --adapter-source): a new ETag or revision
        replaces the stored version atomically. FailedPrecondition for an uploaded adapter."""
        return self._unary(convert.refresh_call(name, timeout))

    # -- health ----------------------------------------------------------------------------------

    def health(self, service: str = "", *, timeout: float | None = None) -> HealthStatus:
        """The grpc.health.v1 status ("SERVING" once the model is loaded and warmed). Not retried:
        an unreachable server raises Unavailable."""
        data = _rpc(lambda: self._health(health.encode_request(service), timeout=self._timeout(timeout)))
        return HealthStatus(service=service, status=health.decode_status(data))

    def wait_until_serving(self, timeout: float = 60.0, interval: float = 0.2) -> HealthStatus:
        """Poll `health()` until the server is SERVING; raises Unavailable after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        last: str = "unreachable"
        while True:
            try:
                status = self.health(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
                if status.serving:
                    return status
                last = status.status
            except AdapterServeError as err:
                last = str(err)
            if time.monotonic() >= deadline:
                raise Unavailable(f"{self.target} not serving after {timeout:.0f} s (last: {last})")
            time.sleep(interval)
