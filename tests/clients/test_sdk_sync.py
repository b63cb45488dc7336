"""The blocking Client against the real server subprocess: every method, streaming, every error type."""

from __future__ import annotations

import math
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest

import adapterserve
from adapterserve import (
    AdapterKind,
    Client,
    FinishReason,
    GenerateResult,
    RetryPolicy,
    UploadProgress,
)
from tests.clients.conftest import ADMIN_TOKEN, MAX_UPLOAD_BYTES


def test_health_and_server_info(client):
    assert client.health().serving
    info = client.server_info()
    assert info.model_type == "llama" and info.quantize == "none"
    assert set(info.adapter_kinds) >= {
        AdapterKind.LORA,
        AdapterKind.IA3,
        AdapterKind.PROMPT,
        AdapterKind.PREFIX,
    }
    assert info.limits.max_upload_bytes == MAX_UPLOAD_BYTES
    assert info.chat_template


def test_generate_prompt_is_greedy_deterministic_and_consistent(client):
    a = client.generate("The capital of France is", max_new_tokens=10, ignore_eos=True)
    b = client.generate("The capital of France is", max_new_tokens=10, ignore_eos=True)
    assert isinstance(a, GenerateResult)
    assert a.token_ids == b.token_ids and a.text == b.text
    assert a.generated_tokens == len(a.token_ids) == 10
    assert a.finish_reason is FinishReason.LENGTH
    assert a.prompt_tokens > 0 and a.adapter == "" and a.request_id
    assert 0 <= a.timings.time_to_first_token_s <= a.timings.total_s


def test_generate_chat_messages_apply_the_template(client):
    chat = client.generate(messages=[{"role": "user", "content": "hello"}], max_new_tokens=4, ignore_eos=True)
    plain = client.generate("hello", max_new_tokens=4, ignore_eos=True)
    # The chat template wraps the message in role markers: more prompt tokens than the bare text.
    assert chat.prompt_tokens > plain.prompt_tokens
    assert chat.generated_tokens == 4


