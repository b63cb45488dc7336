"""Scale-out on a local Ray cluster: 2 engine replicas (tiny model) behind one HTTP endpoint, 200
requests over 16 adapters, adapter affinity through Ray Serve's multiplexing, and a replica killed
mid-run without a request lost silently. Marked `ray` (a Ray cluster on 2 cores takes about a minute);
run with `pytest -m ray tests/scaleout -s` to see the figures."""

from __future__ import annotations

import collections
import functools
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field

import httpx
import pytest

from adapterserve.server.store.upload import UploadRequest
from tests.helpers.peft_adapters import write_lora_dir
from tests.helpers.server_process import free_port

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

ADAPTERS = [f"tenant-{i:02d}" for i in range(16)]
REQUESTS = 200
KILL_AFTER = 120  # completed requests before one replica is killed (~7 per adapter: affinity has a signal)
PROMPT = "The capital of France is"
MAX_ATTEMPTS = 8
# Concurrent requests: one replica's max_ongoing_requests. A home replica then never fills, so Ray never
# spills an adapter's request to the other replica (it does at once when the home is full, and the
# adapter then lives on both): the affinity measured is the routing's, not the overload's.
CLIENTS = 8


def random_routing_share(counts: list[int], replicas: int = 2, trials: int = 2000) -> float:
    """The mean top-replica share per adapter if each request went to a replica at random (a baseline)."""
    import random

    rng = random.Random(0)
    total = 0.0
    for _ in range(trials):
        for n in counts:
            hits = collections.Counter(rng.randrange(replicas) for _ in range(n))
            total += max(hits.values()) / n
    return total / (trials * len(counts))


@dataclass
class Outcome:
    adapter: str
    status: int = 0
    text: str | None = None
    replica: str | None = None
    attempts: int = 0
    refusals: list[str] = field(default_factory=list)  # what made the client retry
    finished_at: float = 0.0


def put_adapters(store_dir, base, names, seed0: int) -> None:
    """Write LoRA adapters into the shared store directory, as any one writer would."""
    from adapterserve.server.adapters.loader import load_adapter_dir
    from adapterserve.server.settings import EngineSettings
    from adapterserve.server.store.store import AdapterStore

    validate = functools.partial(
        load_adapter_dir, spec=base.spec, settings=EngineSettings(), max_bytes=64 << 20
    )
    store = AdapterStore(store_dir, validate, base_fingerprint=base.fingerprint)
    for i, name in enumerate(names):
        src = write_lora_dir(store_dir.parent / "src" / name, base.spec, seed=seed0 + i, r=4)
        store.put_dir(src, UploadRequest(name))


def one_request(client: httpx.Client, adapter: str) -> Outcome:
    out = Outcome(adapter)
    body = {"model": adapter, "prompt": PROMPT, "max_tokens": 48, "temperature": 0, "ignore_eos": True}
    while out.attempts < MAX_ATTEMPTS:
        out.attempts += 1
        try:
            response = client.post("/v1/completions", json=body)
        except httpx.TransportError as exc:
            out.refusals.append(type(exc).__name__)
        else:
            out.status = response.status_code
            if response.status_code == 200:
                out.text = response.json()["choices"][0]["text"]
                out.replica = response.headers["x-adapterserve-replica"]
                break
            if response.status_code not in (429, 500, 503):
                break
            out.refusals.append(f"{response.status_code} {response.json()['error']['message'][:60]}")
        time.sleep(0.5 * out.attempts)
    out.finished_at = time.monotonic()
    return out


