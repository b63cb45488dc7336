"""The settings of `python -m adapterserve.bench.aiperf` (bench/aiperf.py): the workloads' load shapes,
one `AiperfSettings`, and the command line that fills it."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

DESCRIPTION = "The server under real load clients: NVIDIA AIPerf and a light client, on the base, N LoRAs and a kind mix."

SCENARIOS = ("base", "lora", "mixed")
# AIPerf's load shape per workload: prompt/output tokens, concurrency, requests, warm-up, shared prefixes
WORKLOADS: dict[str, dict[str, int]] = {
    "random": dict(input_tokens=128, output_tokens=32, concurrency=16, requests=128, warmup=16),
    "shared-prefix": dict(
        input_tokens=64,
        output_tokens=16,
        concurrency=8,
        requests=96,
        warmup=8,
        prefix_prompts=4,
        prefix_length=512,
    ),
    # chat conversations of 4 turns: every turn resends the history (the prefix cache's other common case)
    "multi-turn": dict(
        input_tokens=128,
        output_tokens=32,
        concurrency=8,
        requests=96,
        warmup=8,
        conversations=24,
        turns=4,
    ),
}


@dataclass
class AiperfSettings:
    aiperf: str
    scenarios: tuple[str, ...] = SCENARIOS
    adapters: int = 16
    concurrency: int = 16
    requests: int = 128
    warmup: int = 16
    input_tokens: int = 128
    output_tokens: int = 32
    prefix_prompts: int = 0  # AIPerf --num-prefix-prompts: prompts start with one of this many prefixes
    prefix_length: int = 0  # tokens of each shared prefix (AIPerf --prefix-prompt-length)
    conversations: int = 0  # AIPerf --conversation-num: multi-turn chats (the chat endpoint)
    turns: int = 1  # AIPerf --conversation-turn-mean: requests per conversation, each with the history
    variants: list[tuple[str, list[str]]] = field(default_factory=list)  # (name, serve flags) to compare
    placement: str = "shared"  # shared | own-session | quota
    quota: float = 1.0  # CPUs, with placement quota
    server_args: list[str] = field(default_factory=list)
    # the Python that runs `serve` (default: this one); per variant (--variant-python), another checkout's
    # virtual environment: two versions of the code in one run
    server_python: str = ""
    variant_pythons: dict[str, str] = field(default_factory=dict)
    server_env: dict[str, str] = field(default_factory=dict)  # e.g. ADAPTERSERVE_ENGINE__PACKED_STEPS
    light_client: bool = True
    run_aiperf: bool = True  # False: the light client alone, on a fresh server (a quiet machine's figure)
    out: Path = Path("aiperf-results")
    label: str = ""
    rounds: int = 1  # every scenario this many times, interleaved; a summary of medians follows


def parse_settings(argv: list[str] | None = None) -> AiperfSettings:
    p = argparse.ArgumentParser(prog="python -m adapterserve.bench.aiperf", description=DESCRIPTION)
    p.add_argument("--aiperf", help="the aiperf executable (its own virtual environment)")
    p.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help="base, lora (N LoRAs), mixed (N of 5 kinds: LoRA, DoRA, IA3, prompt, prefix)",
    )
    p.add_argument("--adapters", type=int, default=16)
    p.add_argument(
        "--workload",
        choices=sorted(WORKLOADS),
        default="random",
        help="random: 128-token prompts, 32 out, concurrency 16, 128 requests; shared-prefix: 4 shared "
        "512-token prefixes + 64 tokens, 16 out, concurrency 8, 96 requests; multi-turn: 24 chats of 4 "
        "turns (128 new tokens each, the history resent), 32 out, concurrency 8 (the flags below override)",
    )
    for flag in ("concurrency", "requests", "warmup", "input-tokens", "output-tokens", "prefix-prompts"):
        p.add_argument(f"--{flag}", type=int, default=None)
    p.add_argument("--prefix-length", type=int, default=None)
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        help="NAME=FLAGS: a server configuration to compare, e.g. 'inline=--cpu-prefill-threads 0' "
        "(repeatable; each scenario runs on each, interleaved)",
    )
    p.add_argument(
        "--variant-python",
        action="append",
        default=[],
        help="NAME=PATH: the variant NAME's server runs under this Python, e.g. another checkout's "
        "venv/bin/python: the code before and after a change, interleaved in one run (repeatable)",
    )
    p.add_argument("--placement", choices=["shared", "own-session", "quota"], default="shared")
    p.add_argument("--quota", type=float, default=1.0, help="CPUs of the quota (--placement quota)")
    p.add_argument("--server-arg", action="append", default=[], help="a flag for `serve` (repeatable)")
    p.add_argument("--server-env", action="append", default=[], help="KEY=VALUE for the server (repeatable)")
    p.add_argument("--no-light-client", action="store_true")
    p.add_argument(
        "--no-aiperf",
        action="store_true",
        help="the light client alone, on a fresh server (no AIPerf before it: a quiet machine's figure)",
    )
    p.add_argument("--label", default="", help="the server column's text (default: the placement)")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the scenarios this many times, interleaved, and add a summary (medians, x base per round)",
    )
    p.add_argument("--out", type=Path, default=Path("aiperf-results"))
    a = p.parse_args(argv)
    shape = dict(WORKLOADS[a.workload])
    for key in ("concurrency", "requests", "warmup", "input_tokens", "output_tokens", "prefix_prompts"):
        if getattr(a, key) is not None:
            shape[key] = getattr(a, key)
    if a.prefix_length is not None:
        shape["prefix_length"] = a.prefix_length
    variants = []
    for spec in a.variant:
        name, sep, flags = spec.partition("=")
        if not sep or not name:
            p.error(f"--variant takes NAME=FLAGS (got {spec!r})")
        variants.append((name, flags.split()))
    pythons = dict(spec.split("=", 1) for spec in a.variant_python if "=" in spec)
    unknown = set(pythons) - {name for name, _ in variants}
    if len(pythons) != len(a.variant_python) or unknown:
        p.error(f"--variant-python takes NAME=PATH of a --variant NAME (got {a.variant_python})")
    settings = AiperfSettings(
        aiperf=a.aiperf or "",
        scenarios=tuple(s for s in a.scenarios.split(",") if s),
        adapters=a.adapters,
        variants=variants,
        variant_pythons=pythons,
        **shape,
        placement=a.placement,
        quota=a.quota,
        server_args=a.server_arg,
        server_env=dict(kv.split("=", 1) for kv in a.server_env),
        light_client=not a.no_light_client,
        run_aiperf=not a.no_aiperf,
        out=a.out,
        label=a.label,
        rounds=a.rounds,
    )
    if settings.rounds < 1:
        p.error(f"--rounds must be at least 1 (got {settings.rounds})")
    bad = [s for s in settings.scenarios if s not in SCENARIOS]
    if bad:
        p.error(f"unknown scenario(s) {bad}; choose from {SCENARIOS}")
    if a.no_aiperf and a.no_light_client:
        p.error("--no-aiperf with --no-light-client leaves nothing to run")
    if not a.no_aiperf and not a.aiperf:
        p.error("--aiperf is required (the aiperf executable), unless --no-aiperf")
    return settings
