"""The soaks: generation calls from 32 concurrent clients over 104 adapters of every kind, while another
client uploads, replaces and deletes adapters. `test_soak` makes 2,016 calls with one prompt;
`test_soak_prompt_lengths` 5,024 calls whose prompts take every length from 1 to 32 tokens.

Every call must end in a completion or a documented refusal (NOT_FOUND only for the adapters being
deleted and re-uploaded, RESOURCE_EXHAUSTED for a full queue); once idle, the server's memory must be
within 10% of its level after a warm-up of the same work (no leak across adapter churn, no cache that
grows with prompt lengths); the metrics' counters must equal what the clients saw. The figures are
printed (pytest -s) for the report.
"""

from __future__ import annotations

import collections
import random
import threading
import time
from dataclasses import dataclass, field

import grpc
import pytest

from adapterserve import Client
from adapterserve.retry import RetryPolicy
from adapterserve.server.cpu.idle_memory import IDLE_TRIM_S
from adapterserve.v1 import generation_pb2, generation_pb2_grpc
from tests.helpers.server_process import start_server
from tests.reliability.conftest import (
    ADMIN_TOKEN,
    PEFT_KINDS,
    metric_sum,
    rss_bytes,
    scrape,
    wait_until,
)

pytestmark = pytest.mark.timeout(600)

CLIENTS = 32
CALLS_PER_CLIENT = 63  # 32 x 63 = 2,016 calls
LONG_CALLS_PER_CLIENT = 157  # 32 x 157 = 5,024 calls
WARMUP_CALLS_PER_CLIENT = 12
STABLE_PER_KIND = 13  # 8 kinds x 13 = 104 adapters
CHURN_NAMES = tuple(f"churn-{i}" for i in range(6))
NEW_TOKENS = 6
MAX_QUEUE = 8
BIG_RANK = 256  # the churned LoRA: rank 256 on every linear, ~2 MiB per version
BACKOFF_S = 0.15  # a refused client waits this long before its next call
SOAK_FLAGS = (
    "--max-batch-size",
    "16",
    "--max-queue",
    str(MAX_QUEUE),  # 32 clients > 16 rows + 8 waiting: some calls must be refused, at once
    "--adapter-slots",
    "12",  # fewer slots than adapters: device slots are evicted and reloaded all the time
    "--host-cache-bytes",
    str(6 << 20),  # the host cache evicts too
    "--max-new-tokens",
    str(NEW_TOKENS),
    "--max-prompt-tokens",
    "32",
    "--max-seq-len",
    "64",
    "--max-lora-rank",
    str(BIG_RANK),
    "--grace",
    "30",
)
ALLOWED_STABLE = {"OK", "RESOURCE_EXHAUSTED"}
ALLOWED_CHURN = {"OK", "RESOURCE_EXHAUSTED", "NOT_FOUND"}
QUEUE_FULL = "the waiting queue is full"
# Memory after the soak (idle) may exceed the post-warm-up level (idle) by at most this factor. Before
# the fixes it grew by 28% with prompts of many lengths (oneDNN kept a primitive per shape, see
# cpu/linear.py) and by ~6% more in freed pages the allocator kept (cpu/idle_memory.py).
# Keeping the churned versions alive would cost ~2 MiB per upload; the soak makes at least
# MIN_BIG_UPLOADS of them (80 MiB, above 10% of the ~650 MiB the server holds).
RSS_RATIO = 1.10
MIN_BIG_UPLOADS = 40
PROMPT_CHARS = "~^|QXZjqz@!"  # one token each for the tiny tokenizer (none merge)


def kind_name(kind: str) -> str:
    return kind.lower().replace("_", "-")


STABLE = tuple(f"s-{kind_name(k)}-{i:02d}" for k in PEFT_KINDS for i in range(STABLE_PER_KIND))


@dataclass
class Tally:
    """What the clients saw."""

    calls: collections.Counter = field(default_factory=collections.Counter)  # (method, status) -> n
    tokens: int = 0
    problems: list[str] = field(default_factory=list)
    refusal_s: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, method: str, status: str, tokens: int = 0, problem: str | None = None) -> None:
        with self.lock:
            self.calls[(method, status)] += 1
            self.tokens += tokens
            if problem:
                self.problems.append(problem)

    def by_status(self) -> collections.Counter:
        out: collections.Counter = collections.Counter()
        for (_, status), n in self.calls.items():
            out[status] += n
        return out


def fixed_prompt(rng: random.Random) -> str:
    return "The capital of France is"


def prompt_of_any_length(rng: random.Random) -> str:
    """A prompt of 1 to 32 tokens (the soak's --max-prompt-tokens), each length as likely."""
    return "".join(rng.choice(PROMPT_CHARS) for _ in range(rng.randint(1, 32)))


