"""Structured output in the engine (structured.py): grammar rows mixed with free rows and adapters in one
batch, on the tiny model with its real (byte-level BPE) tokenizer."""

from __future__ import annotations

import dataclasses
import json

import jsonschema
import pytest
import torch

from adapterserve.server.engine.offline import OfflineEngine
from adapterserve.server.engine.structured import GrammarMasks, RowGrammar
from adapterserve.server.engine.types import FinishReason, StructuredKind, StructuredOutput
from adapterserve.server.errors import InvalidArgumentError
from adapterserve.server.model.loading import load_base_model
from adapterserve.server.settings import EngineSettings
from tests.helpers.peft_refs import make_adapter

SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"},
        "tag": {"type": "string", "maxLength": 6},
    },
    "required": ["color", "count", "ok", "tag"],
    "additionalProperties": False,
}
JSON_SCHEMA = StructuredOutput(StructuredKind.JSON_SCHEMA, json.dumps(SCHEMA))
SETTINGS = EngineSettings(max_batch_size=16, max_seq_len=128, adapter_slots=2)


@pytest.fixture(scope="module")
def lora_dir(tiny_model_dir, tmp_path_factory):
    return make_adapter(tiny_model_dir, "lora_qv_r4", tmp_path_factory.mktemp("a") / "lora")


@pytest.fixture()
def engine(tiny_model_dir, lora_dir):
    engine = OfflineEngine(load_base_model(tiny_model_dir, quantize="none", device="cpu"), SETTINGS)
    engine.add_adapter("lora", lora_dir)
    return engine


def _free_rows(engine, n=3):
    return [
        engine.request([9 + i, 6, 7, 8], adapter=None if i else "lora", max_new_tokens=12) for i in range(n)
    ]


def test_every_output_under_a_schema_parses_and_validates_mixed_with_free_rows_and_adapters(engine):
    structured = []
    for i in range(10):
        sampling = {"temperature": 0.0} if i % 2 == 0 else {"temperature": 1.0, "seed": i, "top_p": 0.9}
        request = engine.request(
            [5 + i, 6, 7, 8], adapter="lora" if i % 3 == 0 else None, max_new_tokens=60, **sampling
        )
        structured.append(dataclasses.replace(request, structured=JSON_SCHEMA))
    any_object = [
        dataclasses.replace(
            engine.request([20 + i, 7], max_new_tokens=60),
            structured=StructuredOutput(StructuredKind.JSON_OBJECT),
        )
        for i in range(2)
    ]
    free = _free_rows(engine)
    results = engine.generate(structured + any_object + free)
    for result in results[: len(structured)]:
        assert result.error is None
        assert result.finish_reason in (FinishReason.STOP, FinishReason.EOS), result.text
        jsonschema.validate(json.loads(result.text), SCHEMA)
    for result in results[len(structured) : len(structured) + len(any_object)]:
        if result.finish_reason is not FinishReason.LENGTH:  # a free object may run to max_tokens
            assert isinstance(json.loads(result.text), dict)
        assert result.text.startswith("{")
    # rows without a grammar: the same tokens as in a batch without any grammar row
    alone = engine.generate(_free_rows(engine))
    assert [r.token_ids for r in results[-3:]] == [r.token_ids for r in alone]
    assert engine.core.grammars.cache.compiled == 2  # the schema and "any object", once each


def test_a_schema_that_cannot_compile_is_refused_before_it_is_queued(engine):
    bad = StructuredOutput(
        StructuredKind.JSON_SCHEMA, json.dumps({"type": "object", "properties": {"a": {"type": "strang"}}})
    )
    request = dataclasses.replace(engine.request([5, 6], max_new_tokens=4), structured=bad)
    with pytest.raises(InvalidArgumentError, match="response_format.json_schema: .*strang"):
        engine.submit(request, [])
    assert not engine.core.has_work()
    not_json = StructuredOutput(StructuredKind.JSON_SCHEMA, "[1, 2")
    with pytest.raises(InvalidArgumentError, match="response_format.json_schema: not a JSON schema"):
        engine.submit(dataclasses.replace(request, structured=not_json), [])


def test_compiled_grammars_are_an_lru_keyed_by_schema_text(tiny_base):
    masks = GrammarMasks(tiny_base.tokenizer, frozenset({tiny_base.tokenizer.eos_token_id}), cache_size=2)
    schemas = [
        StructuredOutput(StructuredKind.JSON_SCHEMA, json.dumps({"type": "integer", "maximum": m}))
        for m in (1, 2, 3)
    ]
    first = masks.cache.template(schemas[0])
    assert masks.cache.template(schemas[0]) is first and masks.cache.compiled == 1
    masks.cache.template(schemas[1])
    masks.cache.template(schemas[2])  # evicts schemas[0]
    assert masks.cache.compiled == 3
    assert masks.cache.template(schemas[0]) is not first and masks.cache.compiled == 4
    masks.close()


def test_the_mask_blocks_refused_tokens_and_vocabulary_padding_and_leaves_free_rows_alone(tiny_base):
    tok = tiny_base.tokenizer
    masks = GrammarMasks(tok, frozenset({tok.eos_token_id}))
    digit = StructuredOutput(
        StructuredKind.JSON_SCHEMA, json.dumps({"type": "integer", "minimum": 0, "maximum": 9})
    )
    grammar = masks.row(digit)
    vocab = masks.cache.tokenizer.vocab_size + 40  # the model's logits wider than the tokenizer
    logits = torch.randn(3, vocab)  # [B, V]
    before = logits.clone()
    out = masks.apply(logits, [None, grammar, None])
    assert torch.equal(out[0], before[0]) and torch.equal(out[2], before[2])
    assert not out.isnan().any() and set(out[1][torch.isfinite(out[1])].tolist()) <= set(before[1].tolist())
    allowed = torch.isfinite(out[1]).nonzero().flatten().tolist()
    assert allowed and all(t < vocab - 40 for t in allowed)
    assert {tok.decode([t]) for t in allowed} <= set("0123456789")
    assert isinstance(grammar, RowGrammar)
    masks.close()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_mask_on_cuda_logits_blocks_the_same_tokens_as_on_the_cpu(tiny_base, dtype):
    tok = tiny_base.tokenizer
    masks = GrammarMasks(tok, frozenset({tok.eos_token_id}))
    grammar = masks.row(JSON_SCHEMA)
    logits = torch.randn(2, masks.cache.tokenizer.vocab_size + 7)  # [B, V]
    on_cpu = masks.apply(logits.clone(), [grammar, None])
    on_cuda = masks.apply(logits.to("cuda", dtype), [grammar, None]).cpu()
    assert torch.equal(torch.isfinite(on_cuda), torch.isfinite(on_cpu))
    assert torch.equal(on_cuda[1], logits[1].to(dtype))
    masks.close()
