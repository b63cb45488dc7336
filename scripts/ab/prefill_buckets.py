"""What bucketing oneDNN's row counts costs in time (server/cpu/linear.py: prefill row counts above 16
round up to one of 8 sizes per doubling, so that prompts of many lengths do not grow oneDNN's primitive
caches for good): the same requests with the bucketed row counts and with exact ones, in one process on
the embedded SmolLM2, interleaved rounds. A warm-up round first makes every shape of both, so the rounds
compare padding work alone, not primitive creation.

Prompts take `--rows` different lengths (from `--shortest` up), so most prefill forwards have a row count
that is not a bucket size.

    python scripts/ab/prefill_buckets.py [--rounds 3] [--rows 32] [--shortest 24] [--new 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from adapterserve.server.cpu import linear as cpu_linear
from adapterserve.server.engine.offline import OfflineEngine
from adapterserve.server.model.loading import load_base_model, resolve_source
from adapterserve.server.settings import EngineSettings


def exact_rows(rows: int, exact: int = cpu_linear.EXACT_ROWS) -> int:
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--shortest", type=int, default=24)
    parser.add_argument("--new", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir, _ = resolve_source(None)
    base = load_base_model(model_dir, quantize="none", device="cpu")
    vocab = base.model.get_input_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(100, vocab - 100, (args.shortest + 3 * i,), generator=gen).tolist()
        for i in range(args.rows)
    ]
    engine = OfflineEngine(
        base,
        EngineSettings(
            max_batch_size=args.rows,
            max_seq_len=max(map(len, prompts)) + args.new + 16,
            max_queue=args.rows,
            adapter_slots=1,
        ),
    )
    modes = {"bucketed": cpu_linear.padded_rows, "exact": exact_rows}
    rates: dict[str, list[float]] = {m: [] for m in modes}
    prompt_tokens = sum(map(len, prompts))
    for round_ in range(args.rounds + 1):  # round 0 makes every shape of both modes
        for mode, rule in modes.items():
            cpu_linear.padded_rows = rule
            requests = [engine.request(p, max_new_tokens=args.new, ignore_eos=True) for p in prompts]
            start = time.perf_counter()
            engine.generate(requests)
            seconds = time.perf_counter() - start
            if round_:
                rates[mode].append((prompt_tokens + args.rows * args.new) / seconds)
    cpu_linear.padded_rows = modes["bucketed"]
    median = {m: statistics.median(r) for m, r in rates.items()}
    print(
        json.dumps(
            {
                "requests": args.rows,
                "prompt_lengths": f"{len(prompts[0])}..{len(prompts[-1])}",
                "new_tokens": args.new,
                "torch_threads": torch.get_num_threads(),
                "tokens_per_s (prompt + new)": {m: [round(x, 1) for x in r] for m, r in rates.items()},
                "bucketed_vs_exact": round(median["bucketed"] / median["exact"], 3),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