def one_call(stub, adapter: str, stream: bool, tally: Tally, prompt: str) -> str:
    """Make one call, record what came back in `tally`, return the status code name."""
    request = generation_pb2.GenerateRequest(
        prompt=prompt,
        adapter=adapter,
        sampling=generation_pb2.SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True),
    )
    method = "GenerateStream" if stream else "Generate"
    allowed = ALLOWED_CHURN if adapter in CHURN_NAMES else ALLOWED_STABLE
    started = time.monotonic()
    try:
        if stream:
            tokens, finish = 0, 0
            for message in stub.GenerateStream(request, timeout=120):
                tokens += len(message.token_ids)
                finish = message.finish_reason or finish
        else:
            reply = stub.Generate(request, timeout=120)
            tokens, finish = len(reply.token_ids), reply.finish_reason
    except grpc.RpcError as err:
        code, message = err.code().name, err.details() or ""
        problem = None if code in allowed else f"{method} {adapter!r}: {code} {message}"
        if code == "RESOURCE_EXHAUSTED":
            if QUEUE_FULL not in message:
                problem = f"{method} {adapter!r}: RESOURCE_EXHAUSTED not for a full queue: {message}"
            with tally.lock:
                tally.refusal_s.append(time.monotonic() - started)
        tally.add(method, code, problem=problem)
        return code
    complete = tokens == NEW_TOKENS and finish == generation_pb2.FINISH_REASON_LENGTH
    tally.add(
        method, "OK", tokens, None if complete else f"{method} {adapter!r}: {tokens} tokens, finish {finish}"
    )


def run_clients(target: str, per_client: int, tally: Tally, seed: int, prompt_for=fixed_prompt) -> None:
    def client(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        with grpc.insecure_channel(target) as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            for _ in range(per_client):
                roll = rng.random()
                adapter = rng.choice(CHURN_NAMES) if roll < 0.1 else "" if roll < 0.15 else rng.choice(STABLE)
                stream, prompt = rng.random() < 0.3, prompt_for(rng)
                if one_call(stub, adapter, stream, tally, prompt) == "RESOURCE_EXHAUSTED":
                    time.sleep(BACKOFF_S)  # what the SDK's retry policy does, shortened

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(400)
        assert not t.is_alive(), "a client never finished"


class Churner:
    """Uploads, replaces and deletes adapters until stopped; counts each operation's outcome."""

    def __init__(self, target: str, dirs: dict[str, object], big_lora) -> None:
        self.target, self.dirs, self.big_lora = target, dirs, big_lora
        self.results: collections.Counter = collections.Counter()  # (op, status) -> n
        self.stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Churner:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self._thread.join(120)
        assert not self._thread.is_alive()

    def _run(self) -> None:
        rng = random.Random(7)
        with Client(self.target, admin_token=ADMIN_TOKEN, retry=RetryPolicy(max_attempts=1), timeout=60) as c:
            while not self.stop.is_set():
                roll = rng.random()
                if roll < 0.4:
                    op, call = (
                        "upload",
                        lambda: c.upload_adapter(self.big_lora, rng.choice(CHURN_NAMES), overwrite=True),
                    )
                elif roll < 0.7:
                    op, call = "delete", lambda: c.delete_adapter(rng.choice(CHURN_NAMES))
                else:
                    kind = rng.choice(PEFT_KINDS)
                    name = f"s-{kind_name(kind)}-{rng.randrange(STABLE_PER_KIND):02d}"
                    op, call = (
                        "replace",
                        lambda kind=kind, name=name: c.upload_adapter(self.dirs[kind], name, overwrite=True),
                    )
                try:
                    call()
                    self.results[(op, "OK")] += 1
                except Exception as err:  # AdapterServeError: counted by code
                    self.results[(op, getattr(err, "code", type(err).__name__))] += 1
                time.sleep(0.01)

    def uploads_by_status(self) -> collections.Counter:
        out: collections.Counter = collections.Counter()
        for (op, status), n in self.results.items():
            if op in ("upload", "replace"):
                out[status] += n
        return out


def requests_by_status(families) -> collections.Counter:
    out: collections.Counter = collections.Counter()
    for samples in families.values():
        for s in samples:
            if s.name == "adapterserve_requests_total" and s.labels.get("method") in (
                "Generate",
                "GenerateStream",
            ):
                out[s.labels["status"]] += int(s.value)
    return out


def uploads_by_status(families) -> collections.Counter:
    out: collections.Counter = collections.Counter()
    for samples in families.values():
        for s in samples:
            if s.name == "adapterserve_uploads_total":
                out[s.labels["status"]] += int(s.value)
    return out


def diff(after: collections.Counter, before: collections.Counter) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after if after[k] - before[k]}


@pytest.fixture(scope="module")
def big_lora(tiny_base, tmp_path_factory):
    """A LoRA of rank 256 on every linear (~2 MiB), so a leak of churned versions would show in RSS."""
    from tests.helpers.peft_adapters import write_lora_dir

    modules = tuple(tiny_base.spec.linear_shapes)
    return write_lora_dir(
        tmp_path_factory.mktemp("big-lora") / "big", tiny_base.spec, r=BIG_RANK, modules=modules
    )


