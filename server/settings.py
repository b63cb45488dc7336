"""One settings object for the server: limits, engine sizes, cache sizes, network.

Built from CLI flags and environment variables (prefix ADAPTERSERVE_, a double underscore per section,
e.g. ADAPTERSERVE_ENGINE__MAX_QUEUE=64 or ADAPTERSERVE_ENGINE__CPU__THREADS=2).
Every component takes the part it needs instead of long argument lists.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Quantize = Literal["nf4", "int8", "none"]
LoraBackendName = Literal["torch", "triton"]  # server/adapters/kernels
CpuPagedAttention = Literal["auto", "kernel", "torch"]  # server/cpu/paged_attention.py

ENV_PREFIX = "ADAPTERSERVE_"
# Alternatives per position (logprobs, prompt_logprobs) any caller may ask for: the engine's bound for every
# request (server/engine/request_limits.py) and the most LimitSettings.max_logprobs may allow a client.
MAX_LOGPROBS = 1024


class CpuSettings(BaseModel):
    """Every control of a CPU engine (server/cpu/, docs/cpu.md): its threads (threads.py, governor.py,
    prefill_workers.py), its linears (linear.py), its decode attention (paged_attention.py) and the pacing
    of its decode steps (decode_pacing.py). EngineSettings.cpu; a GPU engine ignores it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    threads: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="intra-op threads of the engine (default: the CPUs the process may use, from its "
        "affinity mask and cgroup quota; or OMP_NUM_THREADS when set). Setting it turns the governor off",
    )
    wait_policy: Literal["auto", "active", "passive"] = Field(
        "auto",
        description="how idle OpenMP threads wait: auto (libgomp's spin-then-sleep, with the governor), "
        "active (spin), passive (sleep at once; best when the CPUs are always shared)",
    )
    governor: bool = Field(
        True,
        description="lowers the engine's threads while other processes compete for its CPUs, restores them "
        "when they leave (CPU device, default thread count only)",
    )
    prefill_threads: int | None = Field(
        None,
        ge=0,
        le=1024,
        description="threads that run prefill forwards while the engine thread decodes, one intra-op "
        "thread each, on the paged KV cache (default: half the CPU threads, none with one CPU); 0 runs "
        "every prefill inline on the engine thread's OpenMP threads",
    )
    linear: Literal["auto", "onednn", "torch"] = Field(
        "auto",
        description="a CPU engine's base linears: onednn (weights packed once for oneDNN, up to ~2x faster "
        "in float32 on some CPUs, twice the linear weights' memory), torch (F.linear); auto: per weight "
        "shape, for few rows (decode) and many (prefill), whichever of the two is measured faster at "
        "start (server/cpu/linear.py)",
    )
    paged_attention: CpuPagedAttention = Field(
        "auto",
        description="a CPU engine's decode attention over the paged KV cache: kernel (a C++ kernel reading "
        "the blocks in place, built once per machine with a C++ compiler; float32), torch (gather the "
        "pages, then SDPA); auto: the kernel where it applies and builds, else torch",
    )
    decode_pace_ms: int = Field(
        100,
        ge=0,
        description="with prefill workers on a CPU: while the engine thread waits for CPUs (another process "
        "competes for them), a decode step beside prefill jobs starts at most every this many ms, leaving "
        "the CPU to the prefills (cpu/decode_pacing.py); 0: decode steps always run back to back",
    )


