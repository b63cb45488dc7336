"""Under sustained load with long prompts the real server serves prefills in arrival order: a burst of
long prompts, then clients that come straight back (a closed loop, as AIPerf runs), with prefill on two
worker threads. No request is overtaken by more than the requests that can be in flight beside it, and
the server's queue-wait histogram counts every request (server/engine/scheduler.py, batch.py)."""

from __future__ import annotations

import threading
import time
import urllib.request
from pathlib import Path

from adapterserve import Client
from tests.helpers.server_process import start_server

CLIENTS = 8
REQUESTS = 48
LONG = " ".join(f"word{i % 37} sentence{i % 11}." for i in range(60))  # a few hundred tokens


def test_a_burst_of_long_prompts_under_a_closed_loop_is_served_in_arrival_order(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    args = ["--cpu-prefill-threads", "2", "--max-prefill-tokens", "64", "--max-batch-size", str(CLIENTS)]
    server = start_server(tiny_model_dir, tmp_path / "store", extra_args=[*args, "--no-prefix-cache"])
    lock = threading.Lock()
    issued = 0
    times: list[tuple[float, float]] = []  # (sent, first token) per request
    deadline = time.monotonic() + 120

    def client_loop(client: Client, k: int) -> None:
        nonlocal issued
        while time.monotonic() < deadline:
            with lock:
                if issued >= REQUESTS:
                    return
                issued += 1
                n = issued
            sent = time.monotonic()
            first = None
            for chunk in client.stream(f"{n} {LONG}", max_new_tokens=4 + k % 3, ignore_eos=True):
                if first is None and chunk.token_ids:
                    first = time.monotonic()
            assert first is not None
            with lock:
                times.append((sent, first))

    try:
        with Client(server.target) as client:
            threads = [threading.Thread(target=client_loop, args=(client, k)) for k in range(CLIENTS)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=150)
            metrics = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    finally:
        server.stop()
    assert len(times) == REQUESTS, f"{len(times)} of {REQUESTS} served in time"
    # a request sent later (by more than a scheduling blink) that got its first token earlier overtook it;
    # rows in flight on the two workers beside it may, nothing else
    overtaken = [sum(1 for s2, f2 in times if s2 > sent + 0.05 and f2 < first) for sent, first in times]
    assert max(overtaken) < CLIENTS, sorted(overtaken)
    waits = [
        line for line in metrics.splitlines() if line.startswith("adapterserve_queue_wait_seconds_count")
    ]
    assert waits and float(waits[0].split()[-1]) == REQUESTS
