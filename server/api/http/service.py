"""The OpenAI-compatible protocol over the engine, without a web framework.

`OpenAIService` turns a parsed JSON body into an engine request (through the same validation, limits
and tokenization as gRPC: requests.to_engine_request), runs it, and builds OpenAI's response objects
or server-sent-event frames. The FastAPI app of `serve` (app.py) and the Ray Serve replicas
(adapterserve.server.scaleout) both call it, so every transport gives the same answers.

`model` names an adapter, or the base model's served name for no adapter; anything else is a 404
(`model_not_found`), never a silent fallback to the base.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from adapterserve.server.api.auth import GENERATION_PREFIX, AuthPolicy, decide
from adapterserve.server.api.http.choices import ChoiceState, TokenTexts, chat_logprobs, completion_logprobs
from adapterserve.server.api.http.errors import OpenAIError, to_openai_error
from adapterserve.server.api.http.schemas import (
    DEFAULT_COMPLETION_MAX_TOKENS,
    DEFAULT_TEMPERATURE,
    ChatCompletionRequest,
    CompletionRequest,
    describe_validation_error,
)
from adapterserve.server.api.lifecycle import Lifecycle
from adapterserve.server.api.metrics import ServerMetrics
from adapterserve.server.api.requests import to_engine_request
from adapterserve.server.api.response_format import response_format_proto
from adapterserve.server.api.runtime import RuntimeRef
from adapterserve.server.engine.types import FinishReason, TokenEvent
from adapterserve.server.errors import NotFoundError, UnavailableError
from adapterserve.server.settings import LimitSettings
from adapterserve.server.store.names import is_valid_name
from adapterserve.v1 import generation_pb2

PROTOCOL = "http"
COMPLETIONS = "completions"
CHAT = "chat.completions"
_FINISH = {
    FinishReason.LENGTH: "length",
    FinishReason.STOP: "stop",
    FinishReason.EOS: "stop",
    FinishReason.SCORED: "length",  # echo with max_tokens 0: nothing generated
}
OWNER = "adapterserve"


def sse(payload: dict[str, Any] | str) -> str:
    """One server-sent event frame (`data: ...` and a blank line)."""
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


SSE_DONE = sse("[DONE]")


def served_name_of(base_model: str) -> str:
    """The default served name of a base: the last part of its path or label (no directories)."""
    name = base_model.rstrip("/").rsplit("/", 1)[-1]
    return name.split(":", 1)[-1] or "base"


def bearer_refusal(policy: AuthPolicy, authorization: str | None) -> OpenAIError | None:
    """The 401/403 for an HTTP generation call, with the same tokens and rules as gRPC's Generation."""
    metadata = () if authorization is None else (("authorization", authorization),)
    refusal = decide(policy, GENERATION_PREFIX + "Generate", metadata)
    if refusal is None:
        return None
    code, message = refusal
    message = message.replace(
        "metadata 'authorization: Bearer <token>'", "the header 'Authorization: Bearer <token>'"
    )
    return OpenAIError.of_code(code.name, message, code="invalid_api_key")


@dataclass
class _Run:
    """One request's progress and timings (monotonic seconds)."""

    id: str
    model: str
    started: float
    created: int = field(default_factory=lambda: int(time.time()))
    first_token_at: float | None = None
    completion_tokens: int = 0
    prompt_tokens: int = 0
    finish_reason: FinishReason | None = None
    prompt_ids: tuple[int, ...] = ()
    choices: int = 1  # n
    open_choices: int = 1  # choices without their final event yet

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    def finish(self) -> str | None:
        return None if self.finish_reason is None else _FINISH.get(self.finish_reason, "stop")


def finish_of(reason: FinishReason | None) -> str | None:
    return None if reason is None else _FINISH.get(reason, "stop")


