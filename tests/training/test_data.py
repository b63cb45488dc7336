"""Data reading: both record shapes, labels only on what the model must say, errors that name the line."""

from __future__ import annotations

import json

import pytest

from adapterserve.training.data import (
    IGNORE_INDEX,
    PadCollator,
    SupervisedDataset,
    load_eval_data,
    load_training_data,
    read_records,
    tokenize_record,
)
from adapterserve.training.errors import DataFormatError


def test_prompt_completion_labels_cover_completion_and_eos(tiny_base, pc_file):
    tok = tiny_base.tokenizer
    ds = load_training_data(pc_file, tok, max_length=128)
    ex = ds.examples[0]
    prompt_len = len(tok("Classify: I love this movie ->")["input_ids"])
    assert all(label == IGNORE_INDEX for label in ex.labels[:prompt_len])
    learned = [t for t in ex.labels if t != IGNORE_INDEX]
    assert learned[-1] == tok.eos_token_id
    assert tok.decode(learned[:-1]) == " positive"
    assert list(ex.input_ids[prompt_len:]) == learned


def test_chat_labels_cover_every_assistant_turn_only(tiny_base, chat_file):
    tok = tiny_base.tokenizer
    ds = load_training_data(chat_file, tok, max_length=256)
    multi = ds.examples[2]
    learned_text = tok.decode([t for t in multi.labels if t != IGNORE_INDEX])
    assert "bonjour" in learned_text and "monde" in learned_text
    assert "hello" not in learned_text and "world" not in learned_text and "one word" not in learned_text
    # Whole sequence = the chat template of all messages.
    full = tok.apply_chat_template(
        json.loads(chat_file.read_text().splitlines()[2])["messages"], return_dict=False
    )
    assert list(multi.input_ids) == list(full)


def test_eval_prompt_is_what_a_server_request_carries(tiny_base, chat_file):
    tok = tiny_base.tokenizer
    examples = load_eval_data(chat_file, tok)
    first = examples[0]
    expected = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_dict=False,
    )
    assert list(first.prompt_ids) == list(expected)
    assert first.reference == "Paris"
    assert [e.line for e in examples] == [1, 2, 3]


def test_long_examples_are_cut_from_the_left_keeping_the_completion(tiny_base):
    from adapterserve.training.data import Record

    tok = tiny_base.tokenizer
    rec = Record(line=1, prompt="word " * 100, completion=" positive")
    ex = tokenize_record(tok, rec, "x.jsonl", max_length=16)
    assert len(ex.input_ids) == 16
    assert tok.decode([t for t in ex.labels if t != IGNORE_INDEX][:-1]) == " positive"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "a"}', "missing 'completion'"),
        ('{"prompt": "a", "completion": 3}', "'completion' must be a string"),
        ('{"prompt": "a", "completion": "b"', "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"text": "a"}', "expected keys 'prompt' and 'completion', or 'messages'"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "last message must be the assistant's"),
        ('{"messages": [{"role": "robot", "content": "hi"}]}', "unknown role 'robot'"),
        ('{"messages": []}', "non-empty list"),
        ('{"prompt": "a", "completion": ""}', "'completion' is empty"),
    ],
)
def test_malformed_records_name_the_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"prompt": "p", "completion": "c"})
    path.write_text(f"{good}\n\n{good}\n{line}\n{good}\n")
    with pytest.raises(DataFormatError) as info:
        read_records(path)
    assert info.value.line == 4
    assert f"{path} line 4: " in str(info.value)
    assert message in str(info.value)


def test_empty_and_missing_files_are_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataFormatError, match="no records") as info:
        read_records(empty)
    assert str(info.value) == f"{empty}: no records (the file is empty)"  # the file, not "line 0"
    with pytest.raises(DataFormatError, match="file not found"):
        read_records(tmp_path / "missing.jsonl")


def test_collator_pads_right_and_masks(tiny_base, pc_file):
    ds = load_training_data(pc_file, tiny_base.tokenizer, max_length=128)
    batch = PadCollator(pad_id=0)([ds[0], ds[1]])
    n0, n1 = len(ds.examples[0].input_ids), len(ds.examples[1].input_ids)
    width = max(n0, n1)
    assert batch["input_ids"].shape == (2, width)
    assert batch["attention_mask"].sum(dim=1).tolist() == [n0, n1]
    short = 0 if n0 < n1 else 1
    assert (batch["labels"][short, min(n0, n1) :] == IGNORE_INDEX).all()
    assert isinstance(ds, SupervisedDataset) and len(ds) == 8