class EngineSettings(BaseModel):
    """Sizes of the continuous-batching engine."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_batch_size: int = Field(32, ge=1, le=1024, description="running rows (requests) at most")
    max_seq_len: int = Field(1024, ge=16, description="prompt + virtual tokens + generated, per row")
    max_prefill_tokens: int = Field(
        512, ge=1, description="prompt tokens prefilled per engine step (long prompts are chunked)"
    )
    max_queue: int = Field(256, ge=1, description="waiting requests; past it RESOURCE_EXHAUSTED")
    adapter_slots: int = Field(32, ge=1, description="adapters resident in device slot tensors")
    max_lora_rank: int = Field(64, ge=1, description="LoRA ranks above this are refused")
    max_virtual_tokens: int = Field(128, ge=1, description="prompt/prefix virtual tokens cap")
    kv_cache: Literal["paged", "dense"] = Field(
        "paged", description="paged: blocks reserved per request; dense: rows x max_seq_len preallocated"
    )
    kv_block_size: int = Field(16, ge=1, le=1024, description="tokens per KV cache block (paged)")
    prefix_cache: bool = Field(
        True,
        description="reuse the KV blocks of prompt prefixes already computed under the same adapter version "
        "(content-addressed blocks of the paged cache; server/engine/prefix_cache.py); off: every prompt is "
        "computed from scratch",
    )
    kv_cache_bytes: int | None = Field(
        None, ge=1, description="paged KV pool size in bytes (default: room for every row's max_seq_len)"
    )
    prefill_group_cost: int | None = Field(
        None,
        ge=0,
        description="padded token positions one more prefill forward is worth: a chunk of rows of unequal "
        "lengths runs as groups when that pads less (default: 32 on CPU, 2048 on CUDA; 0: a group per "
        "distinct length)",
    )
    decode_step: Literal["auto", "eager", "static", "graphs"] = Field(
        "auto",
        description=(
            "graphs: the static-shape decode step captured as CUDA graphs per batch bucket (CUDA, paged "
            "cache); static: the same step without capture; eager: the dynamic reference step; "
            "auto: graphs on CUDA with the paged cache, eager otherwise"
        ),
    )
    packed_steps: bool = Field(
        False,
        description="a step with both prefill chunks and decode rows runs them in one forward (each token a "
        "row; the weights read once), not one forward each (paged cache; steps with scoring rows keep two). "
        "With prefill workers the decoding rows ride in the workers' prefill forwards. Off by default: beside "
        "a load client on 2 CPUs it cut TTFT 4x and doubled inter-token latency at the same throughput "
        "(docs/performance.md)",
    )
    packed_chunk_tokens: int = Field(
        64,
        ge=1,
        description="packed steps: prompt tokens in a prefill forward while rows decode (at most "
        "max_prefill_tokens); the rows riding in it wait for the whole forward for their next token, so this "
        "bounds their inter-token latency",
    )
    max_decode_graphs: int = Field(
        64,
        ge=1,
        description="CUDA graphs of the decode step kept at most (one per row bucket x key-length bucket x "
        "adapter kinds present); beyond it the least recently used is dropped and recaptured when needed",
    )
    compile_decode: bool = Field(
        False, description="torch.compile the static decode step (decode_step='static' only)"
    )
    lora_backend: LoraBackendName = Field(
        "torch",
        description="kernels of the LoRA/DoRA/bottleneck math in mixed batches: torch (gather + bmm, any "
        "device) or triton (gathered BGMV kernels reading slot tensors in place; CUDA only)",
    )
    cpu: CpuSettings = Field(default_factory=CpuSettings, description="the CPU controls (docs/cpu.md)")


class CacheSettings(BaseModel):
    """Tiered adapter cache sizes (device slots are counted in EngineSettings.adapter_slots)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host_cache_bytes: int = Field(1 << 30, ge=0, description="parsed adapters kept in host RAM")
    max_adapter_bytes: int = Field(512 << 20, ge=1, description="one adapter's files, in bytes, at most")
    persist_every: int = Field(
        16,
        ge=0,
        description="in-place weight updates of an adapter between writes of its newest version to the "
        "store (a restart loses at most this many); 0: written only when an update asks for it",
    )


class SourceSettings(BaseModel):
    """Where adapters not in the store are fetched from on first use (server/store/sources/)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    uris: tuple[str, ...] = Field(
        (),
        description="adapter sources tried in order: s3://bucket/prefix, hf://org[@revision], "
        "https://host/path, file:///dir; a name N resolves to <source>/N/ (a PEFT folder)",
    )
    fetch_timeout_s: float = Field(
        30.0, gt=0, description="seconds a fetch may take; past it the request gets UNAVAILABLE (503)"
    )
    ttl_s: float | None = Field(
        None, gt=0, description="re-check a fetched adapter's source after this many seconds (default: never)"
    )
    negative_ttl_s: float = Field(
        10.0,
        ge=0,
        description="seconds a name found missing or invalid in the sources is refused without a fetch",
    )
    store_max_bytes: int | None = Field(
        None, ge=1, description="bytes of fetched adapters kept on disk, least recently used evicted first (default: no bound)"
    )

    @field_validator("uris", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        """One string (an environment variable) holds several URIs separated by commas or spaces."""
        if isinstance(value, str):
            return tuple(u for u in value.replace(",", " ").split() if u)
        return value


class LimitSettings(BaseModel):
    """Per-request and per-connection limits enforced by the API layer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_prompt_tokens: int = Field(768, ge=1, description="prompt tokens (after the chat template) at most")
    max_new_tokens: int = Field(256, ge=1, description="tokens one request may ask to generate at most")
    max_stop_sequences: int = Field(8, ge=0, description="stop sequences per request at most")
    max_n: int = Field(8, ge=1, le=128, description="choices (n) one request may ask for at most")
    max_batch_rows: int = Field(
        256,
        ge=1,
        description="rows (prompts x n choices) one request with a list of prompts may ask for at most",
    )
    max_batch_tokens: int = Field(
        65536, ge=1, description="prompt tokens of all the prompts of one request together at most"
    )
    max_logprobs: int = Field(
        20, ge=0, le=MAX_LOGPROBS, description="logprobs alternatives (top_logprobs) per token at most"
    )
    max_concurrent_streams: int = Field(
        256, ge=1, description="generation calls running at once; past it RESOURCE_EXHAUSTED"
    )
    max_upload_bytes: int = Field(512 << 20, ge=1, description="bytes one adapter upload may carry")
    max_message_bytes: int = Field(8 << 20, ge=1024, description="bytes of one gRPC message, either way")
    upload_chunk_bytes: int = Field(1 << 20, ge=1, description="largest chunk an upload message may carry")


