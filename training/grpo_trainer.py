"""TRL's GRPOTrainer with its importance-sampling correction and weight-sync hook on a server's rollouts.

TRL 1.16 has everything `--stage grpo` needs, gated on `use_vllm`: with it, and a `rollout_func`,
`_generate` calls `vllm_generation.sync_weights()` before a rollout whenever an optimizer step has passed,
and `_generate_and_score_completions` recomputes the old per-token logprobs with the training model, takes
the ratio exp(trainer - sampling) against the logprobs the `rollout_func` returned, truncates or masks it
(`vllm_importance_sampling_mode`, `_clip_min`, `_clip_max`), logs `sampling/importance_sampling_ratio/*`
and `sampling/sampling_logp_difference/*`, and `_compute_loss` multiplies the per-token loss by it.
`use_vllm` in GRPOConfig would also start a vLLM engine, so this subclass leaves it off there and turns
the trainer's own flag on after TRL's `__init__`: generation stays with the `rollout_func` (TRL takes
that branch before any vLLM one), and `vllm_generation` is a `WeightSync` (grpo.py's `AdapterPush`) that
pushes the adapter's weights into the server. Whether the correction runs is GRPOConfig's
`vllm_importance_sampling_correction`, as in TRL.
"""

from __future__ import annotations

from typing import Any, Protocol

import trl


class WeightSync(Protocol):
    """What TRL calls before a rollout once the weights changed (`vllm_generation.sync_weights()`)."""

    def sync_weights(self) -> None: ...


class ServerRolloutTrainer(trl.GRPOTrainer):
    """GRPOTrainer whose rollouts come from `rollout_func` and whose weights `sync` pushes (module doc)."""

    def __init__(self, *args: Any, sync: WeightSync, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.rollout_func is None:
            raise ValueError("ServerRolloutTrainer needs a rollout_func (it never generates itself)")
        self.use_vllm = True  # TRL's gate for the correction and the sync hook (module doc)
        self.vllm_mode = "server"  # no colocated engine to ask for its context length
        self.vllm_generation = sync
        self._last_loaded_step = 0  # the server already holds the step-0 weights (uploaded before)
