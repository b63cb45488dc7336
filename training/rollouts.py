"""GRPO's side of the server: rollouts sampled by an adapterserve server, weights pushed back in place.

`RolloutClient` talks gRPC to a running server (or to the in-process one of `local_server.py`):
- `sample(groups)`: one Generate request per distinct prompt, sent by token ids with `n` choices (one
  prefill shared by the group) and each token's log-probability at the sampling temperature
  (log_softmax(logits / temperature): the distribution the token was drawn from, what TRL's trainer
  computes on its side), all prompts at once, so the engine serves them in its continuous batch beside
  whatever else it runs;
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
        """For each (prompt ids, n): n completions of that prompt, all groups served concurrently.
        `adapter` defaults to this client's ("" samples the base model)."""
        name = self.adapter if adapter is None else adapter
        how = sampling or self.sampling
        start = time.perf_counter()
        futures = []
        for ids, n in groups:
            seed = None if how.seed is None else how.seed + self._drawn
            self._drawn += n
            futures.append(self._pool.submit(self._one, list(ids), n, name, how, seed))
        out = [f.result() for f in futures]
        self.stats.rollout_seconds += time.perf_counter() - start
        for group in out:
            self.stats.completions += len(group)
            self.stats.completion_tokens += sum(len(c.token_ids) for c in group)
        return out

    def _one(
        self, ids: list[int], n: int, adapter: str, how: RolloutSampling, seed: int | None
    ) -> list[Completion]:
        import grpc

        from adapterserve.v1 import generation_pb2

        request = generation_pb2.GenerateRequest(
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
        try:
            reply = self._generation.Generate(request, timeout=self.timeout)
        except grpc.RpcError as err:
            raise TrainingError(
                f"rollout on {self.target} failed: {err.code().name}: {err.details()}"
            ) from None
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