class OpenAIService:
    """Completions, chat completions and the model list, for any HTTP front end."""

    def __init__(
        self,
        runtime: RuntimeRef,
        limits: LimitSettings,
        metrics: ServerMetrics,
        lifecycle: Lifecycle,
        served_model_name: str | None = None,
    ) -> None:
        self._runtime = runtime
        self._limits = limits
        self._metrics = metrics
        self._lifecycle = lifecycle
        self._served_name = served_model_name
        self._texts: TokenTexts | None = None

    def _token_texts(self) -> TokenTexts:
        tokenizer = self._runtime.get().tokenizer
        if self._texts is None or self._texts._tokenizer is not tokenizer:
            self._texts = TokenTexts(tokenizer)
        return self._texts

    # ------------------------------------------------------------------ models
    def served_name(self) -> str:
        """The base model's name in `model` (the flag --served-model-name, else from the base's path)."""
        if self._served_name:
            return self._served_name
        return served_name_of(self._runtime.get().server_info.base_model)

    async def models(self) -> dict[str, Any]:
        """GET /v1/models: the base, then every served adapter with parent/root = the base."""
        if (reason := self._lifecycle.refusal()) is not None:
            raise to_openai_error(UnavailableError(reason), "models")
        base = self.served_name()
        now = int(time.time())
        data: list[dict[str, Any]] = [
            {
                "id": base,
                "object": "model",
                "created": now,
                "owned_by": OWNER,
                "root": base,
                "parent": None,
                "adapter_kind": None,
            }
        ]
        for record in await self._runtime.get().catalog.list():
            data.append(
                {
                    "id": record.name,
                    "object": "model",
                    "created": int(record.created_at.timestamp()),
                    "owned_by": OWNER,
                    "root": base,
                    "parent": base,
                    "adapter_kind": str(record.info.kind),
                    "peft_type": record.info.peft_type,
                }
            )
        return {"object": "list", "data": data}

    # ------------------------------------------------------------------ requests
    def _parse(self, body: Any, schema: type[CompletionRequest] | type[ChatCompletionRequest]) -> Any:
        if not isinstance(body, dict):
            raise OpenAIError(400, "the request body must be a JSON object")
        try:
            return schema.model_validate(body)
        except ValidationError as exc:
            message, param = describe_validation_error(exc)
            raise OpenAIError(400, message, param=param) from None

    def _adapter_of(self, model: str) -> str:
        if model == self.served_name():
            return ""
        if not is_valid_name(model):
            raise OpenAIError.model_not_found(model)
        return model

    def _to_proto(self, req: CompletionRequest | ChatCompletionRequest, request_id: str) -> Any:
        if isinstance(req, ChatCompletionRequest):
            max_tokens = req.max_completion_tokens or req.max_tokens or self._limits.max_new_tokens
        elif req.max_tokens is None:
            max_tokens = min(DEFAULT_COMPLETION_MAX_TOKENS, self._limits.max_new_tokens)
        else:
            max_tokens = max(req.max_tokens, 1)  # 0 (echo only) runs as a scoring request: see _events
        sampling = generation_pb2.SamplingParams(
            max_new_tokens=max_tokens,
            temperature=DEFAULT_TEMPERATURE if req.temperature is None else req.temperature,
            top_k=max(req.top_k or 0, 0),
            stop=req.stops(),
            ignore_eos=req.ignore_eos,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            logit_bias=req.bias(),
            min_tokens=req.min_tokens,
        )
        if isinstance(req, ChatCompletionRequest):
            if req.logprobs:
                sampling.logprobs = req.top_logprobs or 0
        elif req.logprobs is not None:
            sampling.logprobs = req.logprobs
        if req.top_p is not None:
            sampling.top_p = req.top_p
        if req.repetition_penalty is not None:
            sampling.repetition_penalty = req.repetition_penalty
        if req.seed is not None:
            sampling.seed = req.seed
        proto = generation_pb2.GenerateRequest(
            adapter=self._adapter_of(req.model), sampling=sampling, request_id=request_id, n=req.n
        )
        if (fmt := req.response_format) is not None and fmt.type != "text":
            schema = fmt.json_schema.schema_ if fmt.json_schema is not None else None
            proto.response_format.CopyFrom(response_format_proto(fmt.type, schema))
        if isinstance(req, ChatCompletionRequest):
            proto.messages.messages.extend(
                generation_pb2.ChatMessage(role=m.role, content=m.text()) for m in req.messages
            )
        else:
            prompt = req.prompt_value()
            if isinstance(prompt, str):
                proto.prompt = prompt
            else:
                proto.prompt_ids.ids.extend(prompt)
            if req.echo and req.logprobs is not None:
                proto.prompt_logprobs = req.logprobs
        return proto

    async def _events(
        self, method: str, req: CompletionRequest | ChatCompletionRequest, run: _Run
    ) -> AsyncIterator[TokenEvent]:
        """Admit, submit and relay the engine's events; refusals raise OpenAIError before the first event.

        Counts the call in the lifecycle (limits and drain shared with gRPC) and in the metrics; whatever
        ends the iteration early (client gone, error) cancels the engine work at once.
        """
        label = self._metrics.labels.known(req.model)
        status = "OK"
        handle = None
        try:
            async with self._lifecycle.call(generation=True):
                runtime = self._runtime.get()
                proto = self._to_proto(req, run.id)
                adapter = proto.adapter
                label = self._metrics.labels.known(adapter)
                engine_request = to_engine_request(proto, runtime.tokenizer, self._limits)
                run.prompt_tokens = len(engine_request.prompt_ids)
                run.prompt_ids = engine_request.prompt_ids
                run.choices = run.open_choices = engine_request.n
                if isinstance(req, CompletionRequest) and req.max_tokens == 0:
                    # echo only: a scoring request over the prompt (its tokens after the first)
                    if len(engine_request.prompt_ids) < 2:
                        run.finish_reason = FinishReason.SCORED
                        yield TokenEvent((), "", FinishReason.SCORED, prompt_tokens=run.prompt_tokens)
                        return
                    engine_request = dataclasses.replace(
                        engine_request,
                        score_tokens=len(engine_request.prompt_ids) - 1,
                        prompt_logprobs=engine_request.prompt_logprobs or 0,
                    )
                try:
                    handle = await runtime.engine.submit(engine_request)
                except NotFoundError:
                    raise OpenAIError.model_not_found(req.model) from None
                label = self._metrics.labels.grant(adapter)
                async for event in handle:
                    if event.finish_reason is FinishReason.ERROR:
                        raise event.error or RuntimeError("engine reported an error without details")
                    if event.finish_reason is FinishReason.CANCELLED:
                        raise UnavailableError(
                            "generation was cancelled by the server (shutting down); retry"
                        )
                    if event.token_ids and run.first_token_at is None:
                        run.first_token_at = time.monotonic()
                    run.completion_tokens += len(event.token_ids)
                    if event.finish_reason is not None:
                        run.open_choices -= 1
                        if run.open_choices <= 0:  # every choice's final event came
                            run.finish_reason = event.finish_reason
                        run.prompt_tokens = event.prompt_tokens or run.prompt_tokens
                    yield event
                    if run.finish_reason is not None:
                        return
                raise RuntimeError("engine stream ended without a finish reason")
        except (asyncio.CancelledError, GeneratorExit):
            status = "CANCELLED"
            raise
        except OpenAIError as err:
            status = err.grpc_code
            raise
        except Exception as exc:
            err = to_openai_error(exc, method)
            status = err.grpc_code
            raise err from exc
        finally:
            if handle is not None and run.finish_reason is None:
                handle.cancel()
            self._metrics.record_request(method, label, status, protocol=PROTOCOL)
            if status == "OK" and run.finish_reason is not None:
                ttft = None if run.first_token_at is None else run.first_token_at - run.started
                self._metrics.record_generation(
                    label, run.prompt_tokens, run.completion_tokens, ttft, time.monotonic() - run.started
                )

    def _new_run(self, prefix: str, req: Any) -> _Run:
        return _Run(id=f"{prefix}-{uuid.uuid4().hex}", model=req.model, started=time.monotonic())

    def _echo_text(self, req: CompletionRequest, run: _Run) -> str:
        """The prompt as `echo` repeats it: the prompt text, or its token ids decoded."""
        prompt = req.prompt_value()
        if isinstance(prompt, str):
            return prompt
        return self._runtime.get().tokenizer.decode(list(run.prompt_ids))

    def _completion_choice(
        self, req: CompletionRequest, run: _Run, state: ChoiceState, entries: list, text: str, offset: int
    ) -> dict[str, Any]:
        """A completions choice (or a chunk's): `entries` are the token logprobs it reports; `offset`
        the text offset of the first one (with echo: the prompt's, given on the choice's first piece)."""
        echo = req.echo and not state.started
        if echo:
            text = self._echo_text(req, run) + text
        logprobs = None
        if req.logprobs is not None:
            logprobs = completion_logprobs(
                self._token_texts(),
                entries,
                offset,
                prompt=state.prompt_logprobs if echo else None,
                first_prompt_token=run.prompt_ids[0] if echo and run.prompt_ids else None,
            )
        return {"index": state.index, "text": text, "finish_reason": None, "logprobs": logprobs}

    async def complete(self, body: Any) -> dict[str, Any]:
        """POST /v1/completions without streaming."""
        req = self._parse(body, CompletionRequest)
        run = self._new_run("cmpl", req)
        states = [ChoiceState(i) for i in range(req.n)]
        async for event in self._events(COMPLETIONS, req, run):
            states[event.index].add(event)
        choices = []
        for state in states:
            choice = self._completion_choice(req, run, state, state.logprobs, state.text, 0)
            choice["finish_reason"] = finish_of(state.finish_reason)
            choices.append(choice)
        return {
            "id": run.id,
            "object": "text_completion",
            "created": run.created,
            "model": req.model,
            "choices": choices,
            "usage": run.usage(),
        }

    def _chat_logprobs(self, req: ChatCompletionRequest, entries: list) -> dict[str, Any] | None:
        if not req.logprobs:
            return None
        return chat_logprobs(self._token_texts(), entries, req.top_logprobs or 0)

    async def chat(self, body: Any) -> dict[str, Any]:
        """POST /v1/chat/completions without streaming."""
        req = self._parse(body, ChatCompletionRequest)
        run = self._new_run("chatcmpl", req)
        states = [ChoiceState(i) for i in range(req.n)]
        async for event in self._events(CHAT, req, run):
            states[event.index].add(event)
        return {
            "id": run.id,
            "object": "chat.completion",
            "created": run.created,
            "model": req.model,
            "choices": [
                {
                    "index": state.index,
                    "message": {"role": "assistant", "content": state.text},
                    "finish_reason": finish_of(state.finish_reason),
                    "logprobs": self._chat_logprobs(req, state.logprobs),
                }
                for state in states
            ],
            "usage": run.usage(),
        }

    def is_streaming(self, body: Any) -> bool:
        return isinstance(body, dict) and body.get("stream") is True

    async def stream(self, endpoint: str, body: Any) -> AsyncIterator[str]:  # returns the frames' iterator
        """SSE frames of a streamed completion (`endpoint` "completions" or "chat.completions").

        A refused request raises OpenAIError before the first frame (so the caller can still answer
        with a plain JSON error and status); an error after that ends the stream with an error frame.
        """
        chat = endpoint == CHAT
        req = self._parse(body, ChatCompletionRequest if chat else CompletionRequest)
        run = self._new_run("chatcmpl" if chat else "cmpl", req)
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choice: dict[str, Any] | None, usage: dict[str, int] | None = None) -> str:
            frame: dict[str, Any] = {
                "id": run.id,
                "object": obj,
                "created": run.created,
                "model": req.model,
                "choices": [] if choice is None else [choice],
            }
            if usage is not None:
                frame["usage"] = usage
            return sse(frame)

        states = [ChoiceState(i) for i in range(req.n)]

        def pieces(event: TokenEvent) -> list[dict[str, Any]]:
            """The choice chunks of one event: its text and logprobs (the first with the role, or the
            echoed prompt), then the finish reason on its last event."""
            state = states[event.index]
            entries = state.add(event)
            out: list[dict[str, Any]] = []
            if event.text or entries or not state.started:
                if chat:
                    delta: dict[str, Any] = (
                        {"content": event.text}
                        if state.started
                        else {"role": "assistant", "content": event.text}
                    )
                    out.append(
                        {
                            "index": state.index,
                            "delta": delta,
                            "finish_reason": None,
                            "logprobs": self._chat_logprobs(req, entries),
                        }
                    )
                else:
                    out.append(self._completion_choice(req, run, state, entries, event.text, state.offset))
                    logprobs = out[-1]["logprobs"]
                    if logprobs is not None and logprobs["tokens"]:
                        state.offset = logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])
                state.started = True
            if event.finish_reason is not None:
                finish = finish_of(event.finish_reason)
                if chat:
                    out.append({"index": state.index, "delta": {}, "finish_reason": finish, "logprobs": None})
                else:
                    out.append({"index": state.index, "text": "", "finish_reason": finish, "logprobs": None})
            return out

        events = self._events(CHAT if chat else COMPLETIONS, req, run)
        first = await anext(events)  # refusals raise here, before any frame
        return self._frames(events, first, chunk, pieces, req.include_usage(), run)

    async def _frames(
        self,
        events: AsyncIterator[TokenEvent],
        first: TokenEvent,
        chunk: Callable[..., str],
        pieces: Callable[[TokenEvent], list[dict[str, Any]]],
        include_usage: bool,
        run: _Run,
    ) -> AsyncIterator[str]:
        try:
            event: TokenEvent | None = first
            while event is not None:
                for choice in pieces(event):
                    yield chunk(choice)
                if run.finish_reason is not None:
                    break
                event = await anext(events, None)
            if include_usage:
                yield chunk(None, usage=run.usage())
            yield SSE_DONE
        except OpenAIError as err:
            yield sse(err.body())
        finally:
            await events.aclose()
