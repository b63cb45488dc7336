"""In-place adapter updates through the real server (tiny base, real engine and store, SDK over gRPC).

Every response names the adapter version that produced it; greedy tokens of a version must equal what
those weights give when served alone (uploaded under another name), whatever updates happen meanwhile.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest
import torch

from adapterserve import AsyncClient, InvalidArgument, NotFound, Unauthenticated
from adapterserve.server.api.lifecycle import Phase
from adapterserve.server.api.serve import ServeApp
from adapterserve.server.settings import CacheSettings, EngineSettings, LimitSettings, ServerSettings
from tests.helpers.peft_adapters import write_lora_dir
from tests.server.api.conftest import wait_until

pytestmark = pytest.mark.timeout(180)

PROMPT = "the cat sat on"
NEW_TOKENS = 10


class Weights:
    """LoRA weight sets of the tiny base, one per seed, as folders and as state dicts."""

    def __init__(self, root: Path, spec) -> None:
        self.root, self.spec = root, spec

    def folder(self, seed: int) -> Path:
        return write_lora_dir(self.root / f"w{seed}", self.spec, seed=seed, r=2)

    def tensors(self, seed: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.folder(seed) / "adapter_model.safetensors"))


@pytest.fixture
async def served_app(tiny_model_dir, tmp_path):
    settings = ServerSettings(
        base_model=str(tiny_model_dir),
        quantize="none",
        device="cpu",
        store=tmp_path / "store",
        port=0,
        metrics_port=0,
        insecure_admin=True,
        engine=EngineSettings(max_batch_size=16, adapter_slots=8),
        cache=CacheSettings(persist_every=0),
    )
    app = ServeApp(settings)
    task = asyncio.create_task(app.run(handle_signals=False))
    await wait_until(lambda: app.lifecycle.phase is Phase.SERVING or task.done(), timeout=120)
    assert not task.done(), task.exception()
    client = AsyncClient(f"127.0.0.1:{app.ports.grpc}")
    yield app, client, Weights(tmp_path / "weights", app.runtime.get().engine.base.spec)
    await client.close()
    app.request_stop()
    assert await asyncio.wait_for(task, 60) == 0


async def _greedy(client: AsyncClient, adapter: str):
    return await client.generate(PROMPT, adapter=adapter, max_new_tokens=NEW_TOKENS, ignore_eos=True)


async def _reference_tokens(client: AsyncClient, weights: Weights, seeds: list[int]) -> dict[int, list[int]]:
    """Greedy tokens of each seed's weights served alone, as an adapter uploaded under its own name."""
    refs = {}
    for seed in seeds:
        await client.upload_adapter(weights.folder(seed), f"ref-{seed}")
        refs[seed] = (await _greedy(client, f"ref-{seed}")).token_ids
    return refs


async def test_an_update_is_a_new_version_that_the_next_request_gets(served_app):
    app, client, weights = served_app
    refs = await _reference_tokens(client, weights, [0, 1])
    assert refs[0] != refs[1], "the two weight sets must give different tokens for the test to mean anything"
    await client.upload_adapter(weights.folder(0), "live")
    before = await _greedy(client, "live")
    assert before.token_ids == refs[0]

    update = await client.update_adapter("live", weights.tensors(1))
    assert update.version > before.adapter_version == update.previous_version
    assert update.resident and not update.persisted and update.persisted_version == 0

    after = await _greedy(client, "live")
    assert after.adapter_version == update.version
    assert after.token_ids == refs[1]
    stream = [
        c async for c in client.stream(PROMPT, adapter="live", max_new_tokens=NEW_TOKENS, ignore_eos=True)
    ]
    assert {c.adapter_version for c in stream} == {update.version}
    assert (await client.get_adapter("live")).version == update.version

    # the old version's device slot is freed (no running request holds it)
    engine = app.runtime.get().engine
    assert not engine.is_resident("live", before.adapter_version)
    assert engine.is_resident("live", update.version)


