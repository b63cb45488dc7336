"""Time one sampling step: `sample_rows` over 64 rows of a 49,152-token vocabulary at temperature 0.8,
top_p 0.9, top_k 50, each row with a 500-token history for its penalties; the median of 9 calls.

    OMP_NUM_THREADS=1 python scripts/ab/sample_rows_time.py
"""

from __future__ import annotations

import statistics
import time

import torch

from adapterserve.server.engine.row_sampler import RowSampler
from adapterserve.server.engine.sampling import sample_rows
from adapterserve.server.engine.types import SamplingParams


def main() -> None:
    logits = torch.randn(64, 49152, generator=torch.Generator().manual_seed(0)) * 3
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=50)
    rows = [RowSampler.create(params, tuple(range(0, 20000, 40)), torch.device("cpu")) for _ in range(64)]
    sample_rows(logits, rows)  # warm-up
    times = []
    for _ in range(9):
        start = time.perf_counter()
        sample_rows(logits, rows)
        times.append(time.perf_counter() - start)
    print(f"{statistics.median(times) * 1e3:.1f} ms per step (median of 9)")


if __name__ == "__main__":
    main()