def idle_rss(server) -> int:
    """The server's resident memory once no request runs and the engine has been idle long enough to
    hand freed memory back (cpu/idle_memory.py)."""
    wait_until(lambda: metric_sum(scrape(server), "adapterserve_running_requests") == 0, timeout=30)
    time.sleep(IDLE_TRIM_S + 1.0)  # the engine looks every 0.5 s
    return rss_bytes(server.proc.pid)


def soak(tiny_model_dir, tmp_path, kind_dirs, big_lora, calls_per_client: int, prompt_for) -> None:
    """Upload the stable adapters, warm up, soak with churn, and check calls, metrics and memory."""
    server = start_server(
        tiny_model_dir,
        tmp_path / "store",
        extra_args=SOAK_FLAGS,
        env={"ADAPTERSERVE_ADMIN_TOKEN": ADMIN_TOKEN},
    )
    try:
        with Client(server.target, admin_token=ADMIN_TOKEN, timeout=60) as client:
            for name in STABLE:
                kind = next(k for k in PEFT_KINDS if name.startswith(f"s-{kind_name(k)}-"))
                client.upload_adapter(kind_dirs[kind], name)
            assert len(client.list_adapters()) == len(STABLE)

        # Warm-up: the same mix of work, so caches, pools and allocators reach their steady size.
        warm = Tally()
        with Churner(server.target, kind_dirs, big_lora):
            run_clients(server.target, WARMUP_CALLS_PER_CLIENT, warm, seed=1, prompt_for=prompt_for)
        assert warm.problems == []
        rss_warm = idle_rss(server)
        before = scrape(server)

        tally = Tally()
        started = time.monotonic()
        with Churner(server.target, kind_dirs, big_lora) as churner:
            run_clients(server.target, calls_per_client, tally, seed=2, prompt_for=prompt_for)
        elapsed = time.monotonic() - started
        rss_after = idle_rss(server)
        after = scrape(server)

        seen = tally.by_status()
        total = sum(seen.values())
        print(
            f"\nsoak: {total} calls from {CLIENTS} clients in {elapsed:.1f} s: {dict(seen)}; "
            f"churn {dict(churner.results)}; tokens {tally.tokens}; "
            f"queue-full refusals answered in at most {max(tally.refusal_s, default=0):.3f} s; "
            f"RSS (idle) after warm-up {rss_warm / 2**20:.1f} MiB, after the soak {rss_after / 2**20:.1f} MiB "
            f"(x{rss_after / rss_warm:.3f})"
        )
        assert total == CLIENTS * calls_per_client
        assert tally.problems == [], tally.problems[:20]
        # Most calls do work: 32 clients on 16 rows + 8 queued, refused ones back off for BACKOFF_S; on a
        # loaded 2-core machine 44-49% of the calls completed (the rest: immediate queue-full refusals).
        assert seen["OK"] > total // 3
        assert churner.results[("upload", "OK")] >= MIN_BIG_UPLOADS
        assert churner.results[("replace", "OK")] >= 10 and churner.results[("delete", "OK")] >= 5
        # The metrics' counters equal what the clients saw.
        assert diff(requests_by_status(after), requests_by_status(before)) == {
            k: v for k, v in seen.items() if v
        }
        generated = metric_sum(after, "adapterserve_generated_tokens_total") - metric_sum(
            before, "adapterserve_generated_tokens_total"
        )
        assert generated == tally.tokens == seen["OK"] * NEW_TOKENS
        assert diff(uploads_by_status(after), uploads_by_status(before)) == {
            k: v for k, v in churner.uploads_by_status().items() if v
        }
        # Nothing lost: every stable adapter is still served, and generates.
        with Client(server.target, admin_token=ADMIN_TOKEN, timeout=60) as client:
            names = {a.name for a in client.list_adapters()}
            assert set(STABLE) <= names and names <= set(STABLE) | set(CHURN_NAMES)
            for name in STABLE[::STABLE_PER_KIND]:
                assert client.generate("hello", adapter=name, max_new_tokens=2).generated_tokens == 2
        # Memory came back to its post-warm-up level.
        assert rss_after <= RSS_RATIO * rss_warm, (rss_warm, rss_after)
        assert metric_sum(after, "adapterserve_adapter_cache_bytes", tier="host") <= 6 << 20
    finally:
        assert server.stop() == 0, server.log_text()[-3000:]


def test_soak(tiny_model_dir, tmp_path, kind_dirs, big_lora):
    """2,016 calls, one prompt."""
    soak(tiny_model_dir, tmp_path, kind_dirs, big_lora, CALLS_PER_CLIENT, fixed_prompt)


def test_soak_prompt_lengths(tiny_model_dir, tmp_path, kind_dirs, big_lora):
    """5,024 calls whose prompts take every length from 1 to 32 tokens (every prefill shape)."""
    soak(tiny_model_dir, tmp_path, kind_dirs, big_lora, LONG_CALLS_PER_CLIENT, prompt_of_any_length)
