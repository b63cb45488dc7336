"""Throughput of OpenAI-compatible servers side by side, on the same chats (adapterserve's HTTP API and,
e.g., vLLM's): the like-for-like served comparison of docs/performance.md.

Each server is named `label=url` (url: the server's base, e.g. http://127.0.0.1:8000). A wave sends the
bench's 64 chat questions at once to /v1/chat/completions (greedy, `max_tokens`, `ignore_eos`), each
request with a model name from `--models` in turn (the base model's name, or adapter names; a server's
adapters must be served under the same names); its throughput is completion tokens over the wave's wall
time. Waves are warmed once, then run `--repeats` times per server, the order flipped every round, and
reported as medians with min-max. The texts each server returned are compared request by request.

usage: python scripts/compare_openai_servers.py ours=http://127.0.0.1:8000 vllm=http://127.0.0.1:8100 \
           --models base-model-name [--requests 64 --max-tokens 32 --repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time

import httpx

from adapterserve.bench.throughput import QUESTIONS  # the bench's chats


async def wave(client: httpx.AsyncClient, url: str, models: list[str], args) -> tuple[float, list[str]]:
    async def one(i: int) -> tuple[int, str]:
        body = {
            "model": models[i % len(models)],
            "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            "max_tokens": args.max_tokens,
            "temperature": 0,
            "ignore_eos": True,
        }
        reply = await client.post(f"{url}/v1/chat/completions", json=body)
        reply.raise_for_status()
        data = reply.json()
        return data["usage"]["completion_tokens"], data["choices"][0]["message"]["content"]

    start = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(args.requests)))
    seconds = time.perf_counter() - start
    return sum(tokens for tokens, _ in results) / seconds, [text for _, text in results]


async def main(args) -> dict:
    servers = dict(spec.split("=", 1) for spec in args.servers)
    models = args.models.split(",")
    limits = httpx.Limits(max_connections=args.requests, max_keepalive_connections=args.requests)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        texts = {}
        for label, url in servers.items():
            print(f"warm-up: {label}", file=sys.stderr, flush=True)
            _, texts[label] = await wave(client, url, models, args)
        runs: dict[str, list[float]] = {label: [] for label in servers}
        order = list(servers)
        for round_ in range(args.repeats):
            for label in order if round_ % 2 == 0 else reversed(order):
                tps, _ = await wave(client, servers[label], models, args)
                runs[label].append(tps)
                print(f"round {round_ + 1}: {label} {tps:.1f} tok/s", file=sys.stderr, flush=True)
    first = order[0]
    report = {
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "models": models,
        "results": {
            label: {
                "tokens_per_s": round(statistics.median(v), 1),
                "min": round(min(v), 1),
                "max": round(max(v), 1),
                f"vs_{first}": round(statistics.median(v) / statistics.median(runs[first]), 3),
                f"same_text_as_{first}": sum(a == b for a, b in zip(texts[label], texts[first], strict=True)),
            }
            for label, v in runs.items()
        },
    }
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("servers", nargs="+", help="label=base_url, e.g. ours=http://127.0.0.1:8000")
    parser.add_argument("--models", required=True, help="model names, comma separated, used in turn")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    arguments = parser.parse_args()
    out = asyncio.run(main(arguments))
    print(json.dumps(out, indent=1))
    if arguments.json:
        with open(arguments.json, "w") as f:
            json.dump(out, f, indent=1)
