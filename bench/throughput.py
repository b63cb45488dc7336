"""Throughput of the engine with many adapters vs its baselines, measured in one process.

Runs, on the same prompts:
  * engine, base only: N concurrent requests without adapters (the ceiling);
  * engine, mixed adapters: the same N requests spread over A adapters (LoRA, or all kinds mixed);
  * naive PEFT: requests one at a time, `set_adapter` per request (what serving without a
    multi-adapter engine looks like), on a subset of the requests (it is slow) and scaled per token.
Prints tokens/s and ratios; machines are shared and noisy, so only ratios within one run mean much.
"""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from adapterserve.server.engine.offline import OfflineEngine
from adapterserve.server.model.loading import load_base_model
from adapterserve.server.settings import EngineSettings

QUESTIONS = [
    "What is the capital of France?",
    "Name three colors.",
    "Write a haiku about the sea.",
    "What is 12 times 7?",
    "Give me a synonym for happy.",
    "Translate 'good morning' to Spanish.",
    "What is the boiling point of water?",
    "Who wrote Hamlet?",
]


@dataclass
class BenchSettings:
    base_model: str | None = None  # None = embedded default (SmolLM2-135M-Instruct)
    quantize: str = "none"
    device: str | None = None  # None = cuda if available, else cpu
    requests: int = 64
    adapters: int = 32
    kinds: str = "lora"  # "lora" or "mixed" (LoRA, IA3, prompt, prefix in turn)
    max_new_tokens: int = 32
    naive_requests: int = 4
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    rank: int = 8
    workdir: Path = Path("/tmp/adapterserve-bench")


@dataclass
class BenchResult:
    name: str
    requests: int
    tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def _peft_config(kind: str, settings: BenchSettings):
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig

    if kind == "lora":
        return LoraConfig(
            r=settings.rank,
            lora_alpha=2 * settings.rank,
            target_modules=list(settings.lora_targets),
            init_lora_weights=False,
            task_type="CAUSAL_LM",
        )
    if kind == "ia3":
        return IA3Config(task_type="CAUSAL_LM", init_ia3_weights=False)
    if kind == "prompt":
        return PromptTuningConfig(num_virtual_tokens=8, task_type="CAUSAL_LM")
    return PrefixTuningConfig(num_virtual_tokens=8, task_type="CAUSAL_LM")


def make_adapters(model_dir: str, settings: BenchSettings, embed_std: float) -> dict[str, Path]:
    """A adapters with small random weights, in PEFT format. Built on a weightless copy of the base
    (the same helper as `serve --demo-adapters`), and reused between runs with the same base and
    adapter settings (the folder name carries a digest of them)."""
    from transformers import AutoConfig

    from adapterserve.server.api.demo import write_demo_adapter

    kinds = ["lora"] if settings.kinds == "lora" else ["lora", "ia3", "prompt", "prefix"]
    config = AutoConfig.from_pretrained(model_dir)
    key = f"{Path(model_dir).resolve()}|{','.join(settings.lora_targets)}|r{settings.rank}"
    tag = hashlib.sha256(key.encode()).hexdigest()[:10]
    out: dict[str, Path] = {}
    for i in range(settings.adapters):
        kind = kinds[i % len(kinds)]
        path = settings.workdir / f"{tag}-{kind}-{i}"
        out[f"{kind}-{i}"] = path
        if not (path / "adapter_model.safetensors").is_file():
            write_demo_adapter(config, _peft_config(kind, settings), path, seed=i, embed_std=embed_std)
    return out


def _prompts(tokenizer, n: int) -> list[list[int]]:
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            add_generation_prompt=True,
            return_dict=False,
        )
        for i in range(n)
    ]


def _run_engine(
    engine: OfflineEngine, prompts, adapters: list[str | None], max_new: int, name: str
) -> BenchResult:
    requests = [
        engine.request(p, adapter=a, max_new_tokens=max_new, ignore_eos=True)
        for p, a in zip(prompts, adapters, strict=True)
    ]
    start = time.perf_counter()
    results = engine.generate(requests)
    seconds = time.perf_counter() - start
    return BenchResult(name, len(requests), sum(len(r.token_ids) for r in results), seconds)


def _run_naive_peft(model_dir: str, adapter_dirs: dict[str, Path], prompts, names, settings) -> BenchResult:
    """One request at a time through PeftModel with set_adapter per request (LoRA adapters only)."""
    from peft import PeftModel

    base = load_base_model(model_dir, quantize=settings.quantize, device=settings.device)
    loras = [n for n in names if n.startswith("lora")][: settings.naive_requests]
    model = PeftModel.from_pretrained(base.model, adapter_dirs[loras[0]], adapter_name=loras[0])
    for n in loras[1:]:
        model.load_adapter(adapter_dirs[n], adapter_name=n)
    model.eval()
    tokens = 0
    start = time.perf_counter()
    for i, n in enumerate(loras):
        model.set_adapter(n)
        ids = torch.tensor([prompts[i]], device=base.device)
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=settings.max_new_tokens,
            do_sample=False,
            min_new_tokens=settings.max_new_tokens,
            pad_token_id=base.tokenizer.pad_token_id,
        )
        tokens += out.shape[1] - ids.shape[1]
    return BenchResult("naive PEFT, one request at a time", len(loras), tokens, time.perf_counter() - start)


