"""Through the real server, as a new user runs it (`adapterserve serve --base-model DIR`): model families
whose layout differs from Llama's give transformers' own greedy tokens, and a family the engine cannot
run is refused at start with one line and a non-zero exit code, never a traceback."""

from __future__ import annotations

import os

import pytest
import torch

from adapterserve import Client
from tests.helpers.server_process import server_command, start_server
from tests.helpers.tiny_model import FAMILIES, FAMILY_OVERRIDES, build_tiny_tokenizer, make_tiny_model_dir

PROMPT = "Translate to French: hello world -> bonjour le monde. The capital of Italy is"
NEW_TOKENS = 16  # with the prompt's tokens, well past the tiny models' 8-position sliding windows
# CI serves the four families whose layouts differ most (a server start each, ~12 s on 2 cores);
# ADAPTERSERVE_TEST_ALL_FAMILIES=1 serves every family of tests/server/engine/test_families.py.
SERVED = (
    FAMILIES
    if os.environ.get("ADAPTERSERVE_TEST_ALL_FAMILIES")
    else ("mistral", "gemma2", "phi3", "gpt_neox")
)


def _transformers_greedy(model_dir, prompt: str, steps: int) -> list[int]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    return out[0, ids.shape[1] :].tolist()


@pytest.mark.parametrize("family", SERVED)
def test_served_text_equals_transformers(family, tmp_path):
    model_dir = make_tiny_model_dir(tmp_path / family, arch=family, **FAMILY_OVERRIDES[family])
    want = _transformers_greedy(model_dir, PROMPT, NEW_TOKENS)
    server = start_server(model_dir, tmp_path / "store")
    try:
        with Client(server.target) as client:
            got = client.generate(PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True)
        assert got.prompt_tokens + NEW_TOKENS > FAMILY_OVERRIDES[family].get("sliding_window", 0)
        assert got.token_ids == want, f"{family}: served {got.token_ids}, transformers {want}"
    finally:
        assert server.stop() == 0


def _tiny_unsupported_model(path, arch: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = build_tiny_tokenizer()
    config = AutoConfig.for_model(
        arch, vocab_size=len(tokenizer), hidden_size=64, n_layer=2, n_head=4, num_hidden_layers=2
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_unsupported_family_is_refused_at_start_in_one_line(tmp_path):
    """BLOOM's transformers code computes attention itself (no attention interface): refused."""
    import subprocess

    model_dir = _tiny_unsupported_model(tmp_path / "bloom", "bloom")
    done = subprocess.run(
        server_command(model_dir, tmp_path / "store"),
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "Traceback" not in output
    refusals = [line for line in output.splitlines() if "startup failed" in line]
    assert len(refusals) == 1, output
    assert "model_type 'bloom' is not supported" in refusals[0]
    assert "attention interface" in refusals[0]
