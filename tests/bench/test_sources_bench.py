"""`adapterserve bench --served --source-adapters N` runs end to end on the tiny model against a real
local S3-compatible store: every Zipf and hot wave answered, fetches counted, shares of the tiers."""

from __future__ import annotations

import argparse
import json
import random

import pytest

from adapterserve.bench.cli import add_bench_arguments, run_bench
from adapterserve.bench.sources import HOT, zipf_names

pytestmark = pytest.mark.timeout(600)


def test_zipf_popularity_follows_the_rank():
    names = [f"a{i}" for i in range(1000)]
    picks = zipf_names(names, 20_000, random.Random(0))
    counts = [picks.count(n) for n in names[:3]]
    assert counts[0] > counts[1] > counts[2]
    # P(first) = 1 / H(1000, 1.1) = 0.179 for s = 1.1
    assert 0.165 < counts[0] / len(picks) < 0.195
    assert len(set(picks)) > 300  # the long tail is drawn too


def test_source_workload_end_to_end(tiny_model_dir, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    out = tmp_path / "report.json"
    args = parser.parse_args(
        [
            "--base-model", str(tiny_model_dir), "--workdir", str(tmp_path / "w"), "--json", str(out),
            "--served", "--source-adapters", str(HOT + 40), "--requests", "8", "--max-new-tokens", "2",
            "--source-waves", "2",
        ]
    )  # fmt: skip
    assert run_bench(args) == 0
    report = json.loads(out.read_text())
    assert len(report["zipf_waves_tokens_per_s"]) == 2 and len(report["hot_waves_tokens_per_s"]) == 2
    assert report["hot_tokens_per_s"] > 0 and report["zipf_steady_tokens_per_s"] > 0
    assert report["fetches"] >= HOT + 1  # the hot ones, the first-use samples and the Zipf tail
    assert report["first_use_overhead_ms_p50"] > 0
    shares = report["tier_hit_rates"]
    assert abs(sum(shares.values()) - 1.0) < 1e-6
    assert report["served"]["sigterm_exit_code"] == 0
    assert "Zipf, last half (steady)" in capsys.readouterr().out