def _run_peft_static_batch(
    model_dir: str, adapter_dirs: dict[str, Path], prompts, names, settings
) -> BenchResult:
    """PEFT's own mixed-LoRA batch: one static `generate(adapter_names=[...])` over all requests."""
    from peft import PeftModel

    base = load_base_model(model_dir, quantize=settings.quantize, device=settings.device)
    loras = [n for n in names if n.startswith("lora")]
    model = PeftModel.from_pretrained(base.model, adapter_dirs[loras[0]], adapter_name=loras[0])
    for n in loras[1:]:
        model.load_adapter(adapter_dirs[n], adapter_name=n)
    model.eval()
    pad = base.tokenizer.pad_token_id
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=base.device)  # left pad
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=base.device)
    adapter_names = [loras[i % len(loras)] for i in range(len(prompts))]
    start = time.perf_counter()
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        adapter_names=adapter_names,
        max_new_tokens=settings.max_new_tokens,
        min_new_tokens=settings.max_new_tokens,
        do_sample=False,
        pad_token_id=pad,
    )
    seconds = time.perf_counter() - start
    tokens = (out.shape[1] - width) * out.shape[0]
    return BenchResult(
        f"PEFT generate(adapter_names=...) static batch, {len(loras)} LoRAs", len(prompts), tokens, seconds
    )


def _log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def run(settings: BenchSettings) -> dict:
    from adapterserve.server.model.loading import resolve_source

    model_dir, label = resolve_source(settings.base_model)
    settings.workdir.mkdir(parents=True, exist_ok=True)
    base = load_base_model(model_dir, quantize=settings.quantize, device=settings.device)
    _log(f"preparing {settings.adapters} {settings.kinds} adapters in {settings.workdir}")
    embed_std = float(base.model.get_input_embeddings().weight.float().std())
    adapter_dirs = make_adapters(model_dir, settings, embed_std)
    names = list(adapter_dirs)
    prompts = _prompts(base.tokenizer, settings.requests)
    engine = OfflineEngine(
        base,
        EngineSettings(
            max_batch_size=settings.requests,
            max_seq_len=256,
            max_prefill_tokens=8192,
            max_queue=settings.requests,
            adapter_slots=max(settings.adapters, 1),
        ),
    )
    for n, d in adapter_dirs.items():
        engine.add_adapter(n, d)
    _run_engine(engine, prompts[:4], [None] * 4, 4, "warm-up")
    _log("engine, base only")
    results = [
        _run_engine(engine, prompts, [None] * settings.requests, settings.max_new_tokens, "engine, base only")
    ]
    _log("engine, mixed adapters")
    results.append(
        _run_engine(
            engine,
            prompts,
            [names[i % len(names)] for i in range(settings.requests)],
            settings.max_new_tokens,
            f"engine, {settings.requests} requests over {settings.adapters} {settings.kinds} adapters",
        )
    )
    del engine
    if settings.kinds == "lora":
        _log("PEFT static mixed-LoRA batch")
        results.append(_run_peft_static_batch(model_dir, adapter_dirs, prompts, names, settings))
    _log("naive PEFT, one request at a time")
    results.append(_run_naive_peft(model_dir, adapter_dirs, prompts, names, settings))
    ceiling = results[0].tokens_per_s
    report = {
        "base_model": label,
        "quantize": settings.quantize,
        "settings": {k: str(v) for k, v in asdict(settings).items()},
        "torch_threads": torch.get_num_threads(),
        "results": [
            {
                **asdict(r),
                "tokens_per_s": round(r.tokens_per_s, 1),
                "vs_base_only": round(r.tokens_per_s / ceiling, 3),
            }
            for r in results
        ],
    }
    return report


def print_report(report: dict) -> None:
    print(f"base {report['base_model']} quantize={report['quantize']} threads={report['torch_threads']}")
    print(f"{'run':<58} {'reqs':>5} {'tokens':>7} {'s':>7} {'tok/s':>8} {'vs base':>8}")
    for r in report["results"]:
        print(
            f"{r['name']:<58} {r['requests']:>5} {r['tokens']:>7} {r['seconds']:>7.2f} "
            f"{r['tokens_per_s']:>8.1f} {r['vs_base_only']:>8.3f}"
        )
