"""Hard-prompt templates: validated like any adapter, stored and versioned like one, applied to the
request's tokens at submit (the mixed-batch invariant covers them in a batch with every other kind)."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from safetensors.torch import save_file

from adapterserve.server.adapters.kinds.template import write_template_dir
from adapterserve.server.adapters.loader import load_adapter_dir
from adapterserve.server.engine.offline import OfflineEngine
from adapterserve.server.errors import AdapterValidationError, InvalidArgumentError
from adapterserve.server.settings import EngineSettings
from adapterserve.server.store.store import AdapterStore
from adapterserve.server.store.upload import UploadRequest


@pytest.mark.parametrize("template", ["no placeholder", "{input} and {input}"])
def test_template_needs_exactly_one_placeholder(template, tiny_base, tmp_path):
    d = tmp_path / "t"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "HARD_PROMPT", "template": template}))
    save_file({}, str(d / "adapter_model.safetensors"))
    with pytest.raises(AdapterValidationError, match=r"\{input\} exactly once"):
        load_adapter_dir(d, tiny_base.spec, EngineSettings())


def test_a_template_holds_no_tensors(tiny_base, tmp_path):
    d = write_template_dir(tmp_path / "t", "Q: {input}")
    save_file({"w": torch.zeros(2)}, str(d / "adapter_model.safetensors"))
    with pytest.raises(AdapterValidationError, match="holds no tensors"):
        load_adapter_dir(d, tiny_base.spec, EngineSettings())


def test_template_is_stored_versioned_and_applied_to_the_tokens(tiny_model_dir, tiny_base, tmp_path):
    validate = functools.partial(load_adapter_dir, spec=tiny_base.spec, settings=EngineSettings())
    store = AdapterStore(tmp_path / "store", validate)
    store.put_dir(
        write_template_dir(tmp_path / "v1", "Q: {input}\nA:", system="Be brief."), UploadRequest("qa")
    )
    store.put_dir(
        write_template_dir(tmp_path / "v2", "Question: {input}\nAnswer:"), UploadRequest("qa", overwrite=True)
    )
    manifest = store.manifest("qa")
    assert (manifest.kind, manifest.peft_type, manifest.version, manifest.nbytes) == (
        "template",
        "HARD_PROMPT",
        2,
        0,
    )

    tok = tiny_base.tokenizer
    engine = OfflineEngine(tiny_base, EngineSettings(max_seq_len=64, adapter_slots=2))
    engine.add_adapter("qa", store.load("qa")[1])
    prompt = list(tok("hello world", add_special_tokens=False)["input_ids"])
    seq = engine.core.new_sequence(
        engine.request(prompt, adapter="qa", max_new_tokens=4), None, lambda e: None
    )
    assert seq.request.prompt_ids == tuple(prompt)  # no adapter resolved: unchanged
    resolved = engine.adapters.resolve("qa")
    seq = engine.core.new_sequence(
        engine.request(prompt, adapter="qa", max_new_tokens=4), resolved, lambda e: None
    )
    want = (
        tok("Question: ", add_special_tokens=False)["input_ids"]
        + prompt
        + tok("\nAnswer:", add_special_tokens=False)["input_ids"]
    )
    assert list(seq.request.prompt_ids) == want
    assert engine.core.pin_adapter(resolved) == 0  # nothing to place on the device
    # The engine's length limit counts the template's tokens.
    room = 64 - len(want)
    with pytest.raises(InvalidArgumentError, match="max_seq_len"):
        engine.core.new_sequence(
            engine.request(prompt, adapter="qa", max_new_tokens=room + 1), resolved, lambda e: None
        )
