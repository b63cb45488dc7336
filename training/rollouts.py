"""GRPO's side of the server: rollouts sampled by an adapterserve server, weights pushed back in place.

`RolloutClient` talks gRPC to a running server (or to the in-process one of `local_server.py`):
- `sample(groups)`: one request per distinct prompt, sent by token ids with `n` choices (one prefill
  shared by the group) and each token's log-probability at the sampling temperature
  (log_softmax(logits / temperature): the distribution the token was drawn from, what TRL's trainer
  computes on its side); the requests go in one GenerateBatch call (more when the server's batch limits
  ask for it), so the engine queues the step's prompts together and serves them in its continuous batch
  beside whatever else it runs, under one version of the adapter;
- `push(tensors)`: the adapter's state dict through UpdateAdapter (a new version; the next rollouts use
  it, requests in flight finish on theirs);
- `upload(folder)`: the initial adapter, before the first rollout.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterserve.training.errors import TrainingError

ADMIN_TOKEN_ENV = "ADAPTERSERVE_ADMIN_TOKEN"


@dataclass(frozen=True)
class RolloutSampling:
    """How rollouts are sampled (the engine's own sampler, per row)."""

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None  # set: request k's choice i samples with seed + (choices before it) + i
    ignore_eos: bool = False  # every completion max_new_tokens long (benchmarks)


@dataclass(frozen=True)
class Completion:
    """One sampled completion: its token ids (EOS included when it ended it) and each one's logprob."""

    token_ids: list[int]
    logprobs: list[float]
    adapter_version: int


@dataclass
class RolloutStats:
    """What the rollouts and pushes cost (seconds, tokens), for the run's report."""

    rollout_seconds: float = 0.0
    completion_tokens: int = 0
    completions: int = 0
    push_seconds: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.rollout_seconds if self.rollout_seconds else 0.0


class RolloutClient:
    """Rollouts and in-place weight pushes for one adapter on one server (see the module doc)."""

    def __init__(
        self,
        target: str,
        adapter: str,
        sampling: RolloutSampling,
        *,
        admin_token: str | None = None,
        parallel: int = 32,
        timeout: float = 600.0,
    ) -> None:
        import grpc

        from adapterserve import Client
        from adapterserve.v1 import generation_pb2_grpc

        self.target, self.adapter, self.sampling = target, adapter, sampling
        self.timeout = timeout
        token = admin_token if admin_token is not None else os.environ.get(ADMIN_TOKEN_ENV)
        self.admin = Client(target, admin_token=token, timeout=timeout)
        self._channel = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 64 << 20)])
        self._generation = generation_pb2_grpc.GenerationStub(self._channel)
        self._pool = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="rollout")
        self.stats = RolloutStats()
        self._drawn = 0  # choices sampled so far (seeded sampling: each one gets its own seed)
        self._limits: tuple[int, int] | None = None  # the server's GenerateBatch limits, once asked

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._channel.close()
        self.admin.close()

    def __enter__(self) -> RolloutClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ rollouts
    def sample(
        self,
        groups: Sequence[tuple[Sequence[int], int]],
        *,
        adapter: str | None = None,
        sampling: RolloutSampling | None = None,
    ) -> list[list[Completion]]:
        """For each (prompt ids, n): n completions of that prompt. `adapter` defaults to this client's
        ("" samples the base model). The groups go in as few GenerateBatch calls as the server's batch
        limits allow, sent at once, so the engine queues them together."""
        name = self.adapter if adapter is None else adapter
        how = sampling or self.sampling
        start = time.perf_counter()
        requests = []
        for ids, n in groups:
            seed = None if how.seed is None else how.seed + self._drawn
            self._drawn += n
            requests.append(self._request(list(ids), n, name, how, seed))
        rows, tokens = self._batch_limits()
        chunks = batches([(len(r.prompt_ids.ids), r.n) for r in requests], rows, tokens)
        futures = [self._pool.submit(self._call, [requests[i] for i in chunk]) for chunk in chunks]
        out = [group for future in futures for group in future.result()]
        self.stats.rollout_seconds += time.perf_counter() - start
        for group in out:
            self.stats.completions += len(group)
            self.stats.completion_tokens += sum(len(c.token_ids) for c in group)
        return out

    def _batch_limits(self) -> tuple[int, int]:
        """The server's rows and prompt tokens per GenerateBatch (0, 0: it has no GenerateBatch)."""
        if self._limits is None:
            limits = self.admin.server_info().limits
            self._limits = (limits.max_batch_rows, limits.max_batch_tokens)
        return self._limits

    @staticmethod
    def _request(ids: list[int], n: int, adapter: str, how: RolloutSampling, seed: int | None) -> Any:
        from adapterserve.v1 import generation_pb2

        return generation_pb2.GenerateRequest(
            adapter=adapter,
            prompt_ids=generation_pb2.TokenIds(ids=ids),
            n=n,
            sampling=generation_pb2.SamplingParams(
                max_new_tokens=how.max_new_tokens,
                temperature=how.temperature,
                top_p=how.top_p,
                top_k=how.top_k,
                logprobs=0,
                logprobs_at_temperature=True,
                seed=seed,
                ignore_eos=how.ignore_eos,
            ),
        )

    def _call(self, requests: list[Any]) -> list[list[Completion]]:
        """One GenerateBatch (or Generate, for a lone request on a server without batches)."""
        import grpc

        from adapterserve.v1 import generation_pb2

        try:
            if self._batch_limits()[0]:
                batch = generation_pb2.GenerateBatchRequest(requests=requests)
                replies = list(self._generation.GenerateBatch(batch, timeout=self.timeout).responses)
            else:
                replies = [self._generation.Generate(r, timeout=self.timeout) for r in requests]
        except grpc.RpcError as err:
            raise TrainingError(
                f"rollout on {self.target} failed: {err.code().name}: {err.details()}"
            ) from None
        return [self._completions(reply) for reply in replies]

    def _completions(self, reply: Any) -> list[Completion]:
        choices = list(reply.choices) or [reply]
        out = [
            Completion(
                token_ids=list(c.token_ids),
                logprobs=[e.logprob for e in c.logprobs],
                adapter_version=reply.adapter_version,
            )
            for c in choices
        ]
        for c in out:
            if len(c.logprobs) != len(c.token_ids):
                raise TrainingError(
                    f"{self.target} returned {len(c.logprobs)} logprobs for {len(c.token_ids)} tokens"
                )
        return out

    # ------------------------------------------------------------------ weights
    def upload(self, folder: Path) -> int:
        """Store the initial adapter under this client's name (replacing one of that name); its version."""
        return self.admin.upload_adapter(str(folder), self.adapter, overwrite=True).adapter.version

    def push(self, tensors: Mapping[str, Any], *, persist: bool = False) -> int:
        """Replace the served adapter's weights in place; returns the new version."""
        start = time.perf_counter()
        result = self.admin.update_adapter(self.adapter, tensors, persist=persist)
        self.stats.push_seconds.append(time.perf_counter() - start)
        self.stats.versions.append(result.version)
        return result.version


def batches(sizes: Sequence[tuple[int, int]], max_rows: int, max_tokens: int) -> list[list[int]]:
    """Consecutive runs of requests, given as (prompt tokens, n), that keep to a GenerateBatch's rows
    (the sum of n) and prompt tokens; each run as the requests' indices. max_rows 0: one request each
    (a server without GenerateBatch). A request over a limit on its own gets a run of its own."""
    runs: list[list[int]] = []
    rows = tokens = 0
    for i, (prompt_tokens, n) in enumerate(sizes):
        if runs and max_rows and rows + n <= max_rows and tokens + prompt_tokens <= max_tokens:
            runs[-1].append(i)
            rows, tokens = rows + n, tokens + prompt_tokens
        else:
            runs.append([i])
            rows, tokens = n, prompt_tokens
    return runs
