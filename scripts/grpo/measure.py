"""GRPO against the server, measured in one process on one machine (printed as a table).

    python scripts/grpo/measure.py [--prompts 8] [--n 4] [--new-tokens 32] [--repeats 3] [--updates 30]

1. rollouts: the same prompts and n, sampled (a) by a server in this process through the rollout client
   (`adapterserve train --stage grpo`'s path) and (b) by TRL's own generation (GRPOTrainer without a
   rollout_func: transformers' generate on the PeftModel); completions forced to --new-tokens tokens
   (ignore_eos / min_new_tokens) so both produce the same token count; interleaved, median of --repeats;
2. update visibility: an r=8 LoRA on q_proj,v_proj pushed in place, then a one-token request: the push's
   round trip (p50) and push + that request (p50), and whether every request saw the version just pushed;
3. two jobs: rollouts of two adapters from two threads at once vs one adapter alone (tokens/s).
Base: the embedded SmolLM2-135M-Instruct (or --base-model), fp32 on the CPU.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

PROMPT = "Write a short sentence about the number {i}."


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base-model", default=None)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--updates", type=int, default=30)
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapterserve.server.model.default_model import default_model_dir
    from adapterserve.training.grpo import prompt_ids
    from adapterserve.training.local_server import LocalServer
    from adapterserve.training.output import save_adapter
    from adapterserve.training.rollouts import RolloutClient, RolloutSampling

    base_dir = args.base_model or str(default_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    prompts = [[{"role": "user", "content": PROMPT.format(i=i)}] for i in range(args.prompts)]
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    sampling = RolloutSampling(max_new_tokens=args.new_tokens, temperature=1.0, seed=0, ignore_eos=True)
    tokens = args.prompts * args.n * args.new_tokens

    trainer = trl_trainer(peft_model, tokenizer, args)
    repeated = [i for i in ids for _ in range(args.n)]

    with LocalServer(args.base_model, "cpu") as target, tempfile.TemporaryDirectory() as scratch:
        jobs = [RolloutClient(target, f"job{k}", sampling) for k in range(2)]
        for job in jobs:
            job.upload(save_adapter(peft_model, Path(scratch) / job.adapter))
        groups = [(i, args.n) for i in ids]
        jobs[0].sample(groups)  # warm both paths at full size
        trainer._generate_single_turn(repeated, None, {}, args.n)

        server_s, trl_s = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            got = jobs[0].sample(groups)
            server_s.append(time.perf_counter() - start)
            assert sum(len(c.token_ids) for g in got for c in g) == tokens
            start = time.perf_counter()
            completions, _ = trainer._generate_single_turn(repeated, None, {}, args.n)
            trl_s.append(time.perf_counter() - start)
            assert sum(len(c) for c in completions) == tokens, sum(len(c) for c in completions)
        server, trl = statistics.median(server_s), statistics.median(trl_s)
        print(f"rollouts, {args.prompts} prompts x n={args.n} x {args.new_tokens} tokens ({tokens} tokens):")
        print(f"  server (rollout client, in-process server): {tokens / server:8.1f} tok/s  {server_s}")
        print(f"  TRL's own generation (transformers):        {tokens / trl:8.1f} tok/s  {trl_s}")
        print(f"  ratio: {trl / server:.2f}x")

        state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}
        push_s, visible_s, stale = [], [], 0
        for k in range(args.updates):
            update = {name: t + 0.001 * (k + 1) for name, t in state.items()}
            start = time.perf_counter()
            version = jobs[0].push(update)
            pushed = time.perf_counter()
            reply = jobs[0].sample([(ids[0], 1)], sampling=RolloutSampling(max_new_tokens=1, temperature=0.0))
            done = time.perf_counter()
            push_s.append(pushed - start)
            visible_s.append(done - start)
            stale += reply[0][0].adapter_version != version
        print(f"in-place update of an r=8 LoRA (q_proj, v_proj), {args.updates} times:")
        print(
            f"  push round trip p50 {1000 * statistics.median(push_s):.1f} ms; push + a 1-token request p50 "
            f"{1000 * statistics.median(visible_s):.1f} ms; requests that missed the pushed version: {stale}"
        )

        def run(job: RolloutClient, out: list[float]) -> None:
            start = time.perf_counter()
            for _ in range(args.repeats):
                job.sample(groups)
            out.append(time.perf_counter() - start)

        one: list[float] = []
        run(jobs[0], one)
        two: list[float] = []
        threads = [threading.Thread(target=run, args=(job, two)) for job in jobs]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        both = time.perf_counter() - start
        one_tps = args.repeats * tokens / one[0]
        two_tps = 2 * args.repeats * tokens / both
        print(
            f"rollout throughput: one job {one_tps:.1f} tok/s, two jobs at once {two_tps:.1f} tok/s "
            f"({two_tps / one_tps:.2f}x)"
        )
        for job in jobs:
            job.close()


def trl_trainer(model, tokenizer, args):
    """A GRPOTrainer on `model` whose own generation (no rollout_func) is measured."""
    import trl
    from datasets import Dataset

    config = trl.GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="grpo-measure-"),
        per_device_train_batch_size=args.n,
        num_generations=args.n,
        max_completion_length=args.new_tokens,
        temperature=1.0,
        generation_kwargs={"min_new_tokens": args.new_tokens},
        report_to="none",
        use_cpu=True,
    )
    return trl.GRPOTrainer(
        model=model,
        reward_funcs=[lambda prompts, completions, **kw: [0.0] * len(completions)],
        args=config,
        train_dataset=Dataset.from_list([{"prompt": "x"}] * args.n),
        processing_class=tokenizer,
    )


if __name__ == "__main__":
    main()
