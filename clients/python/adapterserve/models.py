"""Typed results of the SDK (pydantic models, frozen): what `Client` and `AsyncClient` return.

They mirror the wire messages of `proto/adapterserve/v1` with Python types (enums as strings, lists,
datetimes) and no protobuf in sight, so they can be printed, compared and dumped to JSON
(`result.model_dump(mode="json")`).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FinishReason(enum.StrEnum):
    """Why generation ended."""

    LENGTH = "length"  # max_new_tokens reached
    STOP = "stop"  # a stop sequence matched (its text is not part of the output)
    EOS = "eos"  # the model produced its end-of-sequence token


class AdapterKind(enum.StrEnum):
    """How an adapter changes the base model."""

    LORA = "lora"
    IA3 = "ia3"
    PROMPT = "prompt"
    PREFIX = "prefix"
    DORA = "dora"
    BOTTLENECK = "bottleneck"
    TEMPLATE = "template"
    UNSPECIFIED = "unspecified"


class CacheTier(enum.StrEnum):
    """The fastest tier holding an adapter's weights right now."""

    DISK = "disk"
    HOST = "host"
    DEVICE = "device"
    UNSPECIFIED = "unspecified"


class ChatMessage(_Frozen):
    """One message of a chat: role ("system", "user", "assistant") and content."""

    role: str
    content: str = ""


class Timings(_Frozen):
    """Server-side timings of one request, in seconds from the server receiving it."""

    time_to_first_token_s: float = 0.0
    total_s: float = 0.0


class TokenLogprob(_Frozen):
    """A token's log-probability (natural log, the model's raw distribution with the adapter applied)
    and the most likely alternatives at its position: (token id, logprob), most likely first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = Field(default_factory=list)


class Choice(_Frozen):
    """One of the n choices of a request (`GenerateResult.choices` when n > 1)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    logprobs: list[TokenLogprob] = Field(default_factory=list)


class GenerateResult(_Frozen):
    """A finished generation."""

    request_id: str
    text: str  # the generated text (stop sequence excluded, prompt not repeated)
    token_ids: list[int]  # the generated token ids, in order
    finish_reason: FinishReason
    prompt_tokens: int
    generated_tokens: int
    timings: Timings = Field(default_factory=Timings)
    adapter: str = ""  # the adapter that served it ("" = the base model)
    logprobs: list[TokenLogprob] = Field(default_factory=list)  # logprobs=k: one per token_ids entry
    prompt_logprobs: list[TokenLogprob] = Field(default_factory=list)  # prompt tokens after the first
    choices: list[Choice] = Field(default_factory=list)  # n > 1: every choice (the fields above: choice 0)
    adapter_version: int = 0  # the adapter version that produced every token (0 = the base model)

    @classmethod
    def from_chunks(cls, chunks: Iterable[StreamChunk], adapter: str = "") -> GenerateResult:
        """The result a complete stream adds up to (text and token ids concatenated in order).

        Raises ValueError if the last chunk does not carry a finish reason (an incomplete stream).
        """
        items = list(chunks)
        if not items or items[-1].finish_reason is None:
            raise ValueError("the stream did not finish (no chunk with a finish reason)")
        last = items[-1]
        return cls(
            request_id=last.request_id,
            text="".join(c.text for c in items),
            token_ids=[t for c in items for t in c.token_ids],
            finish_reason=last.finish_reason,
            prompt_tokens=last.prompt_tokens,
            generated_tokens=last.generated_tokens,
            timings=last.timings or Timings(),
            adapter=adapter,
            adapter_version=last.adapter_version,
        )


class ScoreResult(_Frozen):
    """The log-likelihood of a continuation after a prompt (`Client.score`)."""

    request_id: str
    adapter: str = ""  # "" = the base model
    logprob_sum: float  # natural log; <= 0
    logprob_mean: float  # per continuation token
    continuation_tokens: int
    prompt_tokens: int
    token_ids: list[int] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)

    @property
    def perplexity(self) -> float:
        """exp(-mean log-prob) of the continuation's tokens."""
        import math

        return math.exp(-self.logprob_mean)


