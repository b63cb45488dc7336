"""Incremental detokenization with stop sequences.

Each step decodes the generated ids and releases only text that is final: not a trailing incomplete
UTF-8 character (the replacement char), and not a tail that could still become a stop sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TextTracker:
    tokenizer: object
    stop: tuple[str, ...]
    eos_ids: frozenset[int]
    ids: list[int] = field(default_factory=list)  # generated ids without EOS
    emitted: int = 0  # characters of the decoded text already released
    stopped: bool = False

    def _decode(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)  # type: ignore[attr-defined]

    def push(self, token_id: int) -> str:
        """Add a token; returns newly final text. Sets `stopped` when a stop sequence matched."""
        if token_id in self.eos_ids:
            return ""
        self.ids.append(token_id)
        text = self._decode()
        if self.stop:
            hits = [text.find(s, max(0, self.emitted - len(s) + 1)) for s in self.stop]
            hits = [h for h in hits if h >= 0]
            if hits:
                self.stopped = True
                end = min(hits)
                delta = text[self.emitted : end]
                self.emitted = max(self.emitted, end)
                return delta
        safe = len(text)
        if text.endswith("\ufffd"):
            safe = len(text.rstrip("\ufffd"))
        for s in self.stop:  # hold back a tail that is a prefix of a stop sequence
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    safe = min(safe, len(text) - k)
                    break
        if safe <= self.emitted:
            return ""
        delta = text[self.emitted : safe]
        self.emitted = safe
        return delta

    def flush(self) -> str:
        """All text not yet released (at the end of a request that did not stop on a stop sequence)."""
        if self.stopped:
            return ""
        text = self._decode()
        delta = text[self.emitted :]
        self.emitted = len(text)
        return delta
