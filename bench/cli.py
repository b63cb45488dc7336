"""`adapterserve bench`: the engine against its baselines, in one process, printed as ratios."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import get_args

from adapterserve.server.settings import LoraBackendName


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-model", default=None, help="path or name (default: the embedded SmolLM2)")
    parser.add_argument("--quantize", choices=["nf4", "int8", "none"], default="none")
    parser.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="compute dtype (default auto: bf16 on CUDA, fp32 on CPU)",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    parser.add_argument("--requests", type=int, default=64, help="concurrent requests (default 64)")
    parser.add_argument("--adapters", type=int, default=32, help="distinct adapters the requests spread over")
    parser.add_argument(
        "--kinds",
        choices=["lora", "mixed"],
        default="lora",
        help="LoRA only, or LoRA/DoRA/IA3/prompt/prefix in turn",
    )
    parser.add_argument("--targets", default="q_proj,v_proj", help="LoRA target modules (comma separated)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument(
        "--lora-backend",
        choices=list(get_args(LoraBackendName)),
        default="torch",
        help="kernels of the LoRA math in mixed batches (triton: CUDA only; default torch)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed runs of each engine workload, interleaved (default 3)"
    )
    parser.add_argument(
        "--naive-requests", type=int, default=4, help="requests for the one-at-a-time baseline (at most)"
    )
    parser.add_argument(
        "--baseline-seconds",
        type=float,
        default=60.0,
        help="wall-time cap of each baseline; it then reports the tokens it produced (0: skip baselines)",
    )
    parser.add_argument(
        "--peak-bandwidth-gbs",
        type=float,
        default=None,
        help="the device's peak memory bandwidth in GB/s (default: looked up from a CUDA card's name)",
    )
    parser.add_argument(
        "--workdir", type=Path, default=Path("/tmp/adapterserve-bench"), help="adapter cache dir"
    )
    parser.add_argument(
        "--decode-step",
        choices=["auto", "eager", "static", "graphs"],
        default="auto",
        help="the engine's decode step (default auto: CUDA graphs on CUDA, eager on CPU)",
    )
    parser.add_argument("--compile-decode", action="store_true", help="torch.compile the static decode step")
    parser.add_argument(
        "--eager-too",
        action="store_true",
        help="also time the engine workloads with the eager decode step, in the same interleaved rounds",
    )
    parser.add_argument(
        "--adapter-slots",
        type=int,
        default=None,
        help="device slots (default: one per adapter); fewer than --adapters: the rest wait in the host cache",
    )
    parser.add_argument(
        "--max-seq-len", type=int, default=None, help="engine row length (default: longest prompt + new + 16)"
    )
    parser.add_argument(
        "--kv-cache-mib",
        type=int,
        default=None,
        help="paged KV pool size in MiB (default: room for every row's max_seq_len)",
    )
    parser.add_argument(
        "--served",
        action="store_true",
        help="measure through the server: `adapterserve serve` in a child process, adapters uploaded and "
        "requests sent through the SDK, beside the in-process engine in the same rounds",
    )
    parser.add_argument(
        "--source-adapters",
        type=int,
        default=0,
        metavar="N",
        help="with --served: the adapter-source workload instead: N LoRA adapters (e.g. 1000) in a local "
        "S3-compatible store (rclone serve s3), requests with Zipf popularity from cold to steady state "
        "against waves over the 32 most popular (bench/sources.py)",
    )
    parser.add_argument("--source-waves", type=int, default=12, help="waves of the source workload")
    parser.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")


def run_bench(args: argparse.Namespace) -> int:
    from adapterserve.bench.throughput import BenchSettings, print_report, run

    if args.requests < 1 or args.adapters < 1 or args.max_new_tokens < 1 or args.repeats < 1:
        print("adapterserve bench: --requests, --adapters, --max-new-tokens and --repeats must be at least 1")
        return 2
    if args.adapter_slots is not None and args.adapter_slots < 1:
        print("adapterserve bench: --adapter-slots must be at least 1")
        return 2
    if (args.max_seq_len is not None and args.max_seq_len < 16) or (
        args.kv_cache_mib is not None and args.kv_cache_mib < 1
    ):
        print("adapterserve bench: --max-seq-len must be at least 16 and --kv-cache-mib at least 1")
        return 2
    if args.baseline_seconds < 0:
        print("adapterserve bench: --baseline-seconds must be 0 (skip) or more")
        return 2
    settings = BenchSettings(
        base_model=args.base_model,
        quantize=args.quantize,
        dtype=args.dtype,
        device=args.device,
        requests=args.requests,
        adapters=args.adapters,
        kinds=args.kinds,
        max_new_tokens=args.max_new_tokens,
        repeats=args.repeats,
        naive_requests=args.naive_requests,
        baseline_seconds=args.baseline_seconds,
        peak_bandwidth_gbs=args.peak_bandwidth_gbs,
        lora_targets=tuple(t for t in args.targets.split(",") if t),
        rank=args.rank,
        lora_backend=args.lora_backend,
        workdir=args.workdir,
        decode_step=args.decode_step,
        compile_decode=args.compile_decode,
        eager_too=args.eager_too,
        adapter_slots=args.adapter_slots,
        max_seq_len=args.max_seq_len,
        kv_cache_bytes=None if args.kv_cache_mib is None else args.kv_cache_mib << 20,
    )
    if args.served and args.source_adapters > 0:
        from adapterserve.bench.sources import print_sources_report, run_sources

        report = run_sources(settings, args.source_adapters, waves=max(args.source_waves, 2))
        print_sources_report(report)
        if args.json is not None:
            args.json.write_text(json.dumps(report, indent=1) + "\n")
        return 0
    if args.served:
        from adapterserve.bench.served import run_served

        report = run_served(settings)
    else:
        report = run(settings)
    print_report(report)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0
