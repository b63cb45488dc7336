"""What per-kind row subsets (a kind's hooks on its own rows only; server/adapters/layers.py) buy in a
mix of kinds: the same requests with subsets on and off, and on the base and on LoRAs alone for the
ratios, in one process on the embedded SmolLM2, interleaved rounds so that a shared machine's noise hits
every workload alike.

Each round runs `--rows` requests of `--prompt` tokens (the AIPerf shape: 128-token prompts, 32 new
tokens, ignore_eos) in continuous batching with the engine's default prefill budget, on one CPU thread
(the thread count a server keeps beside a load client).

    python scripts/ab/kind_subsets.py [--rounds 3] [--rows 16] [--adapters 16] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from adapterserve.bench.throughput import BenchSettings, make_adapters
from adapterserve.server.adapters import layers
from adapterserve.server.engine import core
from adapterserve.server.engine.offline import OfflineEngine
from adapterserve.server.model.loading import load_base_model, resolve_source
from adapterserve.server.settings import EngineSettings


def whole_rows(*args):
    """build_batch without subsets: every kind's hooks over every row (the code before subsets)."""
    batch = layers.build_batch(*args)
    batch.subsets.clear()
    return batch


def run(engine: OfflineEngine, prompts, adapters, new: int) -> float:
    requests = [
        engine.request(p, adapter=a, max_new_tokens=new, ignore_eos=True)
        for p, a in zip(prompts, adapters, strict=True)
    ]
    start = time.perf_counter()
    results = engine.generate(requests)
    seconds = time.perf_counter() - start
    tokens = sum(len(r.token_ids) for r in results)
    assert tokens == len(prompts) * new
    return tokens / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir, _ = resolve_source(None)
    base = load_base_model(model_dir, quantize="none", device="cpu")
    vocab = base.model.get_input_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(100, vocab - 100, (args.prompt,), generator=gen).tolist() for _ in range(args.rows)
    ]
    engine = OfflineEngine(
        base,
        EngineSettings(
            max_batch_size=max(32, args.rows),
            max_seq_len=args.prompt + args.new + 32,
            max_queue=args.rows,
            adapter_slots=2 * args.adapters + 1,
        ),
    )
    embed_std = float(base.model.get_input_embeddings().weight.float().std())
    names: dict[str, list[str | None]] = {"base": [None] * args.rows}
    added: set[str] = set()
    for kinds in ("lora", "mixed"):
        dirs = make_adapters(model_dir, BenchSettings(kinds=kinds, adapters=args.adapters), embed_std)
        for name, path in dirs.items():
            if name not in added:  # "lora-0" is the same adapter in both sets
                engine.add_adapter(name, path)
                added.add(name)
        names[kinds] = [list(dirs)[i % len(dirs)] for i in range(args.rows)]
    workloads = {
        "base": ("base", layers.build_batch),
        "lora": ("lora", layers.build_batch),
        "mixed, subsets": ("mixed", layers.build_batch),
        "mixed, every hook on every row": ("mixed", whole_rows),
    }
    rates: dict[str, list[float]] = {w: [] for w in workloads}
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for workload, (adapters, batching) in workloads.items():
            core.build_batch = batching
            rate = run(engine, prompts, names[adapters], args.new)
            if round_:
                rates[workload].append(rate)
    core.build_batch = layers.build_batch
    median = {w: statistics.median(r) for w, r in rates.items()}
    print(
        json.dumps(
            {
                "rows": args.rows,
                "prompt_tokens": args.prompt,
                "new_tokens": args.new,
                "adapters": args.adapters,
                "torch_threads": torch.get_num_threads(),
                "tokens_per_s": {w: [round(x, 1) for x in r] for w, r in rates.items()},
                "vs_base": {w: round(m / median["base"], 3) for w, m in median.items()},
                "subsets_gain": round(median["mixed, subsets"] / median["mixed, every hook on every row"], 3),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