async def test_no_request_mixes_versions_while_updates_stream_in(served_app):
    app, client, weights = served_app
    seeds = [0, 1, 2, 3]
    refs = await _reference_tokens(client, weights, seeds)
    assert len({tuple(t) for t in refs.values()}) >= 3
    await client.upload_adapter(weights.folder(0), "live")
    version_seed = {(await client.get_adapter("live")).version: 0}
    state = {s: weights.tensors(s) for s in seeds}

    async def requests() -> list:
        tasks = []
        for _ in range(24):
            tasks.append(asyncio.create_task(_greedy(client, "live")))
            await asyncio.sleep(0.01)
        return await asyncio.gather(*tasks)

    async def updates() -> None:
        for i in range(1, 9):
            seed = seeds[i % len(seeds)]
            result = await client.update_adapter("live", state[seed])
            version_seed[result.version] = seed
            await asyncio.sleep(0.015)

    results, _ = await asyncio.gather(requests(), updates())
    seen = set()
    for result in results:
        seed = version_seed[result.adapter_version]
        assert result.token_ids == refs[seed], f"version {result.adapter_version} (seed {seed}) mixed"
        seen.add(result.adapter_version)
    assert len(seen) >= 2, "requests should have met more than one version"
    assert app.runtime.get().engine.stats().running == 0


async def test_an_update_that_does_not_fit_is_refused_and_changes_nothing(served_app):
    app, client, weights = served_app
    await client.upload_adapter(weights.folder(0), "live")
    version = (await client.get_adapter("live")).version
    good = weights.tensors(1)
    name = next(iter(good))

    wrong_shape = dict(good, **{name: torch.zeros(good[name].shape[0] + 1, good[name].shape[1])})
    missing = {k: v for k, v in good.items() if k != name}
    extra = dict(good, **{"base_model.model.lm_head.lora_A.weight": torch.zeros(2, 2)})
    not_finite = dict(good, **{name: torch.full_like(good[name], math.nan)})
    for bad, words in (
        (wrong_shape, "shape"),
        (missing, "missing"),
        (extra, "does not have"),
        (not_finite, "NaN"),
    ):
        with pytest.raises(InvalidArgument, match=words):
            await client.update_adapter("live", bad)
    with pytest.raises(InvalidArgument, match="float"):
        await client.update_adapter("live", dict(good, **{name: good[name].to(torch.int32)}))
    with pytest.raises(NotFound):
        await client.update_adapter("nope", good)
    assert (await client.get_adapter("live")).version == version
    assert (await _greedy(client, "live")).adapter_version == version


async def test_an_update_of_a_pinned_adapter_moves_the_pin_and_bf16_tensors_are_taken(served_app):
    app, client, weights = served_app
    await client.upload_adapter(weights.folder(0), "live")
    old = (await client.pin("live")).version
    update = await client.update_adapter(
        "live", {k: v.to(torch.bfloat16) for k, v in weights.tensors(1).items()}, persist=True
    )
    assert update.persisted and update.persisted_version == update.version
    table = {key: pinned for key, _, _, pinned in app.runtime.get().engine.core.bank.table.snapshot()}
    assert table.get(("live", update.version)) is True
    assert ("live", old) not in table
    info = await client.get_adapter("live")
    assert info.version == update.version and info.pinned


async def test_update_needs_the_admin_token(tiny_model_dir, tmp_path):
    settings = ServerSettings(
        base_model=str(tiny_model_dir),
        quantize="none",
        device="cpu",
        store=tmp_path / "store",
        port=0,
        metrics_port=0,
        admin_token="s3cret",
    )
    app = ServeApp(settings)
    task = asyncio.create_task(app.run(handle_signals=False))
    await wait_until(lambda: app.lifecycle.phase is Phase.SERVING or task.done(), timeout=120)
    try:
        async with AsyncClient(f"127.0.0.1:{app.ports.grpc}") as client:
            with pytest.raises(Unauthenticated):
                await client.update_adapter("x", {"t": torch.zeros(1)})
    finally:
        app.request_stop()
        assert await asyncio.wait_for(task, 60) == 0


