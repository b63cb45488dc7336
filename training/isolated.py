"""Run one training in a fresh Python process and return its manifest.

Used by `adapterserve train compare`: a fresh process per row makes each row's peak memory its own
(a process's resident set never shrinks back to what it was) and frees everything between rows.

    python -m adapterserve.training.isolated --settings '{"method": "lora", ...}' --data T --out DIR [--eval E]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from adapterserve.training.errors import TrainingError
from adapterserve.training.output import TrainManifest, read_manifest
from adapterserve.training.settings import TrainSettings


def train_in_subprocess(
    settings: TrainSettings, train_file: Path, out_dir: Path, eval_file: Path | None = None
) -> TrainManifest:
    """Train in a child process (its log goes to this process's stderr); raise if it fails."""
    command = [
        sys.executable,
        "-m",
        "adapterserve.training.isolated",
        "--settings",
        settings.model_dump_json(),
        "--data",
        str(train_file),
        "--out",
        str(out_dir),
    ]
    if eval_file is not None:
        command += ["--eval", str(eval_file)]
    done = subprocess.run(command, check=False)
    if done.returncode != 0:
        raise TrainingError(f"training {settings.method} in a child process failed (exit {done.returncode})")
    return read_manifest(out_dir)


def main(argv: list[str] | None = None) -> int:
    import logging

    from adapterserve.training.train import train

    parser = argparse.ArgumentParser(prog="python -m adapterserve.training.isolated")
    parser.add_argument("--settings", required=True, help="TrainSettings as JSON")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--eval", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = TrainSettings.model_validate_json(args.settings)
    train(settings, args.data, args.out, eval_file=args.eval, overwrite=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
