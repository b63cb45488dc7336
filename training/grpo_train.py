"""One `--stage grpo` run end to end: the rollout server, the initial adapter, GRPO, the final version.

1. Connect to `--rollout-server` (or start a server inside this process: local_server.py).
2. Make the trainable adapter (LoRA, DoRA or IA3: an identity at start) and upload it under its name.
3. Score the base on the held-out prompts (`--eval`): greedy, through the server, mean summed reward.
4. Train (grpo.py): every rollout sampled by the server, the weights pushed in place before each rollout
   that follows an optimizer step, TRL's importance-sampling correction on the server's logprobs.
5. Push the final weights once more with `persist`, so the server stores and serves that version under
   the adapter's name; check it serves it; score it on the held-out prompts.
6. Save the adapter to `--out` with the usual manifest (and its `grpo` report).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path
from typing import Any

from adapterserve.training.grpo import (
    adapter_state,
    check_served,
    grpo_report,
    mean_reward,
    read_prompts,
    run_grpo,
)
from adapterserve.training.local_server import LocalServer
from adapterserve.training.loop import planned_steps
from adapterserve.training.memory import PeakMemoryMeter
from adapterserve.training.methods import count_parameters, prepare_trainable_model
from adapterserve.training.output import (
    TrainManifest,
    check_out_dir,
    save_adapter,
    write_manifest,
)
from adapterserve.training.rewards import load_rewards
from adapterserve.training.rollouts import RolloutClient, RolloutSampling
from adapterserve.training.settings import TrainSettings

log = logging.getLogger(__name__)


def train_grpo(
    settings: TrainSettings,
    train_file: str | Path,
    out_dir: str | Path,
    *,
    eval_file: str | Path | None = None,
    base: Any | None = None,
    overwrite: bool = False,
) -> Any:
    """Run GRPO as the module doc says; returns a train.TrainResult."""
    from transformers import set_seed

    from adapterserve.training.train import TrainResult, load_base_for, manifest_fields

    out = Path(out_dir)
    check_out_dir(out, overwrite)
    rewards = load_rewards(settings.reward)
    records = read_prompts(train_file)
    held_out = read_prompts(eval_file, settings.eval_limit) if eval_file is not None else None
    if base is None:
        base = load_base_for(settings)
    tokenizer = base.tokenizer
    name = settings.adapter_name or out.name
    steps = planned_steps(settings, len(records) * settings.num_generations)
    set_seed(settings.seed)
    model = prepare_trainable_model(
        base.model, settings, total_steps=steps, base_path=getattr(base.model.config, "_name_or_path", None)
    )
    params = count_parameters(model)
    sampling = RolloutSampling(
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        seed=settings.seed * 1_000_003,  # reproducible rollouts: each choice has its own seed
    )
    with contextlib.ExitStack() as stack:
        target = settings.rollout_server
        if target is None:
            target = stack.enter_context(
                LocalServer(
                    settings.base_model,
                    settings.device,
                    max_new_tokens=settings.max_new_tokens,
                    max_n=max(16, settings.num_generations),
                )
            )
        client = stack.enter_context(RolloutClient(target, name, sampling))
        with tempfile.TemporaryDirectory(prefix="adapterserve-grpo-init-") as scratch:
            first = client.upload(save_adapter(model, Path(scratch) / name, base_label=base.source))
        log.info("serving the initial adapter %r (version %d) on %s", name, first, target)

        def score(adapter: str) -> float | None:
            if held_out is None:
                return None
            return mean_reward(
                client, tokenizer, held_out, rewards, adapter=adapter, max_new_tokens=settings.max_new_tokens
            )

        eval_base = score("")
        if eval_base is not None:
            log.info("held-out reward of the base: %.4f", eval_base)
        with PeakMemoryMeter(base.device) as meter:
            model, loop, history = run_grpo(
                model,
                records,
                rewards,
                settings,
                tokenizer=tokenizer,
                device=base.device,
                client=client,
                steps=steps,
            )
        final = client.push(adapter_state(model), persist=True)
        check_served(client, final)
        eval_adapter = score(name)
        if eval_adapter is not None:
            log.info("held-out reward of %r version %d: %.4f", name, final, eval_adapter)
        report = grpo_report(
            client,
            history,
            settings,
            target=settings.rollout_server or "in-process",
            adapter=name,
            final_version=final,
            eval_base=eval_base,
            eval_adapter=eval_adapter,
        )
    peak = meter.result
    save_adapter(model, out, base_label=base.source)
    manifest = TrainManifest(
        format="peft-adapter",
        **manifest_fields(settings, base, params, out, train_file, eval_file, len(records), loop),
        peak_memory_bytes=peak.bytes if peak else None,
        peak_memory_measure=peak.measure if peak else None,
        grpo=report,
    )
    path = write_manifest(manifest, out)
    log.info("wrote %s and %s", out, path)
    return TrainResult(
        out_dir=out,
        manifest_path=path,
        manifest=manifest,
        loop=loop,
        params=params,
        model=model,
        eval_base=None,
        eval_adapter=None,
    )
