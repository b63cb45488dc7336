"""`adapterserve train` (and `adapterserve train compare`): the CLI hooks the SDK's CLI imports lazily.

    adapterserve train --method lora --data train.jsonl --eval eval.jsonl --out adapters/my-task
    adapterserve train compare --data train.jsonl --eval eval.jsonl --out-dir runs/ --out-table docs/x.md

Every TrainSettings field is a flag (`--rank`, `--num-virtual-tokens`, `--max-steps`, ...); a flag left
out keeps the settings default. Also runnable alone: `python -m adapterserve.training ...`.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from adapterserve.training.settings import METHODS, TrainSettings

_PREFIX = "ts_"  # dest prefix of settings flags (keeps them apart from the host CLI's own options)
ADMIN_TOKEN_ENV = "ADAPTERSERVE_ADMIN_TOKEN"


def _unwrap_optional(annotation: Any) -> Any:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else annotation
    return annotation


def _csv(value: str) -> tuple[str, ...]:
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def _add_settings_flags(parser: argparse.ArgumentParser, *, skip: frozenset[str] = frozenset()) -> None:
    group = parser.add_argument_group("training settings (defaults: see docs/training.md)")
    for name, field in TrainSettings.model_fields.items():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        kind = _unwrap_optional(field.annotation)
        help_text = (field.description or "").replace("%", "%%")
        default_note = f" (default: {field.default})" if field.default is not None else ""
        kwargs: dict[str, Any] = {"dest": _PREFIX + name, "default": None, "help": help_text + default_note}
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if "choices" in extra:
            kwargs["choices"] = extra["choices"]
        elif typing.get_origin(kind) is typing.Literal:
            kwargs["choices"] = list(typing.get_args(kind))
        elif kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is tuple:
            kwargs["type"] = _csv
            kwargs["metavar"] = "A,B,..."
        elif kind in (int, float, str):
            kwargs["type"] = kind
            kwargs["metavar"] = name.upper()
        group.add_argument(flag, **kwargs)


def settings_from_args(args: argparse.Namespace, **overrides: Any) -> TrainSettings:
    """TrainSettings from the parsed flags that were given (pydantic defaults for the rest)."""
    values = {
        name[len(_PREFIX) :]: value
        for name, value in vars(args).items()
        if name.startswith(_PREFIX) and value is not None
    }
    values.update(overrides)
    return TrainSettings.model_validate(values)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `adapterserve train` options (and the `compare` sub-command) to `parser`."""
    parser.add_argument(
        "--data",
        dest="train_data",
        type=Path,
        help="training data: sft JSONL (prompt/completion or messages); pt .txt or JSONL 'text'; "
        "dpo JSONL (prompt, chosen, rejected); grpo JSONL (prompt + the fields the rewards read)",
    )
    parser.add_argument(
        "--eval",
        dest="train_eval",
        type=Path,
        help="held-out data of the same form: sft exact match / token F1, pt perplexity, dpo preference",
    )
    parser.add_argument(
        "--out", dest="train_out", type=Path, help="output directory (adapter or, for sft, model)"
    )
    parser.add_argument("--overwrite", dest="train_overwrite", action="store_true", help="replace --out")
    parser.add_argument(
        "--upload", dest="train_upload", metavar="TARGET", help="server to upload to (host:port)"
    )
    parser.add_argument(
        "--upload-name", dest="train_upload_name", help="adapter name (default: --out's name)"
    )
    _add_settings_flags(parser)
    sub = parser.add_subparsers(dest="train_mode", metavar="{compare}")
    compare = sub.add_parser("compare", help="train every method on one task and write a comparison table")
    compare.add_argument("--data", dest="train_data", type=Path, required=True, help="training JSONL")
    compare.add_argument("--eval", dest="train_eval", type=Path, required=True, help="held-out JSONL")
    compare.add_argument(
        "--out-dir", dest="compare_out_dir", type=Path, required=True, help="one subdir per method"
    )
    compare.add_argument(
        "--out-table", dest="compare_out_table", type=Path, help="markdown file for the table"
    )
    compare.add_argument("--title", dest="compare_title", default=None, help="table heading")
    compare.add_argument(
        "--methods",
        dest="compare_methods",
        type=_csv,
        default=METHODS,
        help=f"default: {','.join(METHODS)} (dora = LoRA with --use-dora; none = only --lora-ranks rows)",
    )
    compare.add_argument(
        "--lora-ranks",
        dest="compare_lora_ranks",
        type=_csv,
        default=(),
        metavar="R,R,...",
        help="extra LoRA rows at these ranks (alpha scaled with the rank: alpha/rank stays --alpha/--rank)",
    )
    compare.add_argument(
        "--jobs", dest="compare_jobs", type=int, default=1, help="rows trained at the same time (default 1)"
    )
    compare.add_argument(
        "--merge",
        dest="compare_merge",
        action="store_true",
        help="the table also holds the rows recorded under --out-dir by earlier runs (<label>.row.json); "
        "a row trained now replaces its earlier record. With --methods none and no --lora-ranks: "
        "only rebuild the table from the records",
    )
    _add_settings_flags(compare, skip=frozenset({"method"}))


