"""Continued-pretraining data (`--stage pt`): raw text -> token blocks of `max_length`, loss on every token.

Accepted files:
  .txt    one document per line, or, when the file has blank lines, documents separated by blank lines
          (a document then spans several lines, joined with newlines)
  .jsonl  one object a line with a non-empty string `text` (other keys are ignored)
Each document is tokenized with the tokenizer's special tokens (e.g. BOS) and ends with EOS; the
documents are concatenated and cut into blocks of `max_length` tokens (the last block may be
shorter), so no token is padding and none is masked.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterserve.training.data import SupervisedDataset, TokenizedExample
from adapterserve.training.errors import DataFormatError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Document:
    line: int  # where it starts in the file (1-based)
    text: str


def read_documents(path: str | Path) -> list[Document]:
    """Documents of a .txt or .jsonl file; raises DataFormatError naming the line of a bad record."""
    p, name = Path(path), str(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataFormatError(name, 0, "file not found") from None
    except UnicodeDecodeError as exc:
        line = p.read_bytes()[: exc.start].count(b"\n") + 1
        raise DataFormatError(name, line, "not UTF-8 text") from None
    lines = text.splitlines()
    docs = _jsonl_documents(name, lines) if p.suffix == ".jsonl" else _text_documents(lines)
    if not docs:
        raise DataFormatError(name, 0, "no documents (the file is empty)")
    return docs


def _jsonl_documents(name: str, lines: list[str]) -> list[Document]:
    docs = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise DataFormatError(name, number, f"invalid JSON: {exc.msg} (column {exc.colno})") from None
        if not isinstance(obj, dict) or "text" not in obj:
            raise DataFormatError(name, number, "expected an object with a 'text' field (--stage pt)")
        if not isinstance(obj["text"], str) or not obj["text"].strip():
            raise DataFormatError(name, number, "'text' must be a non-empty string")
        docs.append(Document(number, obj["text"]))
    return docs


def _text_documents(lines: list[str]) -> list[Document]:
    if not any(not line.strip() for line in lines):  # no blank line: one document per line
        return [Document(i, line) for i, line in enumerate(lines, start=1)]
    docs, start, current = [], 0, []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            if not current:
                start = number
            current.append(line)
        elif current:
            docs.append(Document(start, "\n".join(current)))
            current = []
    if current:
        docs.append(Document(start, "\n".join(current)))
    return docs


def document_ids(tokenizer: Any, doc: Document) -> list[int]:
    """A document's tokens: with the tokenizer's special tokens, then EOS."""
    ids = list(tokenizer(doc.text, add_special_tokens=True)["input_ids"])
    return ids + [tokenizer.eos_token_id]


def pack_blocks(token_stream: list[int], block: int) -> list[list[int]]:
    """Consecutive blocks of `block` tokens (the last one may be shorter, but has at least 2)."""
    blocks = [token_stream[i : i + block] for i in range(0, len(token_stream), block)]
    return [b for b in blocks if len(b) >= 2]


def load_pretraining_data(path: str | Path, tokenizer: Any, max_length: int) -> SupervisedDataset:
    """Packed blocks with labels == input_ids (the model shifts them: every token is predicted)."""
    stream: list[int] = []
    docs = read_documents(path)
    for doc in docs:
        stream += document_ids(tokenizer, doc)
    blocks = pack_blocks(stream, max_length)
    log.info(
        "read %d documents (%d tokens) from %s: %d blocks of <= %d",
        len(docs),
        len(stream),
        path,
        len(blocks),
        max_length,
    )
    return SupervisedDataset([TokenizedExample(tuple(b), tuple(b)) for b in blocks])
