"""The stages pt and dpo on the tiny model: they lower their own loss, their saved adapters score the
same through the server's engine as through PEFT, DPO makes the adapter prefer `chosen` on held-out
pairs, bad data is refused naming the line, and every stage x method pair trains or is refused clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapterserve.training import TrainSettings, train
from adapterserve.training.errors import DataFormatError, TrainingError
from adapterserve.training.output import read_manifest
from adapterserve.training.perplexity import ScoreEvaluator, eval_items
from adapterserve.training.preference import read_pairs
from adapterserve.training.settings import METHODS

DOCS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Translate to French: hello world -> bonjour le monde.",
    "The capital of France is Paris.\nTranslate to French: hello -> bonjour.",
]
GOOD, BAD = ["I love this movie", "what a great day"], ["I hate rain", "a bad sad text"]


def _pairs(texts_good, texts_bad):
    out = []
    for g in texts_good:
        out.append({"prompt": f"Classify: {g} ->", "chosen": " positive", "rejected": " negative"})
    for b in texts_bad:
        out.append({"prompt": f"Classify: {b} ->", "chosen": " negative", "rejected": " positive"})
    return out


@pytest.fixture(scope="module")
def pt_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("pt")
    train_txt = root / "train.txt"
    train_txt.write_text("\n\n".join(DOCS * 4) + "\n")  # blank-line separated documents
    held = root / "eval.jsonl"
    held.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[:2]))
    return train_txt, held


@pytest.fixture(scope="module")
def dpo_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    train_file, held = root / "train.jsonl", root / "eval.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in _pairs(GOOD, BAD) * 2))
    chat = {
        "prompt": [{"role": "user", "content": "Classify: I love this movie"}],
        "chosen": [{"role": "assistant", "content": "positive"}],
        "rejected": [{"role": "assistant", "content": "negative"}],
    }
    held.write_text("".join(json.dumps(r) + "\n" for r in [*_pairs(GOOD, BAD), chat]))
    return train_file, held


@pytest.mark.parametrize("method", ["lora", "dora"])  # dora: served by the engine too
def test_pt_lowers_its_loss_and_held_out_perplexity_served_as_peft(fresh_base, pt_files, tmp_path, method):
    train_txt, held = pt_files
    settings = TrainSettings(
        stage="pt", method=method, max_steps=8, batch_size=4, max_length=16, learning_rate=1e-2
    )
    result = train(settings, train_txt, tmp_path / "pt", eval_file=held, base=fresh_base)
    steps = result.loop.step_losses.steps
    assert steps[-1][1] < steps[0][1]
    m = read_manifest(tmp_path / "pt")
    assert m.stage == "pt" and m.train_examples > 4
    base_ppl, adapter_ppl = m.eval_base_perplexity, m.eval_adapter_perplexity
    assert base_ppl.backend == adapter_ppl.backend == "engine"
    assert adapter_ppl.perplexity < base_ppl.perplexity
    # The saved adapter, served by the engine, scores exactly as PEFT's forward of the trained model.
    items = eval_items(held, fresh_base.tokenizer, 16, None)
    served = ScoreEvaluator(fresh_base, items, "engine").score_output(tmp_path / "pt", method, result.model)
    peft = ScoreEvaluator(fresh_base, items, "peft").score_output(tmp_path / "pt", method, result.model)
    assert [v for s in served for v in s] == pytest.approx([v for s in peft for v in s], abs=1e-4)


def test_dpo_prefers_chosen_on_held_out_pairs_and_serves_as_peft(fresh_base, dpo_files, tmp_path):
    train_file, held = dpo_files
    settings = TrainSettings(
        stage="dpo", method="lora", max_steps=12, batch_size=4, learning_rate=5e-2, max_length=64
    )
    result = train(settings, train_file, tmp_path / "dpo", eval_file=held, base=fresh_base)
    steps = result.loop.step_losses.steps
    assert steps[-1][1] < steps[0][1]
    assert "ref" not in result.model.peft_config  # reference = adapter disabled, not a frozen copy
    m = read_manifest(tmp_path / "dpo")
    base_pref, adapter_pref = m.eval_base_preference, m.eval_adapter_preference
    assert adapter_pref.pairs == 5 and adapter_pref.backend == "engine"
    assert adapter_pref.mean_margin > base_pref.mean_margin + 1.0
    assert adapter_pref.accuracy > base_pref.accuracy and adapter_pref.accuracy >= 0.8
    tok = fresh_base.tokenizer
    items = [
        (
            list(tok("Classify: I hate rain ->")["input_ids"]),
            list(tok(" negative", add_special_tokens=False)["input_ids"]),
        )
    ]
    served = ScoreEvaluator(fresh_base, items, "engine").score_output(tmp_path / "dpo", "lora", result.model)
    peft = ScoreEvaluator(fresh_base, items, "peft").score_output(tmp_path / "dpo", "lora", result.model)
    assert served[0] == pytest.approx(peft[0], abs=1e-4)


@pytest.mark.parametrize(
    "record,message",
    [
        ({"prompt": "p", "chosen": "a"}, "line 2: missing 'rejected'"),
        ({"prompt": "p", "chosen": "  ", "rejected": "b"}, "line 2: 'chosen' is empty"),
        ({"prompt": "", "chosen": "a", "rejected": "b"}, "line 2: 'prompt' must be a non-empty"),
    ],
)
def test_bad_preference_data_is_refused_naming_the_line(tmp_path, record, message):
    path = tmp_path / "prefs.jsonl"
    path.write_text(
        json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n" + json.dumps(record) + "\n"
    )
    with pytest.raises(DataFormatError, match=message):
        read_pairs(path)


def test_bad_pt_data_is_refused_naming_the_line(tmp_path, fresh_base):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": ""}) + "\n")
    with pytest.raises(DataFormatError, match="line 2: 'text' must be a non-empty string"):
        train(TrainSettings(stage="pt", max_steps=1), path, tmp_path / "o", base=fresh_base)


@pytest.mark.parametrize("stage", ["pt", "dpo"])
@pytest.mark.parametrize("method", METHODS)
def test_every_stage_and_method_trains_or_is_refused_clearly(
    stage, method, tiny_model_dir, pt_files, dpo_files, tmp_path
):
    from adapterserve.server.model.loading import load_base_model

    data = pt_files[0] if stage == "pt" else dpo_files[0]
    values = {"stage": stage, "method": method, "max_steps": 1, "batch_size": 4, "max_length": 32}
    if method == "adalora":
        values.update(adalora_tinit=0, adalora_tfinal=0)
    if stage == "dpo" and method == "sft":
        with pytest.raises(ValueError, match="second copy of the model"):
            TrainSettings(**values)
        return
    if stage == "dpo" and method == "bottleneck":  # built by this project, not a PEFT adapter
        with pytest.raises(ValueError, match="not a PEFT method"):
            TrainSettings(**values)
        return
    if stage == "dpo" and method in ("prompt-tuning", "p-tuning", "prefix-tuning"):
        with pytest.raises(ValueError, match="not prompt-learning methods"):  # before anything loads
            TrainSettings(**values)
        return
    settings = TrainSettings(**values)
    base = load_base_model(tiny_model_dir, quantize="nf4" if method == "qlora" else "none", device="cpu")
    out = tmp_path / "out"
    try:
        result = train(settings, data, out, base=base)
    except TrainingError as exc:  # pragma: no cover - shows which pair failed and why
        pytest.fail(f"{stage} x {method}: {exc}")
    assert result.manifest.steps == 1 and result.manifest.stage == stage
    assert Path(out).is_dir()


def test_preference_file_that_is_not_utf8_is_refused_naming_the_line(tmp_path):
    from adapterserve.training.errors import DataFormatError
    from adapterserve.training.preference import read_pairs

    path = tmp_path / "pairs.jsonl"
    good = b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n'
    path.write_bytes(good + b'{"prompt": "\xff", "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(DataFormatError, match="line 2: not UTF-8"):
        read_pairs(path)
