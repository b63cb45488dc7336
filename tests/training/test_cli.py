"""The CLI hooks: flags map onto TrainSettings, a run writes adapter + manifest, errors exit 2 with a message."""

from __future__ import annotations

import argparse
import json

import pytest

from adapterserve.training.cli import add_train_arguments, run_train, settings_from_args
from adapterserve.training.output import ADAPTER_FILES, manifest_path


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="adapterserve train")
    add_train_arguments(parser)
    return parser.parse_args(argv)


def test_flags_become_one_settings_object():
    args = _parse(
        [
            "--method", "p-tuning", "--encoder-type", "lstm", "--num-virtual-tokens", "7",
            "--target-modules", "q_proj,k_proj", "--max-steps", "3", "--learning-rate", "0.01",
            "--no-bf16", "--data", "d.jsonl", "--out", "o",
        ]
    )  # fmt: skip
    s = settings_from_args(args)
    assert (s.method, s.encoder_type, s.num_virtual_tokens, s.max_steps) == ("p-tuning", "lstm", 7, 3)
    assert s.target_modules == ("q_proj", "k_proj") and s.learning_rate == 0.01 and s.bf16 is False
    assert s.rank == 8  # not given: the settings default
    assert s.importance_sampling_correction is True  # --stage grpo corrects by default
    off = settings_from_args(_parse(["--no-importance-sampling-correction", "--data", "d", "--out", "o"]))
    assert off.importance_sampling_correction is False
    token = _parse(["--importance-sampling-mode", "token_mask", "--importance-sampling-clip-min", "0.5"])
    assert settings_from_args(token).importance_sampling_mode == "token_mask"
    with pytest.raises(SystemExit):
        _parse(["--importance-sampling-mode", "token"])


def test_compare_subcommand_parses_its_own_options():
    args = _parse(
        ["compare", "--data", "t.jsonl", "--eval", "e.jsonl", "--out-dir", "runs", "--methods", "lora,ia3"]
    )
    assert args.train_mode == "compare" and args.compare_methods == ("lora", "ia3")
    assert str(args.train_data) == "t.jsonl"


def test_cli_trains_and_writes_adapter_and_manifest(tiny_model_dir, pc_file, tmp_path, capsys):
    out = tmp_path / "adapter"
    code = run_train(
        _parse(
            ["--method", "ia3", "--base-model", str(tiny_model_dir), "--device", "cpu", "--max-steps", "2",
             "--data", str(pc_file), "--eval", str(pc_file), "--out", str(out)]
        )
    )  # fmt: skip
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(ADAPTER_FILES)
    manifest = json.loads(manifest_path(out).read_text())
    assert manifest["method"] == "ia3" and manifest["steps"] == 2
    printed = capsys.readouterr().out
    assert "trainable parameters" in printed and "exact match" in printed


def test_cli_reports_malformed_data_with_the_line(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    code = run_train(
        _parse(
            [
                "--base-model",
                str(tiny_model_dir),
                "--device",
                "cpu",
                "--data",
                str(bad),
                "--out",
                str(tmp_path / "o"),
            ]
        )
    )
    assert code == 2
    assert f"{bad} line 2: missing 'completion'" in capsys.readouterr().err


def test_cli_rejects_bad_option_combinations(tmp_path, capsys):
    code = run_train(_parse(["--method", "lora", "--init-text", "hi", "--data", "x", "--out", str(tmp_path)]))
    assert code == 2
    assert "init_text applies to --method prompt-tuning only" in capsys.readouterr().err


def test_cli_needs_data_and_out(capsys):
    assert run_train(_parse(["--method", "lora"])) == 2
    assert "--data and --out are required" in capsys.readouterr().err


def test_upload_uses_the_sdk_client(tiny_model_dir, pc_file, tmp_path, monkeypatch):
    import adapterserve

    calls = []

    class FakeClient:
        def __init__(self, target, admin_token=None):
            calls.append(("init", target, admin_token))

        def upload_adapter(self, path, name, overwrite=False):
            calls.append(("upload", path, name, overwrite))

        def close(self):
            calls.append(("close",))

    monkeypatch.setattr(adapterserve, "Client", FakeClient, raising=False)
    monkeypatch.setenv("ADAPTERSERVE_ADMIN_TOKEN", "secret")
    out = tmp_path / "my-adapter"
    code = run_train(
        _parse(
            ["--method", "lora", "--base-model", str(tiny_model_dir), "--device", "cpu", "--max-steps", "1",
             "--data", str(pc_file), "--out", str(out), "--upload", "127.0.0.1:50051"]
        )
    )  # fmt: skip
    assert code == 0
    assert calls == [
        ("init", "127.0.0.1:50051", "secret"),
        ("upload", str(out), "my-adapter", False),
        ("close",),
    ]


@pytest.mark.parametrize("methods", [("sft", "lora")])
def test_compare_writes_a_table_with_sft_as_reference(tiny_model_dir, pc_file, tmp_path, methods, capsys):
    table = tmp_path / "table.md"
    code = run_train(
        _parse(
            ["compare", "--data", str(pc_file), "--eval", str(pc_file), "--out-dir", str(tmp_path / "runs"),
             "--out-table", str(table), "--methods", ",".join(methods), "--base-model", str(tiny_model_dir),
             "--device", "cpu", "--max-steps", "2", "--title", "Tiny compare"]
        )
    )  # fmt: skip
    assert code == 0
    text = table.read_text()
    first_table = text.split("\n\n| method | started")[0]
    rows = [line for line in first_table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r.split("|")[1].strip() for r in rows] == list(methods)
    assert "whole model (reference)" in rows[0]
    lora_cells = [c.strip() for c in rows[1].split("|")]
    assert lora_cells[3] == f"{2 * (8 * (64 + 64) + 8 * (64 + 32)):,}"  # trainable params of LoRA r=8 q,v
    assert "## Tiny compare" in text and "Base model without training" in text


def test_compare_merge_rebuilds_the_table_from_recorded_rows(tmp_path, capsys):
    from adapterserve.training.compare import CompareRow, write_row

    runs = tmp_path / "runs"
    write_row(
        CompareRow(label="prefix-tuning", method="prefix-tuning", error="stopped at the deadline"), runs
    )
    table = tmp_path / "table.md"
    argv = ["compare", "--data", "t.jsonl", "--eval", "e.jsonl", "--out-dir", str(runs), "--out-table", str(table),
            "--methods", "none", "--merge", "--title", "Rebuilt"]  # fmt: skip
    assert run_train(_parse(argv)) == 0
    assert "| prefix-tuning | **did not finish**: stopped at the deadline |" in table.read_text()
    assert run_train(_parse([*argv[:-3], "--title", "Nothing"])) != 0  # no --merge: nothing to do
