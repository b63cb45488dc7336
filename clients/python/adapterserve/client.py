"""`Client`: the blocking Python SDK for an adapterserve server.

    from adapterserve import Client

    with Client("127.0.0.1:50051", admin_token="s3cret") as client:
        client.upload_adapter("out/my-lora", name="my-lora")
        result = client.generate("Translate to French: hello", adapter="my-lora", max_new_tokens=32)
        print(result.text)

Every failed call raises a subclass of `adapterserve.AdapterServeError` (see errors.py); retries follow
the client's `RetryPolicy` (see retry.py for which calls are retried).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc

from adapterserve import convert, health
from adapterserve.connection import DEFAULT_TIMEOUT_S, Connection, Tls, resolve_target
from adapterserve.errors import (
    AdapterServeError,
    NotFound,
    Unavailable,
    Unimplemented,
    from_rpc_error,
)
from adapterserve.models import (
    AdapterInfo,
    GenerateResult,
    HealthStatus,
    ScoreResult,
    ServerInfo,
    StreamChunk,
    UploadResult,
)
from adapterserve.names import check_adapter_name, name_taken
from adapterserve.retry import GENERATION_CODES, READ_CODES, Attempts, RetryPolicy, call_with_retry
from adapterserve.upload import ProgressCallback, ProgressTracker, choose_chunk_bytes, collect_adapter_files
from adapterserve.v1 import admin_pb2, admin_pb2_grpc, generation_pb2, generation_pb2_grpc

T = TypeVar("T")
_NO_CODES: frozenset[str] = frozenset()


def _rpc(fn: Callable[[], T]) -> T:
    """Run one gRPC call, turning grpc.RpcError into the matching AdapterServeError."""
    try:
        return fn()
    except grpc.RpcError as err:
        raise from_rpc_error(err) from None


class Client:
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

    def __init__(
        self,
        target: str | None = None,
        *,
        admin_token: str | None = None,
        token: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        tls: Tls = None,
        retry: RetryPolicy | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.connection = Connection(
            target=resolve_target(target),
            admin_token=admin_token,
            token=token,
            timeout=timeout,
            tls=tls,
            retry=retry or RetryPolicy(),
            options=tuple(options),
        )
        creds = self.connection.credentials()
        opts = self.connection.channel_options()
        self._channel = (
            grpc.secure_channel(self.connection.target, creds, options=opts)
            if creds is not None
            else grpc.insecure_channel(self.connection.target, options=opts)
        )
        self._generation = generation_pb2_grpc.GenerationStub(self._channel)
        self._admin = admin_pb2_grpc.AdminStub(self._channel)
        self._chunk_limit: int | None = None  # the server's upload_chunk_bytes, asked on first upload
        self._health = self._channel.unary_unary(
            health.CHECK_METHOD,
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )

    @property
    def target(self) -> str:
        return self.connection.target

    # -- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the channel; calls still running are cancelled."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _timeout(self, timeout: float | None) -> float | None:
        return self.connection.timeout if timeout is None else timeout

    # -- generation ------------------------------------------------------------------------------

    def generate(
        self,
        prompt: str | Sequence[convert.MessageLike] | None = None,
        *,
        messages: Sequence[convert.MessageLike] | None = None,
        adapter: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float | None = None,
        top_k: int = 0,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
        ignore_eos: bool = False,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        logit_bias: Mapping[int, float] | None = None,
        min_tokens: int = 0,
        logprobs: int | None = None,
        n: int = 1,
        prompt_logprobs: int | None = None,
        request_id: str | None = None,
        response_format: str | Mapping[str, Any] | None = None,
        json_schema: Mapping[str, Any] | str | None = None,
        timeout: float | None = None,
    ) -> GenerateResult:
        """Generate a completion of `prompt` (plain text) or `messages` (a chat, rendered by the server).

        A list passed as `prompt` is taken as chat messages ({"role": ..., "content": ...} dicts or
        ChatMessage). `adapter=None` uses the base model. Retried on UNAVAILABLE and RESOURCE_EXHAUSTED.
        """
        request = convert.build_generate_request(
            prompt,
            messages,
            adapter,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=repetition_penalty,
            seed=seed,
            stop=stop,
            ignore_eos=ignore_eos,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
            logit_bias=logit_bias,
            min_tokens=min_tokens,
            logprobs=logprobs,
            n=n,
            prompt_logprobs=prompt_logprobs,
            request_id=request_id,
            response_format=response_format,
            json_schema=json_schema,
        )
        meta = self.connection.generation_metadata()
        deadline = self._timeout(timeout)
        reply = call_with_retry(
            lambda: _rpc(lambda: self._generation.Generate(request, timeout=deadline, metadata=meta)),
            self.connection.retry,
            GENERATION_CODES,
        )
        return convert.result_from_proto(reply)

    def score(
        self,
        prompt: str | Sequence[convert.MessageLike] | None = None,
        continuation: str = "",
        *,
        messages: Sequence[convert.MessageLike] | None = None,
        adapter: str | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> ScoreResult:
        """Log-likelihood of `continuation` right after `prompt` (text) or `messages` (a chat, rendered
        with the generation prompt), with `adapter` (None = the base model). Nothing is generated.

        The continuation is tokenized on its own and appended to the prompt's tokens. Use it for
        evaluation: perplexity (`result.perplexity`), preference margins, multiple choice. Retried on
        UNAVAILABLE and RESOURCE_EXHAUSTED.
        """
        request = convert.build_score_request(prompt, messages, continuation, adapter, request_id)
        meta = self.connection.generation_metadata()
        deadline = self._timeout(timeout)
        reply = call_with_retry(
            lambda: _rpc(lambda: self._generation.Score(request, timeout=deadline, metadata=meta)),
            self.connection.retry,
            GENERATION_CODES,
        )
        return convert.score_from_proto(reply)

    def stream(
        self,
        prompt: str | Sequence[convert.MessageLike] | None = None,
        *,
        messages: Sequence[convert.MessageLike] | None = None,
        adapter: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float | None = None,
        top_k: int = 0,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
        ignore_eos: bool = False,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        logit_bias: Mapping[int, float] | None = None,
        min_tokens: int = 0,
        logprobs: int | None = None,
        n: int = 1,
        prompt_logprobs: int | None = None,
        request_id: str | None = None,
        response_format: str | Mapping[str, Any] | None = None,
        json_schema: Mapping[str, Any] | str | None = None,
        timeout: float | None = None,
    ) -> Iterator[StreamChunk]:
        """Like `generate`, yielding chunks as they are produced; the last one has `finish_reason` set.

        The call is retried (UNAVAILABLE, RESOURCE_EXHAUSTED) only until its first chunk arrived.
        Closing the iterator early (`break`, `.close()`) cancels the call, which frees the server's work.
        The request is checked when this is called; the call starts on the first `next()`.
        """
        request = convert.build_generate_request(
            prompt,
            messages,
            adapter,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=repetition_penalty,
            seed=seed,
            stop=stop,
            ignore_eos=ignore_eos,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
            logit_bias=logit_bias,
            min_tokens=min_tokens,
            logprobs=logprobs,
            n=n,
            prompt_logprobs=prompt_logprobs,
            request_id=request_id,
            response_format=response_format,
            json_schema=json_schema,
        )
        return self._stream(request, self._timeout(timeout))

    def _stream(
        self, request: generation_pb2.GenerateRequest, deadline: float | None
    ) -> Iterator[StreamChunk]:
        meta = self.connection.generation_metadata()
        attempts = Attempts(self.connection.retry)
        index = 0
        while True:
            call = self._generation.GenerateStream(request, timeout=deadline, metadata=meta)
            try:
                for message in call:
                    yield convert.chunk_from_proto(message, index)
                    index += 1
                return
            except grpc.RpcError as rpc_err:
                err = from_rpc_error(rpc_err)
                wait = attempts.next_wait(err, GENERATION_CODES) if index == 0 else None
                if wait is None:
                    raise err from None
            finally:
                call.cancel()  # no-op once finished; frees the server's work on early close
            time.sleep(wait)

    def server_info(self, *, timeout: float | None = None) -> ServerInfo:
        """The served base model and the server's limits (a generation call: uses `token`)."""
        meta = self.connection.generation_metadata()
        reply = call_with_retry(
            lambda: _rpc(
                lambda: self._generation.GetServerInfo(
                    generation_pb2.GetServerInfoRequest(), timeout=self._timeout(timeout), metadata=meta
                )
            ),
            self.connection.retry,
            READ_CODES,
        )
        return convert.server_info_from_proto(reply)

    # -- admin -----------------------------------------------------------------------------------

    def _admin_call(
        self, method: Callable[..., T], request: Any, codes: frozenset[str], timeout: float | None
    ) -> T:
        meta = self.connection.admin_metadata()
        deadline = self._timeout(timeout)
        return call_with_retry(
            lambda: _rpc(lambda: method(request, timeout=deadline, metadata=meta)),
            self.connection.retry,
            codes,
        )

    def _server_chunk_limit(self) -> int | None:
        """The server's upload chunk limit, asked once; None when it cannot be asked."""
        if self._chunk_limit is None:
            try:  # one attempt, no retries: the upload's own retry policy covers an unreachable server
                reply = _rpc(
                    lambda: self._generation.GetServerInfo(
                        generation_pb2.GetServerInfoRequest(),
                        timeout=self._timeout(None),
                        metadata=self.connection.generation_metadata(),
                    )
                )
            except AdapterServeError:
                return None
            self._chunk_limit = convert.server_info_from_proto(reply).limits.upload_chunk_bytes
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
        total = sum(f.size for f in files)
        meta = self.connection.admin_metadata()
        deadline = self._timeout(timeout)
        attempts = Attempts(self.connection.retry)
        while True:
            tracker = ProgressTracker(total, progress)
            messages = convert.upload_messages(files, name, overwrite, description, chunk_bytes, tracker)
            try:
                reply = _rpc(lambda m=messages: self._admin.UploadAdapter(m, timeout=deadline, metadata=meta))
                return convert.upload_result_from_proto(reply)
            except AdapterServeError as err:
                wait = attempts.next_wait(err, READ_CODES) if tracker.sent_bytes == 0 else None
                if wait is None:
                    raise
            time.sleep(wait)

    def list_adapters(
        self, *, name_prefix: str = "", page_size: int = 0, timeout: float | None = None
    ) -> list[AdapterInfo]:
        """All adapters (optionally only those whose name starts with `name_prefix`), in name order.

        Follows the server's paging until the last page.
        """
        out: list[AdapterInfo] = []
        token = ""
        while True:
            request = admin_pb2.ListAdaptersRequest(
                page_size=page_size, page_token=token, name_prefix=name_prefix
            )
            reply = self._admin_call(self._admin.ListAdapters, request, READ_CODES, timeout)
            out.extend(convert.adapter_from_proto(a) for a in reply.adapters)
            token = reply.next_page_token
            if not token:
                return out

    def get_adapter(self, name: str, *, timeout: float | None = None) -> AdapterInfo:
        """Describe one adapter; NotFound if there is none of that name."""
        reply = self._admin_call(
            self._admin.GetAdapter, admin_pb2.GetAdapterRequest(name=name), READ_CODES, timeout
        )
        return convert.adapter_from_proto(reply.adapter)

    def delete_adapter(self, name: str, *, timeout: float | None = None) -> AdapterInfo:
        """Delete an adapter; returns it as it was. Never retried."""
        reply = self._admin_call(
            self._admin.DeleteAdapter, admin_pb2.DeleteAdapterRequest(name=name), _NO_CODES, timeout
        )
        return convert.adapter_from_proto(reply.adapter)

    def pin(self, name: str, *, timeout: float | None = None) -> AdapterInfo:
        """Pin an adapter (loaded now, never evicted). Idempotent."""
        reply = self._admin_call(
            self._admin.PinAdapter, admin_pb2.PinAdapterRequest(name=name), READ_CODES, timeout
        )
        return convert.adapter_from_proto(reply.adapter)

    def unpin(self, name: str, *, timeout: float | None = None) -> AdapterInfo:
        """Unpin an adapter (evictable again). Idempotent."""
        reply = self._admin_call(
            self._admin.UnpinAdapter, admin_pb2.UnpinAdapterRequest(name=name), READ_CODES, timeout
        )
        return convert.adapter_from_proto(reply.adapter)

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
