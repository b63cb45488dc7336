"""Microbenchmark and correctness check of the LoRA kernel backends (torch gather+bmm vs triton BGMV).

usage: python scripts/gpu/lora_kernels.py [--device cuda|cpu] [--iters N] [--budget-s S]
(prints one JSON line; never runs past --budget-s: a watchdog then prints what it has and exits 3)

Llama-3.2-1B shapes in bf16: q_proj 2048 -> 2048 and v_proj 2048 -> 512, 32 adapter slots (+ slot 0, no
adapter), ranks 8 and 16, T = 1, 8, 64 decoding rows with random slots. For each: the max |diff| of the
delta (x @ A[slot]) @ B[slot] between the backends, and the median time of one delta per backend: eagerly
(torch.cuda.Event around each call, after a warm-up) and replayed from a captured torch.cuda.CUDAGraph
(which shows the kernels capture: no host sync, shape-only host work).

`--device cpu` runs the Triton kernels in Triton's CPU interpreter (TRITON_INTERPRET=1, set here before
triton is imported) with one iteration, T = 1 and no graphs: a check of the script and the kernels, not
a measurement (the interpreter also rounds bf16 differently from the GPU, so its diffs are larger).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import statistics
import sys
import time

HIDDEN = 2048
SITES = {"q_proj": (HIDDEN, 2048), "v_proj": (HIDDEN, 512)}
NUM_SLOTS = 32
RANKS = (8, 16)
TOKENS = (1, 8, 64)
GRAPH_CALLS = 10  # deltas captured in one graph (one replay = this many)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda if available")
    p.add_argument("--iters", type=int, default=None, help="timed calls per case (default 50 cuda, 2 cpu)")
    p.add_argument("--ranks", default=None, help="comma separated (default 8,16)")
    p.add_argument("--tokens", default=None, help="comma separated T (default 1,8,64 on cuda, 1 on cpu)")
    p.add_argument("--budget-s", type=float, default=50.0, help="the watchdog's limit (default 50 s)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report: dict = {"results": []}
    started = time.perf_counter()

    def out_of_time(signum, frame):
        report["error"] = f"stopped by the watchdog after {args.budget_s:g} s"
        report["seconds"] = round(time.perf_counter() - started, 1)
        print(json.dumps(report), flush=True)
        os._exit(3)

    signal.signal(signal.SIGALRM, out_of_time)
    signal.setitimer(signal.ITIMER_REAL, args.budget_s)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton's first import

    import torch

    from adapterserve.server.adapters.kernels import lora_kernels

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    iters = args.iters or (50 if cuda else 1)
    ranks = _ints(args.ranks) or RANKS
    token_counts = _ints(args.tokens) or (TOKENS if cuda else (1,))
    dtype = torch.bfloat16
    backends = {"torch": lora_kernels("torch", device), "triton": lora_kernels("triton", device)}
    report.update(
        device=torch.cuda.get_device_name(device) if cuda else "cpu (Triton interpreter)",
        torch=torch.__version__,
        triton=__import__("triton").__version__,
        dtype="bfloat16",
        slots=NUM_SLOTS,
        iters=iters,
    )
    gen = torch.Generator(device="cpu").manual_seed(0)
    for site, (in_dim, out_dim) in SITES.items():
        for rank in ranks:
            a = (torch.randn(NUM_SLOTS + 1, in_dim, rank, generator=gen) / in_dim**0.5).to(device, dtype)
            b = torch.randn(NUM_SLOTS + 1, rank, out_dim, generator=gen).to(device, dtype)
            a[0].zero_()
            b[0].zero_()
            for tokens in token_counts:
                x = torch.randn(tokens, 1, in_dim, generator=gen).to(device, dtype)
                slots = torch.randint(0, NUM_SLOTS + 1, (tokens,), generator=gen).to(device)
                row = {"site": site, "in": in_dim, "out": out_dim, "rank": rank, "tokens": tokens}
                deltas = {}
                for name, k in backends.items():
                    delta = functools.partial(_delta, k, x, a, b, slots)
                    deltas[name] = delta()
                    row[f"{name}_ms"] = _median_ms(delta, iters, cuda)
                    if cuda:
                        row[f"{name}_graph_ms"] = _graph_ms(delta, iters)
                want = torch.einsum("ti,tir,tro->to", x[:, 0].double(), a[slots].double(), b[slots].double())
                row["max_abs_diff"] = float(
                    (deltas["triton"].double() - deltas["torch"].double()).abs().max()
                )
                row["max_abs_diff_torch_vs_fp64"] = float((deltas["torch"][:, 0].double() - want).abs().max())
                row["max_abs_diff_triton_vs_fp64"] = float(
                    (deltas["triton"][:, 0].double() - want).abs().max()
                )
                row["speedup"] = round(row["torch_ms"] / row["triton_ms"], 2) if row["triton_ms"] else None
                # What the torch backend copies per call (a[slots] and b[slots]); triton copies nothing.
                row["gathered_mib"] = round(tokens * rank * (in_dim + out_dim) * 2 / 2**20, 2)
                report["results"].append(row)
    signal.setitimer(signal.ITIMER_REAL, 0)
    diffs = [r["max_abs_diff"] for r in report["results"]]
    report["max_abs_diff"] = max(diffs)
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report), flush=True)
    return 0


def _ints(text: str | None) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v) if text else ()


def _delta(k, x, a, b, slots):
    """(x @ A[slot]) @ B[slot] through backend k: x [T, 1, in] -> [T, 1, out]."""
    return k.expand(k.shrink(x, a, slots), b, slots)


def _median_ms(fn, iters: int, cuda: bool) -> float:
    import torch

    for _ in range(3 if cuda else 1):  # warm-up (compiles the kernels on first use)
        fn()
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t0))
    return round(statistics.median(times), 4)


def _graph_ms(fn, iters: int) -> float:
    """Median time of one call replayed from a CUDA graph that captured GRAPH_CALLS calls."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as capture wants
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(GRAPH_CALLS):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(max(1, iters // 2)):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / GRAPH_CALLS)
    return round(statistics.median(times), 4)


if __name__ == "__main__":
    sys.exit(main())
