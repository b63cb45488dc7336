"""The OpenAI-compatible protocol over the engine, without a web framework.

`OpenAIService` turns a parsed JSON body into the engine's request (tokenized by prompts.py and checked
by validation.check_request, the same checks and limits as gRPC), runs it through a GenerationSession
(session.py: admission, engine, cancel, metrics and timing, the same as gRPC's), and builds OpenAI's
response objects or server-sent-event frames. The FastAPI app of `serve` (app.py) and the Ray Serve replicas
(adapterserve.server.scaleout) both call it, so every transport gives the same answers.

`model` names an adapter, or the base model's served name for no adapter; anything else is a 404
(`model_not_found`), never a silent fallback to the base.
"""

from __future__ import annotations

import functools
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
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
from adapterserve.server.api.prompts import checked_ids, ids_of_chat, ids_of_text, vocab_size
from adapterserve.server.api.response_format import structured_output
from adapterserve.server.api.runtime import RuntimeRef
from adapterserve.server.api.session import GenerationSession, Sessions
from adapterserve.server.api.validation import (
    FieldNames,
    check_batch_rows,
    check_batch_tokens,
    check_request,
)
from adapterserve.server.engine.types import (
    FinishReason,
    GenerationRequest,
    SamplingParams,
    StructuredKind,
    StructuredOutput,
    TokenEvent,
)
from adapterserve.server.errors import InvalidArgumentError, NotFoundError, UnavailableError
from adapterserve.server.settings import LimitSettings
from adapterserve.server.store.names import NAME_RULE, is_valid_name

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


def origin_json(origin: Any) -> dict[str, Any] | None:
    """A fetched adapter's origin in /v1/models (None for an uploaded one)."""
    if origin is None:
        return None
    return {
        "source": origin.source,
        "etag": origin.tag,
        "revision": origin.revision,
        "fetched_at": int(origin.fetched_at.timestamp()),
    }


def bearer_refusal(
    policy: AuthPolicy, authorization: str | None, method: str = GENERATION_PREFIX + "Generate"
) -> OpenAIError | None:
    """The 401/403 for an HTTP call, with the same tokens and rules as gRPC's `method` (Generation's
    by default; an Admin method for the admin routes)."""
    metadata = () if authorization is None else (("authorization", authorization),)
    refusal = decide(policy, method, metadata)
    if refusal is None:
        return None
    code, message = refusal
    message = message.replace(
        "metadata 'authorization: Bearer <token>'", "the header 'Authorization: Bearer <token>'"
    )
    return OpenAIError.of_code(code.name, message, code="invalid_api_key")


@dataclass
class _Run:
    """One HTTP request: its OpenAI id and model, and the session that runs it (progress and timings)."""

    id: str
    model: str
    session: GenerationSession
    created: int = field(default_factory=lambda: int(time.time()))

    def usage(self) -> dict[str, int]:
        prompt, completion = self.session.prompt_tokens, self.session.generated_tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    @property
    def choices(self) -> int:
        """Choices of the whole request: every prompt's n (index = prompt position * n + choice)."""
        return sum(r.n for r in self.session.requests) or 1

    def request_of(self, index: int) -> GenerationRequest | None:
        """The engine request (the prompt) that choice `index` belongs to."""
        position = self.position_of(index)
        requests = self.session.requests
        return requests[position] if position < len(requests) else None

    def position_of(self, index: int) -> int:
        """The position, in the request's list of prompts, of the prompt of choice `index`."""
        return self.session.locate(index)[0]


def _echo_only(req: CompletionRequest | ChatCompletionRequest) -> bool:
    """A completion with max_tokens 0 (and echo): the prompt and its logprobs, nothing generated."""
    return isinstance(req, CompletionRequest) and req.max_tokens == 0