def _setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _fail(message: str) -> int:
    print(f"adapterserve train: error: {message}", file=sys.stderr)
    return 2


def _upload(target: str, path: Path, name: str, overwrite: bool) -> None:
    from adapterserve import Client  # the SDK; imported only when asked to upload

    client = Client(target, admin_token=os.environ.get(ADMIN_TOKEN_ENV))
    try:
        client.upload_adapter(str(path), name, overwrite=overwrite)
    finally:
        close = getattr(client, "close", None)
        if close is not None:
            close()


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _print_summary(result: Any) -> None:
    m = result.manifest
    print(f"saved {m.format} ({m.stage} stage, {m.method}) to {result.out_dir} ({m.bytes_on_disk:,} bytes)")
    print(f"manifest: {result.manifest_path}")
    print(
        f"trainable parameters: {m.trainable_parameters:,} of {m.total_parameters:,} ({m.trainable_percent:.4f}%)"
    )
    print(
        f"steps: {m.steps}, train time: {m.train_seconds:.1f} s, final loss (last step): {_loss(m.final_loss)}, "
        f"mean loss over the run: {_loss(m.mean_train_loss)}"
    )
    if m.eval_base_perplexity is not None and m.eval_adapter_perplexity is not None:
        b, a = m.eval_base_perplexity, m.eval_adapter_perplexity
        print(
            f"held-out perplexity over {a.tokens} tokens ({a.backend}): {b.perplexity:.3f} -> {a.perplexity:.3f}"
        )
    if m.eval_base_preference is not None and m.eval_adapter_preference is not None:
        b, a = m.eval_base_preference, m.eval_adapter_preference
        print(
            f"held-out preference pairs ({a.pairs}, {a.backend}): chosen preferred {b.accuracy:.3f} -> "
            f"{a.accuracy:.3f}, mean log-likelihood margin {b.mean_margin:.3f} -> {a.mean_margin:.3f}"
        )
    if m.grpo is not None:
        g = m.grpo
        last = f"{g.reward_curve[-1][1]:.3f}" if g.reward_curve else "-"
        print(
            f"grpo: {g.pushes} in-place pushes (p50 {g.push_seconds_p50} s) of {g.adapter!r} on "
            f"{g.rollout_server}, now version {g.final_version}; rollouts {g.rollout_tokens_per_second:.1f} tok/s; "
            f"last logged reward {last}"
        )
        if g.importance_sampling_curve:
            worst = max(s.logp_difference_max for s in g.importance_sampling_curve)
            print(
                f"importance sampling ({g.importance_sampling}): last logged ratio mean "
                f"{g.importance_sampling_curve[-1].ratio_mean:.4f}; largest |trainer - server| logprob {worst:.3g}"
            )
        if g.eval_base_reward is not None and g.eval_adapter_reward is not None:
            print(f"held-out reward (greedy): {g.eval_base_reward:.3f} -> {g.eval_adapter_reward:.3f}")
    if m.eval_base is not None and m.eval_adapter is not None:
        print(
            f"eval on {m.eval_adapter.examples} examples: exact match {m.eval_base.exact_match:.3f} -> "
            f"{m.eval_adapter.exact_match:.3f}, token F1 {m.eval_base.token_f1:.3f} -> {m.eval_adapter.token_f1:.3f}"
        )