def test_stream_is_ordered_complete_and_equals_generate(client):
    full = client.generate("Translate to French: hello", max_new_tokens=12, ignore_eos=True)
    chunks = list(client.stream("Translate to French: hello", max_new_tokens=12, ignore_eos=True))
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert all(c.finish_reason is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.finish_reason is FinishReason.LENGTH
    assert last.generated_tokens == 12 and last.prompt_tokens == full.prompt_tokens
    assert [t for c in chunks for t in c.token_ids] == full.token_ids
    assert "".join(c.text for c in chunks) == full.text
    assert len({c.request_id for c in chunks}) == 1
    joined = GenerateResult.from_chunks(chunks)
    assert joined.token_ids == full.token_ids and joined.finish_reason is full.finish_reason


def test_closing_a_stream_early_cancels_it_and_the_server_keeps_serving(client):
    stream = client.stream("Once upon a time", max_new_tokens=48, ignore_eos=True)
    first = next(stream)
    assert first.index == 0
    stream.close()
    assert client.generate("Once upon a time", max_new_tokens=2).generated_tokens <= 2


def test_one_client_from_many_threads(client):
    prompts = [f"numbers {i} {i + 1}" for i in range(6)]
    expected = [client.generate(p, max_new_tokens=6, ignore_eos=True).token_ids for p in prompts]
    with ThreadPoolExecutor(4) as pool:
        got = list(
            pool.map(lambda p: client.generate(p, max_new_tokens=6, ignore_eos=True).token_ids, prompts)
        )
    assert got == expected


def test_adapter_lifecycle_upload_list_get_pin_generate_delete(client, lora_dir, name):
    seen: list[UploadProgress] = []
    result = client.upload_adapter(
        lora_dir, name, description="test lora", progress=seen.append, chunk_bytes=4096
    )
    files = {p.name: p.stat().st_size for p in lora_dir.iterdir() if p.suffix in {".json", ".safetensors"}}
    total = sum(files.values())
    # progress: one call per chunk, cumulative, ending at the total
    assert len(seen) == sum(max(1, math.ceil(s / 4096)) for s in files.values())
    assert [p.sent_bytes for p in seen] == sorted(p.sent_bytes for p in seen)
    assert seen[-1].sent_bytes == seen[-1].total_bytes == total == result.received_bytes
    info = result.adapter
    assert not result.replaced
    assert (info.name, info.kind, info.peft_type, info.rank) == (name, AdapterKind.LORA, "LORA", 4)
    assert sorted(info.target_modules) == ["q_proj", "v_proj"]
    assert {f.name for f in info.files} == set(files) and info.version == 1
    assert info.description == "test lora" and not info.pinned

    assert name in [a.name for a in client.list_adapters()]
    assert client.get_adapter(name) == info.model_copy(
        update={"cache_tier": client.get_adapter(name).cache_tier}
    )
    assert client.pin(name).pinned is True
    assert client.get_adapter(name).pinned is True
    assert client.unpin(name).pinned is False

    base = client.generate("The capital of France is", max_new_tokens=16, ignore_eos=True)
    tuned = client.generate("The capital of France is", adapter=name, max_new_tokens=16, ignore_eos=True)
    assert tuned.adapter == name
    assert tuned.token_ids != base.token_ids  # the LoRA's random weights change the output

    deleted = client.delete_adapter(name)
    assert deleted.name == name
    with pytest.raises(adapterserve.NotFound):
        client.get_adapter(name)
    with pytest.raises(adapterserve.NotFound):
        client.generate("hi", adapter=name, max_new_tokens=2)


def test_overwrite_replaces_and_bumps_the_version(client, lora_dir, prompt_dir, name):
    client.upload_adapter(lora_dir, name)
    with pytest.raises(adapterserve.AlreadyExists) as info:
        client.upload_adapter(prompt_dir, name)
    assert name in info.value.message
    replaced = client.upload_adapter(prompt_dir, name, overwrite=True)
    assert replaced.replaced and replaced.adapter.version == 2
    assert replaced.adapter.kind is AdapterKind.PROMPT and replaced.adapter.num_virtual_tokens == 4
    client.delete_adapter(name)


def test_list_follows_pages(client, lora_dir, name):
    names = [f"{name}-{i}" for i in range(3)]
    for n in reversed(names):
        client.upload_adapter(lora_dir, n)
    try:
        listed = client.list_adapters(name_prefix=name, page_size=1)
        assert [a.name for a in listed] == names
    finally:
        for n in names:
            client.delete_adapter(n)


def test_each_error_type(client, server, lora_dir, tmp_path, name):
    with pytest.raises(adapterserve.NotFound):
        client.generate("hi", adapter="no-such-adapter", max_new_tokens=2)
    with pytest.raises(adapterserve.InvalidArgument) as bad:
        client.generate("hi", temperature=-1.0)
    assert "temperature" in bad.value.message
    with pytest.raises(adapterserve.InvalidArgument):
        client.generate("hi", max_new_tokens=10_000)
    with Client(server.target) as anonymous:
        with pytest.raises(adapterserve.Unauthenticated):
            anonymous.list_adapters()
    with Client(server.target, admin_token="wrong") as wrong:
        with pytest.raises(adapterserve.PermissionDenied):
            wrong.get_adapter("anything")
    big = tmp_path / "big"
    shutil.copytree(lora_dir, big)
    (big / "adapter_model.safetensors").write_bytes(b"\0" * (MAX_UPLOAD_BYTES + 1))
    with pytest.raises(adapterserve.ResourceExhausted) as too_big:
        client.upload_adapter(big, name)
    assert "max_upload_bytes" in too_big.value.message
    with pytest.raises(adapterserve.DeadlineExceeded):
        client.generate("hi", max_new_tokens=48, ignore_eos=True, timeout=0.001)
    with Client("127.0.0.1:1", retry=RetryPolicy(max_attempts=1), timeout=5) as nowhere:
        with pytest.raises(adapterserve.Unavailable):
            nowhere.generate("hi")
    assert client.generate("hi", max_new_tokens=1).generated_tokens == 1  # still serving


def test_upload_refusals_say_why(client, lora_dir, tmp_path, name):
    pickled = tmp_path / "pickled"
    shutil.copytree(lora_dir, pickled)
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04K.")
    with pytest.raises(adapterserve.AdapterRefused) as local:
        client.upload_adapter(pickled, name)
    assert "adapter_model.bin" in local.value.message and "safetensors" in local.value.message
    assert name not in [a.name for a in client.list_adapters()]  # nothing was sent

    unsupported = tmp_path / "unsupported"
    shutil.copytree(lora_dir, unsupported)
    (unsupported / "adapter_config.json").write_text('{"peft_type": "LOHA", "task_type": "CAUSAL_LM"}')
    with pytest.raises(adapterserve.InvalidArgument) as remote:
        client.upload_adapter(unsupported, name)
    assert "LOHA" in remote.value.message
    with pytest.raises(adapterserve.NotFound):
        client.get_adapter(name)


def test_admin_token_from_client_and_errors_carry_codes(server):
    with Client(server.target, admin_token=ADMIN_TOKEN) as c:
        with pytest.raises(adapterserve.AdapterServeError) as info:
            c.get_adapter("missing-adapter")
    assert info.value.code == "NOT_FOUND" and "missing-adapter" in info.value.message


def test_default_upload_chunks_follow_the_server_limit(client, lora_dir, name):
    """Without chunk_bytes, the SDK asks the server's upload_chunk_bytes once and stays under it."""
    from tests.clients.conftest import UPLOAD_CHUNK_BYTES

    assert client.server_info().limits.upload_chunk_bytes == UPLOAD_CHUNK_BYTES
    seen: list[UploadProgress] = []
    result = client.upload_adapter(lora_dir, name, progress=seen.append)
    sent = [0] + [p.sent_bytes for p in seen]
    sizes = [b - a for a, b in zip(sent, sent[1:], strict=False)]
    assert max(sizes) <= UPLOAD_CHUNK_BYTES and len(seen) > 2
    assert result.received_bytes == seen[-1].total_bytes
    client.delete_adapter(name)
