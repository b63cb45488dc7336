"""Training data: JSONL records -> token ids with labels only on the completion / assistant tokens.

Two record shapes, one per line:
  {"prompt": "...", "completion": "..."}   raw text: prompt tokens, then completion tokens + EOS
  {"messages": [{"role": ..., "content": ...}, ...]}   the base's chat template; loss on every
                                                        assistant turn (its content and end marker)
Evaluation uses the same records: the prompt is everything before the last completion / assistant
turn, tokenized exactly as a server request would be, and the reference is that completion's text.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adapterserve.training.errors import DataFormatError, SettingsError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value that the loss skips
_ROLES = frozenset({"system", "user", "assistant", "tool"})


@dataclass(frozen=True)
class Record:
    """One validated JSONL line: either prompt/completion text or a chat."""

    line: int
    prompt: str | None = None
    completion: str | None = None
    messages: tuple[dict[str, str], ...] | None = None

    @property
    def is_chat(self) -> bool:
        return self.messages is not None

    @property
    def reference(self) -> str:
        """The text the model should produce: the completion, or the last assistant turn."""
        if self.messages is not None:
            return self.messages[-1]["content"]
        assert self.completion is not None
        return self.completion


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]  # IGNORE_INDEX on prompt tokens


@dataclass(frozen=True)
class EvalExample:
    prompt_ids: tuple[int, ...]  # what a server request would carry (chat template applied for chats)
    reference: str
    line: int


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def _parse_record(obj: Any, path: str, line: int) -> Record:
    if not isinstance(obj, dict):
        raise DataFormatError(path, line, f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        extra = set(obj) - {"messages"}
        if extra:
            raise DataFormatError(
                path, line, f"a chat record has only 'messages'; unexpected {sorted(extra)}"
            )
        return Record(line=line, messages=_parse_messages(obj["messages"], path, line))
    if "prompt" in obj or "completion" in obj:
        for key in ("prompt", "completion"):
            if key not in obj:
                raise DataFormatError(path, line, f"missing {key!r} (a record has 'prompt' and 'completion')")
            if not isinstance(obj[key], str):
                raise DataFormatError(path, line, f"{key!r} must be a string, got {type(obj[key]).__name__}")
        extra = set(obj) - {"prompt", "completion"}
        if extra:
            raise DataFormatError(path, line, f"unexpected keys {sorted(extra)}")
        if not obj["completion"]:
            raise DataFormatError(path, line, "'completion' is empty: nothing to learn")
        return Record(line=line, prompt=obj["prompt"], completion=obj["completion"])
    raise DataFormatError(
        path, line, f"expected keys 'prompt' and 'completion', or 'messages'; got {sorted(obj)}"
    )


def _parse_messages(messages: Any, path: str, line: int) -> tuple[dict[str, str], ...]:
    if not isinstance(messages, list) or not messages:
        raise DataFormatError(path, line, "'messages' must be a non-empty list")
    parsed = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or set(msg) != {"role", "content"}:
            raise DataFormatError(
                path, line, f"messages[{i}] must be an object with 'role' and 'content' only"
            )
        if msg["role"] not in _ROLES:
            raise DataFormatError(path, line, f"messages[{i}] has unknown role {msg['role']!r}")
        if not isinstance(msg["content"], str):
            raise DataFormatError(path, line, f"messages[{i}].content must be a string")
        parsed.append({"role": msg["role"], "content": msg["content"]})
    if parsed[-1]["role"] != "assistant":
        raise DataFormatError(path, line, "the last message must be the assistant's (it is what is learned)")
    if not parsed[-1]["content"]:
        raise DataFormatError(path, line, "the last assistant message is empty: nothing to learn")
    return tuple(parsed)


def read_jsonl(path: str | Path) -> list[tuple[int, Any]]:
    """(line number, parsed JSON) of every non-blank line of a JSONL file; a missing file, bytes that are
    not UTF-8, invalid JSON or no records at all raise DataFormatError naming the line."""
    path_str = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataFormatError(path_str, 0, "file not found") from None
    except UnicodeDecodeError as exc:
        raise DataFormatError(path_str, text_line_of(Path(path), exc.start), "not UTF-8 text") from None
    rows: list[tuple[int, Any]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            rows.append((number, json.loads(raw)))
        except json.JSONDecodeError as exc:
            raise DataFormatError(path_str, number, f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    if not rows:
        raise DataFormatError(path_str, 0, "no records (the file is empty)")
    return rows


def read_records(path: str | Path) -> list[Record]:
    """Read and validate a JSONL file. Blank lines are skipped; any malformed line raises DataFormatError."""
    return [_parse_record(obj, str(path), number) for number, obj in read_jsonl(path)]


def text_line_of(path: Path, byte_offset: int) -> int:
    """1-based line number of a byte offset (for undecodable bytes)."""
    return path.read_bytes()[:byte_offset].count(b"\n") + 1


def _chat_ids(tokenizer: Any, messages: Sequence[dict[str, str]], *, generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(
        list(messages), tokenize=True, add_generation_prompt=generation_prompt, return_dict=False
    )
    return list(ids)


def _text_ids(tokenizer: Any, text: str, *, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def prompt_ids(tokenizer: Any, record: Record) -> list[int]:
    """Token ids of the prompt as a server request would carry them."""
    if record.messages is not None:
        return _chat_ids(tokenizer, record.messages[:-1], generation_prompt=True)
    assert record.prompt is not None
    return _text_ids(tokenizer, record.prompt, special=True)


def tokenize_record(tokenizer: Any, record: Record, path: str, max_length: int) -> TokenizedExample:
    """input_ids and labels for one record; labels are IGNORE_INDEX except on what the model must say."""
    if record.messages is not None:
        if getattr(tokenizer, "chat_template", None) is None:
            raise DataFormatError(path, record.line, "a chat record needs a base model with a chat template")
        ids: list[int] = []
        labels: list[int] = []
        for i, msg in enumerate(record.messages):
            if msg["role"] != "assistant":
                continue
            before = _chat_ids(tokenizer, record.messages[:i], generation_prompt=True) if i else []
            upto = _chat_ids(tokenizer, record.messages[: i + 1], generation_prompt=False)
            if upto[: len(ids)] != ids or upto[: len(before)] != before or len(before) < len(ids):
                raise DataFormatError(
                    path, record.line, "the chat template does not extend earlier turns token by token"
                )
            labels += [IGNORE_INDEX] * (len(before) - len(ids)) + upto[len(before) :]
            ids = upto
    else:
        assert record.prompt is not None and record.completion is not None
        head = _text_ids(tokenizer, record.prompt, special=True)
        tail = _text_ids(tokenizer, record.completion, special=False) + [tokenizer.eos_token_id]
        ids = head + tail
        labels = [IGNORE_INDEX] * len(head) + tail
    if len(ids) > max_length:
        # Keep the end: the completion matters most; cut the prompt from the left.
        ids, labels = ids[-max_length:], labels[-max_length:]
    if all(label == IGNORE_INDEX for label in labels):
        raise DataFormatError(path, record.line, f"no completion token fits in max_length={max_length}")
    return TokenizedExample(input_ids=tuple(ids), labels=tuple(labels))


class SupervisedDataset(torch.utils.data.Dataset):
    """Tokenized training examples; items are dicts of 1-D LongTensors for the collator."""

    def __init__(self, examples: Sequence[TokenizedExample]) -> None:
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ex = self.examples[index]
        return {
            "input_ids": torch.tensor(ex.input_ids, dtype=torch.long),
            "labels": torch.tensor(ex.labels, dtype=torch.long),
        }

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return (self[i] for i in range(len(self)))


def load_training_data(path: str | Path, tokenizer: Any, max_length: int) -> SupervisedDataset:
    records = read_records(path)
    examples = [tokenize_record(tokenizer, r, str(path), max_length) for r in records]
    log.info("read %d training records from %s", len(examples), path)
    return SupervisedDataset(examples)


def split_validation(
    dataset: SupervisedDataset, size: int, seed: int
) -> tuple[SupervisedDataset, SupervisedDataset | None]:
    """(train, validation): `size` examples drawn with `seed` are held out (None when size is 0)."""
    if size == 0:
        return dataset, None
    if size >= len(dataset):
        raise SettingsError(
            f"--val-size {size}: holding out {size} of {len(dataset)} records leaves none to train on"
        )
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:size])
    train = [ex for i, ex in enumerate(dataset.examples) if i not in held]
    val = [dataset.examples[i] for i in sorted(held)]
    return SupervisedDataset(train), SupervisedDataset(val)


def load_eval_data(path: str | Path, tokenizer: Any, limit: int | None = None) -> list[EvalExample]:
    records = read_records(path)
    if limit is not None:
        records = records[:limit]
    return [EvalExample(tuple(prompt_ids(tokenizer, r)), r.reference, r.line) for r in records]


class PadCollator:
    """Right-pads a list of examples: input_ids with pad_id, labels with IGNORE_INDEX; attention_mask 1/0."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        width = max(int(f["input_ids"].numel()) for f in features)
        batch = len(features)
        input_ids = torch.full((batch, width), self.pad_id, dtype=torch.long)  # [B, S]
        labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)  # [B, S]
        attention_mask = torch.zeros((batch, width), dtype=torch.long)  # [B, S]
        for row, f in enumerate(features):
            n = int(f["input_ids"].numel())
            input_ids[row, :n] = f["input_ids"]
            labels[row, :n] = f["labels"]
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
