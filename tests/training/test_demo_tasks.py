"""The demo data generator is deterministic, splits without leaks, and writes valid chat records."""

from __future__ import annotations

import json

from adapterserve.training.data import read_records
from adapterserve.training.demo_tasks import TASKS, make_task, piratify, write_demo_data


def test_same_seed_same_data_and_no_prompt_in_both_splits():
    for task in TASKS:
        train_a, eval_a = make_task(task, train_size=50, eval_size=10)
        train_b, eval_b = make_task(task, train_size=50, eval_size=10)
        assert (train_a, eval_a) == (train_b, eval_b)
        prompts = lambda records: {r["messages"][0]["content"] for r in records}  # noqa: E731
        assert len(prompts(train_a)) == 50 and not prompts(train_a) & prompts(eval_a)


def test_answers_follow_the_task_rules():
    train, _ = make_task("json-extract", train_size=20, eval_size=0)
    for r in train:
        answer = json.loads(r["messages"][1]["content"])
        user = r["messages"][0]["content"]
        assert answer["name"] in user and answer["city"] in user and str(answer["age"]) in user
    train, _ = make_task("sentiment", train_size=20, eval_size=0)
    assert {r["messages"][1]["content"] for r in train} == {"positive", "negative"}
    assert piratify("Hello my friend, is the ship ready?") == "Ahoy me matey, be th' vessel ready? Arr!"


def test_written_files_are_valid_training_data(tmp_path):
    files = write_demo_data(tmp_path, train_size=12, eval_size=4)
    assert len(files) == 2 * len(TASKS)
    for path in files:
        records = read_records(path)
        assert len(records) == (12 if path.name == "train.jsonl" else 4)
        assert all(r.is_chat for r in records)