def kill_one_replica() -> str:
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "EngineReplica" in a["name"]]
    victim = sorted(replicas, key=lambda a: a["name"])[0]
    ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
    return victim["name"]


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, tiny_base, tmp_path_factory):
    from adapterserve.server.scaleout.app import application
    from adapterserve.server.scaleout.settings import ScaleOutSettings
    from adapterserve.server.settings import EngineSettings, ServerSettings

    store = tmp_path_factory.mktemp("ray-store") / "store"
    put_adapters(store, tiny_base, ADAPTERS[:8], seed0=0)  # the other 8 arrive after the replicas start
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, object_store_memory=80 << 20)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = ScaleOutSettings(
        num_replicas=2,
        max_adapters_per_replica=16,
        max_ongoing_requests=8,  # = the engine's batch: CLIENTS concurrent requests need both replicas
        num_cpus_per_replica=1,
        server=ServerSettings(
            base_model=str(tiny_model_dir),
            quantize="none",
            device="cpu",
            store=store,
            served_model_name="tiny-base",
            engine=EngineSettings(max_batch_size=8, adapter_slots=17),
        ),
    )
    started = time.monotonic()
    serve.run(application(settings), name="adapterserve", route_prefix="/")
    ready_s = time.monotonic() - started
    put_adapters(store, tiny_base, ADAPTERS[8:], seed0=8)
    try:
        yield f"http://127.0.0.1:{port}", ready_s
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_replicas_serve_16_adapters_with_affinity_and_survive_a_killed_replica(cluster, capsys):
    url, ready_s = cluster
    with httpx.Client(base_url=url, timeout=120) as client:
        listed = client.get("/v1/models")
        assert listed.status_code == 200, listed.text
        models = listed.json()["data"]
        assert [m["id"] for m in models] == ["tiny-base", *ADAPTERS[:8]]  # the replica's view at start
        missing = client.post("/v1/completions", json={"model": "no-such", "prompt": "x"})
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
        streamed = client.post(
            "/v1/completions",
            json={
                "model": ADAPTERS[12],
                "prompt": PROMPT,
                "max_tokens": 48,
                "temperature": 0,
                "stream": True,
                "ignore_eos": True,
            },
        )
        frames = [line for line in streamed.text.splitlines() if line]
        assert frames[-1] == "data: [DONE]"
        streamed_text = "".join(json.loads(f[6:])["choices"][0]["text"] for f in frames[:-1])

        # Each adapter's first request, one at a time, as a tenant's traffic starts: Ray places it on the
        # replica with the fewest adapters, and that replica becomes its home.
        for adapter in ADAPTERS:
            placed = one_request(client, adapter)
            assert placed.status == 200, placed
        time.sleep(1.0)  # replicas push the adapters they hold every 0.1 s; the router learns them

        order = [ADAPTERS[i % len(ADAPTERS)] for i in range(REQUESTS)]
        outcomes: list[Outcome] = []
        killed: list[tuple[str, float]] = []
        started = time.monotonic()
        with ThreadPoolExecutor(CLIENTS) as pool:
            futures = [pool.submit(one_request, client, a) for a in order]
            for future in as_completed(futures):
                outcomes.append(future.result())
                if len(outcomes) == KILL_AFTER and not killed:
                    threading.Thread(
                        target=lambda: killed.append((kill_one_replica(), time.monotonic()))
                    ).start()
        elapsed = time.monotonic() - started

    assert killed, "the replica was not killed"
    failed = [o for o in outcomes if o.status != 200]
    assert not failed, failed[:5]
    assert len(outcomes) == REQUESTS
    # greedy, same adapter and prompt: the same text whichever replica served it (and streamed)
    texts = collections.defaultdict(set)
    for o in outcomes:
        texts[o.adapter].add(o.text)
    assert all(len(t) == 1 for t in texts.values()), {a: t for a, t in texts.items() if len(t) > 1}
    assert texts[ADAPTERS[12]] == {streamed_text}
    assert len({next(iter(t)) for t in texts.values()}) > 1  # the adapters do differ

    kill_at = killed[0][1]
    before = [o for o in outcomes if o.finished_at < kill_at]
    per_adapter = collections.defaultdict(collections.Counter)
    for o in before:
        per_adapter[o.adapter][o.replica] += 1
    shares = {a: c.most_common(1)[0][1] / sum(c.values()) for a, c in per_adapter.items()}
    replicas = collections.Counter(o.replica for o in outcomes)
    retried = [o for o in outcomes if o.attempts > 1]
    homes = {a: c.most_common(1)[0][0] for a, c in per_adapter.items()}
    report = {
        "adapters_per_replica_before_kill": collections.Counter(homes.values()),
        "ready_s": round(ready_s, 1),
        "requests": len(outcomes),
        "elapsed_s": round(elapsed, 1),
        "requests_per_replica": dict(replicas),
        "affinity_before_kill_mean": round(sum(shares.values()) / len(shares), 3),
        "affinity_before_kill_min": round(min(shares.values()), 3),
        "random_routing_baseline": round(
            random_routing_share([sum(c.values()) for c in per_adapter.values()]), 3
        ),
        "adapters_seen_before_kill": len(shares),
        "killed": killed[0][0],
        "retried_requests": len(retried),
        "retry_reasons": collections.Counter(r.split(" (")[0][:40] for o in retried for r in o.refusals),
    }
    with capsys.disabled():
        print("\nray scale-out figures:", json.dumps(report, default=dict, indent=1))
    assert len(replicas) >= 2
    assert report["affinity_before_kill_mean"] >= report["random_routing_baseline"] + 0.15, report