def _structured(req: CompletionRequest | ChatCompletionRequest) -> StructuredOutput | None:
    """OpenAI's response_format as the engine's StructuredOutput (checked as gRPC's is)."""
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return structured_output(StructuredKind.JSON_OBJECT)
    schema = fmt.json_schema.schema_ if fmt.json_schema is not None else None
    return structured_output(StructuredKind.JSON_SCHEMA, json.dumps(schema))


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
        self._lifecycle = lifecycle
        self._sessions = Sessions(runtime, metrics, lifecycle)
        self._served_name = served_model_name
        self._texts: TokenTexts | None = None

    def _token_texts(self) -> TokenTexts:
        tokenizer = self._runtime.get().tokenizer
        if self._texts is None or self._texts.tokenizer is not tokenizer:
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
                    "origin": origin_json(record.origin),
                }
            )
        return {"object": "list", "data": data}

    async def refresh(self, name: str) -> dict[str, Any]:
        """POST /v1/adapters/{name}/refresh (admin): ask a fetched adapter's source again."""
        if (reason := self._lifecycle.refusal()) is not None:
            raise to_openai_error(UnavailableError(reason), "refresh")
        try:
            record, changed = await self._runtime.get().catalog.refresh(name)
        except Exception as exc:
            raise to_openai_error(exc, "refresh") from None
        return {
            "id": record.name,
            "version": record.version,
            "changed": changed,
            "origin": origin_json(record.origin),
        }

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
        if not is_valid_name(model):  # never reaches the store or a source
            raise InvalidArgumentError(f"model {model[:80]!r} is not a valid adapter name: {NAME_RULE}")
        return model

    def engine_request(
        self, req: CompletionRequest | ChatCompletionRequest, request_id: str, tokenizer: Any
    ) -> GenerationRequest:
        """The engine request of a parsed body with one prompt (a chat, or one completions prompt)."""
        requests = self.engine_requests(req, request_id, tokenizer)
        if len(requests) != 1:
            raise InvalidArgumentError(f"prompt: {len(requests)} prompts where one was expected")
        return requests[0]

    def engine_requests(
        self, req: CompletionRequest | ChatCompletionRequest, request_id: str, tokenizer: Any
    ) -> list[GenerationRequest]:
        """The engine requests of a parsed body, one per prompt, tokenized and checked: each as a
        request of its own (validation.check_request), and the whole request against the batch limits
        (max_batch_rows, max_batch_tokens). With several prompts, request i is `{request_id}-{i}` and a
        refusal names `prompt[i]`."""
        chat = isinstance(req, ChatCompletionRequest)
        max_name = "max_tokens"
        if isinstance(req, ChatCompletionRequest):
            if req.max_completion_tokens is not None:
                max_name, max_tokens = "max_completion_tokens", req.max_completion_tokens
            else:
                max_tokens = self._limits.max_new_tokens if req.max_tokens is None else req.max_tokens
            logprobs = (req.top_logprobs or 0) if req.logprobs else None
        else:
            if req.max_tokens is None:
                max_tokens = min(DEFAULT_COMPLETION_MAX_TOKENS, self._limits.max_new_tokens)
            else:  # 0 (echo only): nothing is generated, the prompt is scored (see _echo_only)
                max_tokens = req.max_tokens or 1
            logprobs = req.logprobs
        sampling = SamplingParams(
            max_new_tokens=max_tokens,
            temperature=DEFAULT_TEMPERATURE if req.temperature is None else req.temperature,
            top_k=0 if req.top_k in (None, -1) else req.top_k,  # -1 or 0: off
            top_p=1.0 if req.top_p is None else req.top_p,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            seed=req.seed,
            stop=tuple(req.stops()),
            ignore_eos=req.ignore_eos,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            logit_bias=tuple(sorted(req.bias().items())),
            min_tokens=req.min_tokens,
            logprobs=logprobs,
        )
        prompt_logprobs = None
        prompts: list[tuple[str, tuple[int, ...]]] = []  # (field, token ids) per prompt
        if isinstance(req, ChatCompletionRequest):
            messages = [(m.role, m.text()) for m in req.messages]
            prompts.append(("messages", ids_of_chat(tokenizer, messages, "messages")))
        else:
            texts = req.prompts()
            check_batch_rows(len(texts), len(texts) * req.n, self._limits)
            for i, prompt in enumerate(texts):
                name = "prompt" if len(texts) == 1 else f"prompt[{i}]"
                if isinstance(prompt, str):
                    prompts.append((name, ids_of_text(tokenizer, prompt, name)))
                else:
                    prompts.append((name, checked_ids(tokenizer, prompt, name)))
            if req.echo and req.logprobs is not None:
                prompt_logprobs = req.logprobs
        adapter = self._adapter_of(req.model) or None
        structured = _structured(req)
        names = FieldNames(
            sampling={"max_new_tokens": max_name, "logprobs": "top_logprobs" if chat else "logprobs"},
            request={"prompt_logprobs": "logprobs"},
        )
        requests = []
        for i, (prompt_field, prompt_ids) in enumerate(prompts):
            request = GenerationRequest(
                request_id=request_id if len(prompts) == 1 else f"{request_id}-{i}",
                prompt_ids=prompt_ids,
                adapter=adapter,
                sampling=sampling,
                structured=structured,
                n=req.n,
                prompt_logprobs=prompt_logprobs,
            )
            check_request(
                request, self._limits, names, prompt_field=prompt_field, vocab=vocab_size(tokenizer)
            )
            if _echo_only(req) and len(prompt_ids) >= 2:
                # a scoring request over the prompt (its tokens after the first)
                request = replace(
                    request, score_tokens=len(prompt_ids) - 1, prompt_logprobs=prompt_logprobs or 0
                )
            requests.append(request)
        check_batch_tokens(sum(len(ids) for _, ids in prompts), self._limits)
        return requests

    def _events(self, req: CompletionRequest | ChatCompletionRequest, run: _Run) -> AsyncIterator[TokenEvent]:
        """The session's events (admission, limits and drain shared with gRPC; metrics; cancel on an early
        end). Its errors are mapped to OpenAI's by `_openai_error`."""
        build = functools.partial(self.engine_requests, req, run.id)

        def local(request: GenerationRequest) -> TokenEvent | None:
            if _echo_only(req) and not request.score_tokens:  # a one-token prompt: nothing to score
                return TokenEvent((), "", FinishReason.SCORED, prompt_tokens=len(request.prompt_ids))
            return None

        return run.session.batch_events(build, local)

    @staticmethod
    def _openai_error(exc: BaseException, run: _Run) -> OpenAIError:
        if isinstance(exc, NotFoundError):
            return OpenAIError.model_not_found(run.model, detail=str(exc))
        return to_openai_error(exc, run.session.method)

    def _new_run(self, prefix: str, req: Any, method: str) -> _Run:
        session = self._sessions.open(method, req.model, protocol=PROTOCOL)
        return _Run(id=f"{prefix}-{uuid.uuid4().hex}", model=req.model, session=session)

    def _echo_text(self, req: CompletionRequest, run: _Run, index: int) -> str:
        """The prompt of choice `index` as `echo` repeats it: the prompt text, or its token ids decoded."""
        prompt = req.prompts()[run.position_of(index)]
        if isinstance(prompt, str):
            return prompt
        return self._runtime.get().tokenizer.decode(list(prompt))

    def _completion_choice(
        self, req: CompletionRequest, run: _Run, state: ChoiceState, entries: list, text: str, offset: int
    ) -> dict[str, Any]:
        """A completions choice (or a chunk's): `entries` are the token logprobs it reports; `offset`
        the text offset of the first one (with echo: the prompt's, given on the choice's first piece)."""
        echo = req.echo and not state.started
        if echo:
            text = self._echo_text(req, run, state.index) + text
        logprobs = None
        if req.logprobs is not None:
            request = run.request_of(state.index)
            logprobs = completion_logprobs(
                self._token_texts(),
                entries,
                offset,
                prompt=state.prompt_logprobs if echo else None,
                first_prompt_token=request.prompt_ids[0] if echo and request is not None else None,
            )
        return {"index": state.index, "text": text, "finish_reason": None, "logprobs": logprobs}

    async def _collect(self, req: CompletionRequest | ChatCompletionRequest, run: _Run) -> list[ChoiceState]:
        """Run a request to its end; each choice's text, logprobs and finish reason."""
        states: dict[int, ChoiceState] = {}
        try:
            async for event in self._events(req, run):
                state = states.get(event.index) or states.setdefault(event.index, ChoiceState(event.index))
                state.add(event)
        except Exception as exc:
            raise self._openai_error(exc, run) from exc
        return [states.get(i) or ChoiceState(i) for i in range(run.choices)]

    async def complete(self, body: Any) -> dict[str, Any]:
        """POST /v1/completions without streaming."""
        req = self._parse(body, CompletionRequest)
        run = self._new_run("cmpl", req, COMPLETIONS)
        states = await self._collect(req, run)
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
            "adapter_version": run.session.adapter_version,
        }

    def _chat_logprobs(self, req: ChatCompletionRequest, entries: list) -> dict[str, Any] | None:
        if not req.logprobs:
            return None
        return chat_logprobs(self._token_texts(), entries, req.top_logprobs or 0)

    async def chat(self, body: Any) -> dict[str, Any]:
        """POST /v1/chat/completions without streaming."""
        req = self._parse(body, ChatCompletionRequest)
        run = self._new_run("chatcmpl", req, CHAT)
        states = await self._collect(req, run)
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
            "adapter_version": run.session.adapter_version,
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
        run = self._new_run("chatcmpl" if chat else "cmpl", req, CHAT if chat else COMPLETIONS)
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choice: dict[str, Any] | None, usage: dict[str, int] | None = None) -> str:
            frame: dict[str, Any] = {
                "id": run.id,
                "object": obj,
                "created": run.created,
                "model": req.model,
                "choices": [] if choice is None else [choice],
                "adapter_version": run.session.adapter_version,
            }
            if usage is not None:
                frame["usage"] = usage
            return sse(frame)

        states: dict[int, ChoiceState] = {}

        def pieces(event: TokenEvent) -> list[dict[str, Any]]:
            """The choice chunks of one event: its text and logprobs (the first with the role, or the
            echoed prompt), then the finish reason on its last event."""
            state = states.get(event.index) or states.setdefault(event.index, ChoiceState(event.index))
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

        events = self._events(req, run)
        try:
            first = await anext(events)  # refusals raise here, before any frame
        except Exception as exc:
            raise self._openai_error(exc, run) from exc
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
                if run.session.finish_reason is not None:
                    break
                event = await anext(events, None)
            if include_usage:
                yield chunk(None, usage=run.usage())
            yield SSE_DONE
        except Exception as exc:
            yield sse(self._openai_error(exc, run).body())
        finally:
            await events.aclose()