async def test_http_update_and_completions_say_which_version_answered(tiny_model_dir, tmp_path):
    import httpx
    from safetensors.torch import save

    settings = ServerSettings(
        base_model=str(tiny_model_dir),
        quantize="none",
        device="cpu",
        store=tmp_path / "store",
        port=0,
        metrics_port=0,
        http_port=0,
        admin_token="s3cret",
        limits=LimitSettings(max_upload_bytes=1 << 20),
    )
    app = ServeApp(settings)
    task = asyncio.create_task(app.run(handle_signals=False))
    await wait_until(lambda: app.lifecycle.phase is Phase.SERVING or task.done(), timeout=120)
    weights = Weights(tmp_path / "weights", app.runtime.get().engine.base.spec)
    admin = {"authorization": "Bearer s3cret"}
    try:
        async with AsyncClient(f"127.0.0.1:{app.ports.grpc}", admin_token="s3cret") as client:
            await client.upload_adapter(weights.folder(1), "ref-1")
            ref = (await _greedy(client, "ref-1")).token_ids
            await client.upload_adapter(weights.folder(0), "live")
        url = f"http://127.0.0.1:{app.ports.http}"
        body = save(weights.tensors(1))
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            refused = await http.post("/v1/adapters/live/weights", content=body)
            assert refused.status_code == 401
            reply = await http.post("/v1/adapters/live/weights?persist=true", content=body, headers=admin)
            assert reply.status_code == 200, reply.text
            update = reply.json()
            assert update["version"] > update["previous_version"] and update["persisted"]
            bad = await http.post("/v1/adapters/live/weights", content=b"not safetensors", headers=admin)
            assert bad.status_code == 400
            missing = await http.post("/v1/adapters/nope/weights", content=body, headers=admin)
            assert missing.status_code == 404
            huge = await http.post("/v1/adapters/live/weights", content=b"\0" * (2 << 20), headers=admin)
            assert huge.status_code == 413, huge.text
            done = await http.post(
                "/v1/completions",
                json={"model": "live", "prompt": PROMPT, "max_tokens": NEW_TOKENS, "ignore_eos": True},
            )
            assert done.status_code == 200, done.text
            assert done.json()["adapter_version"] == update["version"]
        async with AsyncClient(f"127.0.0.1:{app.ports.grpc}") as client:
            after = await _greedy(client, "live")
        assert after.adapter_version == update["version"] and after.token_ids == ref
    finally:
        app.request_stop()
        assert await asyncio.wait_for(task, 60) == 0


@pytest.mark.parametrize(
    "peft_type, overrides", [("IA3", {}), ("LORA", {"use_dora": True})], ids=["ia3", "dora"]
)
async def test_ia3_and_dora_updates_serve_what_an_upload_of_those_weights_serves(
    served_app, tiny_model_dir, tmp_path, peft_type, overrides
):
    from safetensors.torch import load_file, save_file

    from tests.helpers.peft_adapters import save_peft_adapter

    app, client, _ = served_app
    folder = save_peft_adapter(tiny_model_dir, tmp_path / "a", peft_type, seed=3, **overrides)
    (folder / "README.md").unlink(missing_ok=True)
    await client.upload_adapter(folder, "live")
    state = load_file(str(folder / "adapter_model.safetensors"))
    changed = {k: (v * 1.7 + 0.05) for k, v in state.items()}
    reference = tmp_path / "b"
    reference.mkdir()
    (reference / "adapter_config.json").write_bytes((folder / "adapter_config.json").read_bytes())
    save_file(changed, reference / "adapter_model.safetensors", metadata={"format": "pt"})
    await client.upload_adapter(reference, "reference")

    before = await _greedy(client, "live")
    update = await client.update_adapter("live", changed)
    after = await _greedy(client, "live")
    expected = await _greedy(client, "reference")
    assert after.adapter_version == update.version > before.adapter_version
    assert after.token_ids == expected.token_ids
    assert before.token_ids != expected.token_ids, (
        "the change must show in the tokens for the test to mean anything"
    )