class TlsSettings(BaseModel):
    """Server-side TLS for every listener: gRPC and the OpenAI-compatible HTTP API. Off when no cert is set."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cert_file: Path | None = Field(None, description="PEM certificate chain the server presents")
    key_file: Path | None = Field(None, description="PEM private key of that certificate")
    client_ca_file: Path | None = Field(
        None, description="PEM CA bundle; when set, clients must present a certificate it signed"
    )

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None

    @model_validator(mode="after")
    def _complete(self) -> TlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("tls: --tls-cert and --tls-key go together (give both or neither)")
        if self.client_ca_file is not None and self.cert_file is None:
            raise ValueError(
                "tls: --tls-client-ca needs --tls-cert and --tls-key (client certificates need TLS)"
            )
        return self


class ServerSettings(BaseModel):
    """Everything `adapterserve serve` needs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_model: str | None = Field(None, description="path or name; None = the embedded default model")
    quantize: Quantize | None = Field(None, description="None = nf4 on CUDA, none on CPU")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str | None = Field(None, description="None = cuda if available else cpu")
    store: Path = Field(Path("adapters-store"), description="adapter store directory")
    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)
    metrics_port: int = Field(9090, ge=0, le=65535)
    http_port: int | None = Field(
        None, ge=0, le=65535, description="OpenAI-compatible HTTP port; None = off (`serve` defaults to 8000)"
    )
    served_model_name: str | None = Field(
        None, min_length=1, description="the base model's name in HTTP `model`; None = from its path"
    )
    admin_token: str | None = Field(None, repr=False)
    generate_token: str | None = Field(None, repr=False)
    insecure_admin: bool = False
    grace_seconds: float = Field(10.0, ge=0)
    demo_adapters: bool = False
    engine: EngineSettings = Field(default_factory=EngineSettings)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    tls: TlsSettings = Field(default_factory=TlsSettings)
    sources: SourceSettings = Field(default_factory=SourceSettings)

    @model_validator(mode="after")
    def _prompt_fits(self) -> ServerSettings:
        if self.limits.max_prompt_tokens + self.limits.max_new_tokens > self.engine.max_seq_len:
            raise ValueError(
                "limits.max_prompt_tokens + limits.max_new_tokens must fit engine.max_seq_len "
                f"({self.limits.max_prompt_tokens} + {self.limits.max_new_tokens} > {self.engine.max_seq_len})"
            )
        return self

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> ServerSettings:
        """Settings from ADAPTERSERVE_* environment variables, then explicit overrides (flags) on top.

        Nested fields use a double underscore: ADAPTERSERVE_ENGINE__MAX_BATCH_SIZE=64,
        ADAPTERSERVE_ENGINE__CPU__THREADS=4.
        The admin token comes from ADAPTERSERVE_ADMIN_TOKEN, the generation token from
        ADAPTERSERVE_GENERATE_TOKEN.
        """
        env = os.environ if environ is None else environ
        data: dict[str, Any] = {}
        for key, value in env.items():
            if not key.startswith(ENV_PREFIX):
                continue
            path = key[len(ENV_PREFIX) :].lower().split("__")
            if len(path) == 1 and path[0] not in cls.model_fields:  # the client's (ADAPTERSERVE_TARGET, ...)
                continue  # a nested one of no section is refused below: a section renamed fails loudly
            node = data
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = value
        for key, value in overrides.items():
            if value is not None:
                _merge(data, key, value)
        return cls.model_validate(data)


def _merge(node: dict[str, Any], key: str, value: Any) -> None:
    """node[key] = value, a dict merged key by key into the one there: a flag of a nested section
    (engine.cpu) keeps the environment's values of that section's other fields."""
    if not isinstance(value, dict):
        node[key] = value
        return
    target = node.get(key)
    if not isinstance(target, dict):
        target = node[key] = {}
    for inner, inner_value in value.items():
        _merge(target, inner, inner_value)
