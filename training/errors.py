"""Errors of the training module. Each message says what is wrong and where (file, line, option)."""

from __future__ import annotations


class TrainingError(Exception):
    """Base of the errors the training module raises on purpose (bad data, bad options)."""


class DataFormatError(TrainingError, ValueError):
    """A training or evaluation record is malformed. The message names the file and the line number
    (line 0: the whole file, e.g. missing or empty; the message then names the file only)."""

    def __init__(self, path: str, line: int, reason: str) -> None:
        super().__init__(f"{path} line {line}: {reason}" if line > 0 else f"{path}: {reason}")
        self.path = path
        self.line = line
        self.reason = reason


class SettingsError(TrainingError, ValueError):
    """A combination of training settings that cannot work (e.g. AdaLoRA schedule longer than training)."""
