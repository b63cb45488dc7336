"""`adapterserve bench` runs end to end on a tiny model and reports every run with its ratio."""

from __future__ import annotations

import json

from adapterserve.bench.cli import add_bench_arguments, run_bench


def test_bench_reports_engine_and_baselines(tiny_model_dir, tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    out = tmp_path / "report.json"
    args = parser.parse_args(
        [
            "--base-model",
            str(tiny_model_dir),
            "--requests",
            "6",
            "--adapters",
            "3",
            "--max-new-tokens",
            "4",
            "--naive-requests",
            "2",
            "--workdir",
            str(tmp_path / "w"),
            "--json",
            str(out),
        ]
    )
    assert run_bench(args) == 0
    report = json.loads(out.read_text())
    names = [r["name"] for r in report["results"]]
    assert names[0] == "engine, base only" and report["results"][0]["vs_base_only"] == 1.0
    assert any("over 3 lora adapters" in n for n in names)
    assert any("static batch" in n for n in names) and any("naive PEFT" in n for n in names)
    engine_rows = report["results"][:2]
    assert all(r["tokens"] == 6 * 4 for r in engine_rows)
    assert "tok/s" in capsys.readouterr().out
