"""The cost of structured output in the batch: 64 requests where half carry a JSON schema vs the same 64
without any, in one process on the embedded SmolLM2 (the engine `serve` runs, default settings), interleaved
rounds (A B A B ...) so that a shared machine's noise hits both alike.

Every row generates exactly `--new` tokens in both runs: the free rows ignore EOS, and the schema (an array
of at least 12 records) is longer than `--new` tokens, so its rows end by length too. The ratio is then the
per-step cost alone: tokens/s with half the rows under a grammar / tokens/s with none.

    python scripts/ab/structured_ratio.py [--rounds 3] [--new 32] [--rows 64] [--adapters 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch

from adapterserve.bench.throughput import BenchSettings, make_adapters, make_prompts
from adapterserve.server.engine.offline import OfflineEngine
from adapterserve.server.engine.types import FinishReason, StructuredKind, StructuredOutput
from adapterserve.server.model.loading import load_base_model, resolve_source
from adapterserve.server.settings import EngineSettings

SCHEMA = {
    "type": "object",
    "properties": {
        "records": {
            "type": "array",
            "minItems": 12,
            "maxItems": 16,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 24},
                    "kind": {"enum": ["city", "river", "mountain", "country"]},
                    "year": {"type": "integer", "minimum": 0, "maximum": 2100},
                    "known": {"type": "boolean"},
                },
                "required": ["name", "kind", "year", "known"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["records"],
    "additionalProperties": False,
}


def run(engine: OfflineEngine, prompts, adapters, structured, new: int) -> tuple[float, int, list]:
    requests = []
    for i, (p, a) in enumerate(zip(prompts, adapters, strict=True)):
        r = engine.request(p, adapter=a, max_new_tokens=new, ignore_eos=True)
        if structured is not None and i % 2 == 0:
            r = dataclasses.replace(r, structured=structured)
        requests.append(r)
    start = time.perf_counter()
    results = engine.generate(requests)
    seconds = time.perf_counter() - start
    return seconds, sum(len(r.token_ids) for r in results), results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument(
        "--adapters", type=int, default=8, help="LoRA adapters the rows spread over (0: base)"
    )
    args = parser.parse_args()
    model_dir, _ = resolve_source(None)
    base = load_base_model(model_dir, quantize="none", device="cpu")
    prompts = make_prompts(base.tokenizer, args.rows)
    engine = OfflineEngine(
        base,
        EngineSettings(
            max_batch_size=args.rows,
            max_seq_len=max(len(p) for p in prompts) + args.new + 16,
            max_prefill_tokens=8192,
            max_queue=args.rows,
            adapter_slots=args.adapters + 1,
        ),
    )
    adapters: list[str | None] = [None] * args.rows
    if args.adapters:
        embed_std = float(base.model.get_input_embeddings().weight.float().std())
        dirs = make_adapters(model_dir, BenchSettings(kinds="lora", adapters=args.adapters), embed_std)
        for name, path in dirs.items():
            engine.add_adapter(name, path)
        adapters = [list(dirs)[i % args.adapters] for i in range(args.rows)]
    structured = StructuredOutput(StructuredKind.JSON_SCHEMA, json.dumps(SCHEMA))
    run(engine, prompts, adapters, structured, args.new)  # warm-up (compiles the schema once)
    run(engine, prompts, adapters, None, args.new)
    grammars = engine.core.grammars
    rates: dict[str, list[float]] = {"none": [], "half": []}
    grammar_s = {"compute": 0.0, "wait": 0.0, "apply": 0.0, "prefetch": 0.0, "steps": 0}
    steps_s = {"none": 0.0, "half": 0.0}
    for _ in range(args.rounds):
        for name in ("none", "half"):
            before = (
                grammars.compute_s,
                grammars.wait_s,
                grammars.apply_s,
                grammars.steps,
                grammars.prefetch_s,
            )
            seconds, tokens, results = run(
                engine, prompts, adapters, structured if name == "half" else None, args.new
            )
            assert tokens == args.rows * args.new, "every row must run to --new tokens"
            assert all(r.finish_reason is FinishReason.LENGTH for r in results)
            rates[name].append(tokens / seconds)
            steps_s[name] += seconds / args.new  # one decode step per generated token (+ the prefill)
            if name == "half":
                grammar_s["compute"] += grammars.compute_s - before[0]
                grammar_s["wait"] += grammars.wait_s - before[1]
                grammar_s["apply"] += grammars.apply_s - before[2]
                grammar_s["steps"] += grammars.steps - before[3]
                grammar_s["prefetch"] += grammars.prefetch_s - before[4]
    ratios = [h / n for h, n in zip(rates["half"], rates["none"], strict=True)]
    steps = max(grammar_s["steps"], 1)
    print(
        json.dumps(
            {
                "rows": args.rows,
                "grammar_rows": (args.rows + 1) // 2,
                "new_tokens": args.new,
                "adapters": args.adapters,
                "torch_threads": torch.get_num_threads(),
                "tokens_per_s_none": [round(r, 1) for r in rates["none"]],
                "tokens_per_s_half_schema": [round(r, 1) for r in rates["half"]],
                "ratio_per_round": [round(r, 3) for r in ratios],
                "ratio_median": round(statistics.median(ratios), 3),
                "grammar_ms_per_step": {
                    "masks_computed_on_worker": round(1e3 * grammar_s["compute"] / steps, 2),
                    "engine_thread_waited": round(1e3 * grammar_s["wait"] / steps, 2),
                    "apply_incl_wait": round(1e3 * grammar_s["apply"] / steps, 2),
                    "start_next_masks": round(1e3 * grammar_s["prefetch"] / steps, 2),
                },
                "ms_per_step_none": round(1e3 * steps_s["none"] / args.rounds, 1),
                "ms_per_step_half_schema": round(1e3 * steps_s["half"] / args.rounds, 1),
            },
            indent=1,
        )
    )
    grammars.close()


if __name__ == "__main__":
    main()