def run_train(args: argparse.Namespace) -> int:
    """Run what the parsed `adapterserve train` flags ask for; returns the process exit code."""
    from adapterserve.server.errors import ModelLoadError
    from adapterserve.training.errors import TrainingError

    _setup_logging()
    try:
        if getattr(args, "train_mode", None) == "compare":
            return _run_compare(args)
        if args.train_data is None or args.train_out is None:
            return _fail("--data and --out are required (or use `adapterserve train compare`)")
        settings = settings_from_args(args)
        from adapterserve.training.train import train

        result = train(
            settings,
            args.train_data,
            args.train_out,
            eval_file=args.train_eval,
            overwrite=args.train_overwrite,
        )
        _print_summary(result)
        if args.train_upload:
            if settings.method == "sft":
                return _fail("sft produces a whole model, not an adapter; it cannot be uploaded")
            name = args.train_upload_name or args.train_out.name
            _upload(args.train_upload, args.train_out, name, args.train_overwrite)
            print(f"uploaded to {args.train_upload} as {name!r}")
        return 0
    except ValidationError as exc:
        return _fail(str(exc))
    except (TrainingError, ModelLoadError) as exc:
        return _fail(str(exc))


def _run_compare(args: argparse.Namespace) -> int:
    from adapterserve.training.compare import (
        load_rows,
        machine_description,
        merge_rows,
        method_row,
        rank_rows,
        render_markdown,
        run_compare,
        write_table_into,
    )

    choices = (*METHODS, "none")
    unknown = [m for m in args.compare_methods if m not in choices]
    if unknown:
        return _fail(f"unknown methods {unknown}; choose from {', '.join(choices)}")
    try:
        ranks = [int(r) for r in args.compare_lora_ranks]
    except ValueError:
        return _fail(f"--lora-ranks: expected integers, got {','.join(args.compare_lora_ranks)}")
    # The shared options are checked once here; --init-text belongs to the prompt-tuning row only.
    shared = settings_from_args(args, method="prompt-tuning" if args.ts_init_text else "lora")
    specs = [method_row(m) for m in args.compare_methods if m != "none"]  # none: --lora-ranks rows only
    specs += rank_rows(ranks, alpha_per_rank=shared.alpha / shared.rank)
    title = args.compare_title or f"Methods compared on {args.train_data}"
    argv = sys.argv[sys.argv.index("compare") :] if "compare" in sys.argv else None
    command = "adapterserve train " + " ".join(shlex.quote(a) for a in argv) if argv else None
    machine = machine_description(shared)
    earlier = load_rows(args.compare_out_dir) if args.compare_merge else []
    if not specs and not earlier:
        return _fail("nothing to do: no rows to train (--methods none, no --lora-ranks) and none recorded")

    def write_table(rows: list[Any]) -> str:
        done = f" ({len(rows)} of {len(specs)} rows so far)" if len(rows) < len(specs) else ""
        failed = [r.label for r in rows if r.error is not None]
        if failed:
            done += f" ({', '.join(failed)} did not finish)"
        table = render_markdown(
            merge_rows(earlier, rows), title=title + done, command=command, machine=machine
        )
        if args.compare_out_table is not None:
            write_table_into(args.compare_out_table, table)
        return table

    rows = run_compare(
        shared,
        args.train_data,
        args.train_eval,
        args.compare_out_dir,
        specs,
        on_row=write_table,
        jobs=args.compare_jobs,
        command=command,
    )
    print(write_table(rows))
    if args.compare_out_table is not None:
        print(f"wrote {args.compare_out_table}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="adapterserve train", description="Train an adapter (or compare methods)."
    )
    add_train_arguments(parser)
    return run_train(parser.parse_args(argv))
