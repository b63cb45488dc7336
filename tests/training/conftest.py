"""Fixtures of the training tests: small JSONL files and fresh (unshared) tiny bases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

# Short, repetitive pairs the tiny model can fit within a few steps.
PAIRS = [
    ("Classify: I love this movie ->", " positive"),
    ("Classify: I hate rain ->", " negative"),
    ("Classify: what a great day ->", " positive"),
    ("Classify: a bad sad text ->", " negative"),
]
CHATS = [
    [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris"},
    ],
    [{"role": "user", "content": "What is the capital of Italy?"}, {"role": "assistant", "content": "Rome"}],
    [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "bonjour"},
        {"role": "user", "content": "world"},
        {"role": "assistant", "content": "monde"},
    ],
]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="session")
def pc_file(tmp_path_factory) -> Path:
    """prompt/completion records (8 lines: the pairs twice)."""
    path = tmp_path_factory.mktemp("data") / "pc.jsonl"
    return write_jsonl(path, [{"prompt": p, "completion": c} for p, c in PAIRS * 2])


@pytest.fixture(scope="session")
def chat_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "chat.jsonl"
    return write_jsonl(path, [{"messages": m} for m in CHATS])


@pytest.fixture
def fresh_base(tiny_model_dir):
    """A tiny base of its own (training modifies the model it is given; tiny_base is shared)."""
    from adapterserve.server.model.loading import load_base_model

    return load_base_model(tiny_model_dir, quantize="none", device="cpu")


@pytest.fixture(scope="module")
def peaked_model_dir(tmp_path_factory) -> Path:
    """A tiny model whose lm_head is scaled up so that its next-token distribution is peaked (a random
    tiny model samples almost uniformly over its vocabulary, and no GRPO reward moves that in a few
    steps)."""
    import torch
    from transformers import AutoModelForCausalLM

    from tests.helpers.tiny_model import make_tiny_model_dir

    path = make_tiny_model_dir(tmp_path_factory.mktemp("peaked"))
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.lm_head.weight.mul_(6.0)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def rollout_server(peaked_model_dir):
    """An adapterserve server on peaked_model_dir, in this process (GRPO's rollouts and pushes)."""
    from adapterserve.training.local_server import LocalServer

    server = LocalServer(str(peaked_model_dir), "cpu")
    server.start()
    yield server
    server.stop()
