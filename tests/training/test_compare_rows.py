"""The rows of `adapterserve train compare`: DoRA and LoRA-rank rows become the settings they name."""

from __future__ import annotations

from adapterserve.training.compare import method_row, rank_rows, settings_for
from adapterserve.training.settings import TrainSettings


def test_dora_row_is_the_served_dora_method():
    """DoRA is a method of its own (served by the engine): its row trains and scores it as such."""
    shared = TrainSettings(method="prompt-tuning", init_text="Answer:", max_steps=5)
    s = settings_for(method_row("dora"), shared)
    assert (s.method, s.use_dora, s.eval_backend, s.init_text) == ("dora", False, "auto", None)
    assert settings_for(method_row("prompt-tuning"), shared).init_text == "Answer:"


def test_rank_rows_keep_alpha_over_rank():
    shared = TrainSettings(method="lora", rank=8, alpha=16)
    rows = rank_rows([1, 2, 16], alpha_per_rank=shared.alpha / shared.rank)
    settings = [settings_for(r, shared) for r in rows]
    assert [r.label for r in rows] == ["lora r=1", "lora r=2", "lora r=16"]
    assert [(s.rank, s.alpha) for s in settings] == [(1, 2.0), (2, 4.0), (16, 32.0)]


def _row(label, method=None, **values):
    from adapterserve.training.compare import CompareRow

    measured = dict(
        peft_type="LORA", trainable_parameters=10, total_parameters=1000, trainable_percent=1.0,
        bytes_on_disk=2000, peak_memory_bytes=3_000_000, peak_memory_measure="process_peak_rss",
        train_seconds=1.5, wall_seconds=2.5, steps=5, stop_reason="plateau", final_loss=0.1,
        best_val_loss=0.2, exact_match=1.0, token_f1=1.0, eval_backend="engine",
        base_exact_match=0.0, base_token_f1=0.1, started_at="2026-01-01 00:00:00 UTC",
        load_before=(1.0, 2.0, 3.0), load_after=(0.5, 1.5, 2.5), jobs=2, omp_threads="1", command="cmd A",
    )  # fmt: skip
    measured.update(values)
    return CompareRow(label=label, method=method or label.split(" ")[0], **measured)


def test_row_records_round_trip_and_merge_in_table_order(tmp_path):
    from adapterserve.training.compare import load_rows, merge_rows, write_row

    for row in [_row("lora r=16"), _row("ia3"), _row("lora r=2"), _row("sft"), _row("lora")]:
        write_row(row, tmp_path)
    old = load_rows(tmp_path)
    assert [r.label for r in old] == ["sft", "lora", "ia3", "lora r=2", "lora r=16"]
    assert old[0] == _row("sft")  # tuples (load averages) survive the JSON round trip
    new = [_row("ia3", steps=9, command="cmd B"), _row("lora", error="exit 1"), _row("dora", error="exit 1")]
    merged = {r.label: r for r in merge_rows(old, new)}
    assert merged["ia3"].steps == 9  # a re-measured row replaces its old record
    assert merged["lora"].error is None  # a failed re-run does not hide a measured row
    assert merged["dora"].error == "exit 1"  # a row that never finished is shown as such
    assert [r.label for r in merge_rows(old, new)][:4] == ["sft", "lora", "dora", "ia3"]


def test_table_marks_unfinished_rows_and_says_when_and_how_each_was_measured():
    from adapterserve.training.compare import render_markdown

    rows = [_row("sft"), _row("ia3", command="cmd B"), _row("prefix-tuning", error="stopped at the deadline")]
    text = render_markdown(rows, title="T")
    lines = text.splitlines()
    unfinished = next(line for line in lines if line.startswith("| prefix-tuning |"))
    assert "did not finish**: stopped at the deadline" in unfinished
    assert unfinished.count("|") == lines[lines.index(unfinished) - 1].count("|")  # same columns
    assert "```\ncmd A\n```" in text and "```\ncmd B\n```" in text
    when = [line for line in lines if line.startswith("| ia3 |")][-1]
    assert "1.00 / 2.00 / 3.00" in when and "0.50 / 1.50 / 2.50" in when and when.endswith("| 2 |")


def test_table_replaces_only_the_text_between_the_markers(tmp_path):
    from adapterserve.training.compare import TABLE_END, TABLE_START, write_table_into

    doc = tmp_path / "doc.md"
    doc.write_text(f"# Intro\n\nprose\n\n{TABLE_START}\nold table\n{TABLE_END}\n\nmore prose\n")
    write_table_into(doc, "new table\n")
    assert doc.read_text() == f"# Intro\n\nprose\n\n{TABLE_START}\nnew table\n{TABLE_END}\n\nmore prose\n"
    fresh = tmp_path / "fresh.md"
    write_table_into(fresh, "only the table\n")
    assert fresh.read_text() == "only the table\n"