class StreamChunk(_Frozen):
    """One message of a generation stream.

    `text` and `token_ids` are new since the previous chunk (text may be empty while a multi-byte
    character or a possible stop sequence is held back). Only the last chunk has `finish_reason`,
    the counts and `timings` set.
    """

    request_id: str
    index: int  # 0, 1, 2, ... in the order received
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    generated_tokens: int = 0
    timings: Timings | None = None
    choice: int = 0  # n > 1: the choice this chunk belongs to (each choice has its own last chunk)
    logprobs: list[TokenLogprob] = Field(default_factory=list)  # logprobs=k: one per token_ids entry
    prompt_logprobs: list[TokenLogprob] = Field(default_factory=list)  # on each choice's first chunk
    adapter_version: int = 0  # the adapter version that produces the stream (0 = the base model)

    @property
    def is_last(self) -> bool:
        return self.finish_reason is not None


class AdapterFile(_Frozen):
    """One stored file of an adapter."""

    name: str
    size_bytes: int
    sha256: str


class AdapterOrigin(_Frozen):
    """Where a fetched adapter came from (the server's --adapter-source) and which version of it."""

    source: str  # e.g. "s3://bucket/prefix", "hf://org", without credentials
    etag: str = ""  # the version there (ETags; the Hub's etag)
    revision: str = ""  # the Hub's commit sha (hf:// only)
    fetched_at: datetime | None = None


class AdapterInfo(_Frozen):
    """A stored adapter as the server describes it."""

    name: str
    kind: AdapterKind
    peft_type: str
    rank: int | None = None  # LoRA kinds only
    num_virtual_tokens: int | None = None  # prompt and prefix kinds only
    target_modules: list[str] = Field(default_factory=list)
    num_parameters: int = 0
    weight_bytes: int = 0  # bytes of the served tensors
    size_bytes: int = 0  # bytes of all stored files
    files: list[AdapterFile] = Field(default_factory=list)
    digest: str = ""  # "sha256:<hex>" over the stored files
    base_fingerprint: str = ""
    created_at: datetime | None = None
    description: str = ""
    pinned: bool = False
    version: int = 0
    cache_tier: CacheTier = CacheTier.UNSPECIFIED
    origin: AdapterOrigin | None = None  # None: uploaded, not fetched from a source


class RefreshResult(_Frozen):
    """The reply of `refresh_adapter`: the adapter as served now, and whether a new version came in."""

    adapter: AdapterInfo
    changed: bool


class UploadResult(_Frozen):
    """The reply of an upload."""

    adapter: AdapterInfo
    replaced: bool  # an existing adapter of that name was replaced
    received_bytes: int


class UpdateResult(_Frozen):
    """The outcome of an in-place weight update (`Client.update_adapter`)."""

    name: str
    version: int  # requests resolve the name to this version from now on
    previous_version: int
    persisted_version: int  # the newest version written to the server's store (0: none yet)
    persisted: bool  # this update was written to the store
    resident: bool  # the new version already sits in a device slot
    received_bytes: int


class HealthStatus(_Frozen):
    """The `grpc.health.v1` status of the server (service "" is the whole server)."""

    service: str = ""
    status: str  # "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN" or "UNKNOWN"

    @property
    def serving(self) -> bool:
        return self.status == "SERVING"


class Limits(_Frozen):
    """The limits a server enforces."""

    max_prompt_tokens: int
    max_new_tokens: int
    max_stop_sequences: int
    max_n: int = 1  # GenerateRequest n at most (0 from a server without it: read as 1)
    max_logprobs: int = 0  # logprobs / prompt_logprobs alternatives at most
    max_batch_rows: int = 0  # generate_batch: prompts x n at most (0 from a server without batches)
    max_batch_tokens: int = 0  # generate_batch: prompt tokens of all prompts together at most
    max_upload_bytes: int
    max_message_bytes: int
    upload_chunk_bytes: int
    max_concurrent_streams: int


class ServerInfo(_Frozen):
    """What a server serves."""

    server_version: str
    base_model: str
    base_fingerprint: str
    model_type: str
    quantize: str
    adapter_kinds: list[AdapterKind]
    limits: Limits
    chat_template: bool
