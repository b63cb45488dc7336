"""Before/after of the engine's model runner in one process: the runner.py of an older commit swapped into
one engine, the current runner in another, same SmolLM2 weights, prompts and adapters, interleaved rounds.

    git show 603063a:server/engine/runner.py > /tmp/old_runner.py
    python scripts/ab/runner_before_after.py /tmp/old_runner.py [dtype] [repeats]
"""

from __future__ import annotations

import importlib.util
import statistics
import sys

from adapterserve.bench.throughput import BenchSettings, make_adapters, make_prompts, run_engine_workload
from adapterserve.server.engine.offline import OfflineEngine
from adapterserve.server.model.loading import load_base_model, resolve_source
from adapterserve.server.settings import EngineSettings

ROWS, NEW, ADAPTERS = 64, 32, 32


def main(old_path: str, dtype: str = "float32", repeats: int = 3) -> None:
    spec = importlib.util.spec_from_file_location("old_runner", old_path)
    old = importlib.util.module_from_spec(spec)
    sys.modules["old_runner"] = old
    spec.loader.exec_module(old)
    model_dir, _ = resolve_source(None)
    engines: dict[str, OfflineEngine] = {}
    prompts: list[list[int]] = []
    for name in ("old", "new"):
        base = load_base_model(model_dir, quantize="none", dtype=dtype, device="cpu")
        prompts = make_prompts(base.tokenizer, ROWS)
        settings = EngineSettings(
            max_batch_size=ROWS,
            max_seq_len=max(len(p) for p in prompts) + NEW + 16,
            max_prefill_tokens=8192,
            max_queue=ROWS,
            adapter_slots=ADAPTERS + 1,
        )
        engine = OfflineEngine(base, settings)
        if name == "old":
            engine.core.runner = old.ModelRunner(base.model, engine.core.cache, engine.core.context)
        engines[name] = engine
    embed_std = float(engines["new"].base.model.get_input_embeddings().weight.float().std())
    workloads: dict[str, list[str | None]] = {"base": [None] * ROWS}
    for kinds in ("lora", "mixed"):
        dirs = make_adapters(model_dir, BenchSettings(kinds=kinds, adapters=ADAPTERS), embed_std)
        for engine in engines.values():
            for name, path in dirs.items():
                engine.add_adapter(f"{kinds}-{name}", path)
        workloads[kinds] = [f"{kinds}-{list(dirs)[i % ADAPTERS]}" for i in range(ROWS)]
    for engine in engines.values():  # warm-up at full size
        for adapters in workloads.values():
            run_engine_workload(engine, prompts, adapters, NEW)
    outputs = {
        name: [
            r.token_ids
            for r in engine.generate(
                [
                    engine.request(p, adapter=a, max_new_tokens=16, ignore_eos=True)
                    for p, a in zip(prompts, workloads["mixed"], strict=True)
                ]
            )
        ]
        for name, engine in engines.items()
    }
    same = sum(a == b for a, b in zip(outputs["old"], outputs["new"], strict=True))
    print(f"identical greedy tokens (mixed, {ROWS} rows): {same} / {ROWS}", flush=True)
    results: dict[tuple[str, str], list[float]] = {(e, w): [] for e in engines for w in workloads}
    for r in range(repeats):
        for workload, adapters in workloads.items():
            for name in ("old", "new") if r % 2 == 0 else ("new", "old"):
                run = run_engine_workload(engines[name], prompts, adapters, NEW)
                results[(name, workload)].append(run.tokens_per_s)
                step = statistics.median(run.decode_step_s) * 1e3
                print(
                    f"round {r} {workload:6s} {name}: {run.tokens_per_s:7.1f} tok/s, decode step {step:.1f} ms"
                )
    for workload in workloads:
        before = statistics.median(results[("old", workload)])
        after = statistics.median(results[("new", workload)])
        print(f"{dtype} {workload:6s}: old {before:7.1f}  new {after:7.1f}  new/old {after / before:.3f}")


if __name__ == "__main__":
    main(sys.argv[1], *(sys.argv[2:3] or ["float32"]), *[int(x) for x in sys.argv[3:4]])
