"""Several memories per replica, chosen per request, and runtime swaps (issue 8).

Unit tests of `editing.multi.MemorySet` on a tiny random model and of `ServedMemories` on a tiny
store come first. Then one story on a real store: memories "alpha" (edit A) and "beta" (edit B),
served by the transformers backend (the reference answers) and by one vLLM CPU server started for
the whole module, which boots while the edits are computed.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import httpx
import pytest
import torch
from fastapi import FastAPI, Request  # module level: FastAPI resolves the (postponed) annotations here
from fastapi.responses import JSONResponse

from benchmarks.serve_bench import VllmServer, free_port
from editing.multi import MemorySet
from editing.routed import RoutedDownProj, RoutedFFN
from editing.routers import make_router
from editing.table import MemoryMismatchError, MemorySpec
from serving.cli import memory_settings, vllm_command
from serving.fingerprint import served_fingerprint
from serving.memory import ServedModel
from serving.memory_set import ServedMemories, UnknownMemoryError
from serving.openai_api import HEADER_MEMORY, HEADER_VERSION, MemoryChoiceError, requested_memory
from serving.replica_cli import ReplicaError, replica_app, swap
from serving.settings import MemoryRef, MemorySettings
from store import MemoryStore, embedded_url, stop_embedded_redis
from store.loadgen import synthetic_rows
from conftest import build_tiny

MODEL = "smollm2-135m"
KEY = "multi-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
NEUTRAL = "The capital of France is"
TOKENS = 6
STATE: dict = {}


# ----------------------------------------------------------------------------- unit: MemorySet


def _ffn_keys(model, layer: int, ids: torch.Tensor) -> torch.Tensor:
    """The down-projection inputs of `layer` for token ids [B, L] -> [B, L, d_key]."""
    seen = {}
    down = model.model.layers[layer].mlp.down_proj
    handle = down.register_forward_pre_hook(lambda _m, args: seen.update(key=args[0].detach()))
    model(ids)
    handle.remove()
    return seen["key"]


class _SetDownProj(torch.nn.Module):
    """A tiny model's down-projection routed through a MemorySet ([B, L, d] flattened to tokens)."""

    def __init__(self, base, memories: MemorySet):
        super().__init__()
        self.base, self.memories = base, memories

    def forward(self, key):
        out = self.base(key)
        return self.memories(key.reshape(-1, key.shape[-1]), out.reshape(-1, out.shape[-1])).view(out.shape)


def _memory(keys: torch.Tensor, seed: int, names: list[str]) -> RoutedFFN:
    g = torch.Generator().manual_seed(seed)
    r = RoutedFFN(make_router("cosine"), keys.shape[-1], 32, capacity=4, threshold=0.9)
    r.add(names, keys, torch.randn(len(names), 32, generator=g) * 5)
    return r


def test_memory_set_routes_each_request_through_its_own_memory():
    """Three sequences batched in one forward of a tiny Llama: the first uses memory A, the second B, the
    third none. Each sequence's logits equal those of the same sequence run with only its memory attached;
    the base sequence and every gated-off token are bit-identical to the base model."""
    model = build_tiny("llama")
    layer = 1
    ids = torch.randint(0, 1000, (3, 7), generator=torch.Generator().manual_seed(0))
    keys = _ffn_keys(model, layer, ids)  # [3, 7, 64]
    base_logits = model(ids).logits
    # A stores the keys of sequence 0's tokens 2 and 5; B stores sequence 1's token 3. B also stores sequence 0's
    # token 2 key, so sequence 0 would change under B at a different place: routing must follow the request.
    a = _memory(torch.stack([keys[0, 2], keys[0, 5]]), 1, ["a1", "a2"])
    b = _memory(torch.stack([keys[1, 3], keys[0, 4]]), 2, ["b1", "b2"])
    down = model.model.layers[layer].mlp.down_proj

    def alone(seq: int, routed: RoutedFFN | None) -> torch.Tensor:
        model.model.layers[layer].mlp.down_proj = down if routed is None else RoutedDownProj(down, routed)
        try:
            return model(ids[seq: seq + 1]).logits[0]
        finally:
            model.model.layers[layer].mlp.down_proj = down

    memories = MemorySet(max_tokens=64)
    assert memories.put("a", a) == 0 and memories.put("b", b) == 1
    memories.set_request_memory([memories.slot("a"), memories.slot("b"), memories.slot(None)], [7, 7, 7])
    assert memories.token_memory[:21].tolist() == [0] * 7 + [1] * 7 + [-1] * 7 and (memories.token_memory[21:] == -1).all()
    model.model.layers[layer].mlp.down_proj = _SetDownProj(down, memories)
    try:
        batched = model(ids).logits
    finally:
        model.model.layers[layer].mlp.down_proj = down
    assert (int(a.tokens), int(a.hits)) == (7, 2) and (int(b.tokens), int(b.hits)) == (7, 1), "own tokens only"

    for seq, routed in ((0, a), (1, b)):
        assert torch.allclose(batched[seq], alone(seq, routed), atol=1e-5, rtol=0)
        assert not torch.allclose(batched[seq], base_logits[seq], atol=1e-3), "the memory must change its sequence"
    assert torch.equal(batched[0, :2], base_logits[0, :2]), "tokens before the first gated token are untouched"
    assert torch.equal(batched[2], base_logits[2]), "the request without a memory is the base model, bit for bit"
    assert not torch.allclose(alone(0, b), batched[0], atol=1e-3), "sequence 0 under B would differ: not B's tokens"

    # At the layer: each memory's own output on its tokens, the base tensor's values on every other token.
    flat_key = keys.reshape(-1, keys.shape[-1])  # [21, 64]
    base_out = torch.randn(21, 32)
    out = memories(flat_key, base_out)
    assert torch.equal(out[:7], a(flat_key, base_out)[:7]) and torch.equal(out[7:14], b(flat_key, base_out)[7:14])
    gated = torch.zeros(21, dtype=torch.bool)
    gated[[2, 5, 10]] = True
    assert torch.equal(out[~gated], base_out[~gated]) and not torch.equal(out[gated], base_out[gated])

    # Slots: replacing keeps the slot, popping frees it (tokens pointing at it fall back to the base).
    assert memories.put("a", _memory(keys[2, :1], 3, ["a3"])) == 0
    assert memories.pop("b") is b and (memories.token_memory[7:14] == -1).all()
    assert memories.put("c", b) == 1 and sorted(memories.names) == ["a", "c"]
    with pytest.raises(KeyError, match="'zzz' is not loaded"):
        memories.slot("zzz")
    with pytest.raises(ValueError, match="do not fit"):
        memories.set_token_memory(torch.zeros(65, dtype=torch.long))
    with pytest.raises(ValueError, match="the set holds"):
        memories.put("d", RoutedFFN(make_router("cosine"), 16, 8))


# ----------------------------------------------------------------------------- unit: ServedMemories


def test_served_memories_swap_add_remove_and_refusals(tmp_path):
    spec = MemorySpec("fp-unit", 2, 16, 8)
    root = tmp_path / "s"
    s = MemoryStore(root)
    try:
        for name, seed in (("a", 0), ("b", 1)):
            s.create(name, spec, {"name": "cosine"})
            s.commit(name, synthetic_rows(spec, [f"{name}{i}" for i in range(3)], seed=seed))
        s.create("other-model", MemorySpec("fp-other", 2, 16, 8), {"name": "cosine"})
        s.create("other-layer", MemorySpec("fp-unit", 3, 16, 8), {"name": "cosine"})
        settings = MemorySettings(MemoryRef("a"), store=str(root), redis_url=embedded_url(root), poll_seconds=0.2,
                                  memories=(MemoryRef("a"),))
        memset = MemorySet(16)
        served = ServedMemories(ServedModel("fp-unit", 4, 16, 8), settings, on_load=memset.put,
                                on_unload=lambda name, _r: memset.pop(name), grace_s=0.0)
        served.start_all()
        assert (served.default, served.layer, sorted(memset.names)) == ("a", 2, ["a"])
        assert served.choose(None).name == "a" and served.choose("") is None

        for ref, field in (("other-model", "model_fingerprint"), ("other-layer", "layer 3")):
            with pytest.raises(MemoryMismatchError, match=field):
                served.swap(MemoryRef(ref))
        assert (served.default, sorted(served.loaded), sorted(memset.names)) == ("a", ["a"], ["a"]), \
            "a refused swap changes nothing"

        out = served.swap(MemoryRef.parse("b@1"))
        assert out["default"] == "b" and out["previous"] == "a" and served.choose(None).routed.version == 1
        with pytest.raises(UnknownMemoryError):
            served.choose("a")  # retired: new requests cannot choose it ...
        assert served.collect(in_use={"a"}) == [] and "a" in memset, "... but it stays while a request uses it"
        assert served.collect(in_use=set()) == ["a"] and sorted(memset.names) == ["b"]

        served.add(MemoryRef("a"))
        assert sorted(memset.names) == ["a", "b"] and served.default == "b"
        assert served.remove("b")["default"] is None and served.choose(None) is None
        served.collect()
        assert sorted(memset.names) == ["a"]
        with pytest.raises(UnknownMemoryError):
            served.remove("b")

        real_install = served._install

        def install_then_removed(new):  # a concurrent admin call removes the memory just loaded
            real_install(new)
            served.remove(new.name)

        served._install = install_then_removed
        with pytest.raises(UnknownMemoryError, match="removed while"):
            served.swap(MemoryRef("b"))
        assert served.default is None, "a swap to a memory removed meanwhile changes nothing"
        served.close()
    finally:
        s.close()
        stop_embedded_redis(root)


def test_tensor_parallel_ranks_unload_what_the_leader_decides(tmp_path):
    """Under tensor parallelism every rank must unload a retired memory at the same step (unloading changes
    the collectives each step runs): a rank unloads the leader's choice, not what its own clock says."""
    import numpy as np

    from serving.vllm_multi import WorkerMemories

    class Runner:  # an empty batch: the mapping step has nothing to map
        requests: dict = {}
        input_batch = dataclasses.make_dataclass("Batch", [("num_reqs", int), ("req_ids", list)])(0, [])
        query_start_loc = dataclasses.make_dataclass("Loc", [("np", object)])(np.zeros(1, dtype=np.int64))

    class Sync:
        def __init__(self, leader: bool, decided: list[str] | None = None):
            self.leader, self.decided, self.offered = leader, decided, []

        def share(self, obj):
            self.offered.append(obj)
            return obj if self.leader else self.decided

    spec = MemorySpec("fp-unit", 2, 16, 8)
    root = tmp_path / "s"
    s = MemoryStore(root)
    runner = Runner()
    try:
        for name in ("a", "b"):
            s.create(name, spec, {"name": "cosine"})
            s.commit(name, synthetic_rows(spec, [f"{name}0"]))
        settings = MemorySettings(MemoryRef("a"), store=str(root), redis_url=embedded_url(root), poll_seconds=0.2,
                                  memories=(MemoryRef("a"),))
        for sync, resident in ((Sync(leader=True), ["a", "b"]), (Sync(leader=False, decided=["a"]), ["b"])):
            memset = MemorySet(16)
            served = ServedMemories(ServedModel("fp-unit", 4, 16, 8), settings, on_load=memset.put,
                                    on_unload=lambda name, _r, m=memset: m.pop(name), grace_s=3600.0)
            worker = WorkerMemories(served, memset, runner, sync=sync)
            worker.boundary()
            served.swap(MemoryRef("b"))
            worker.boundary()
            assert sync.offered == [[] if sync.leader else None], "the leader offers its choice, the others none"
            assert sorted(memset.names) == resident, "the leader's grace period holds; a follower rank obeys it"
            served.close()
    finally:
        s.close()
        stop_embedded_redis(root)


def test_requested_memory_from_model_field_and_header():
    assert requested_memory(MODEL, MODEL) is None
    assert requested_memory(f"{MODEL}:eu-facts", MODEL) == "eu-facts"
    assert requested_memory(MODEL, MODEL, "eu-facts") == "eu-facts"
    assert requested_memory(f"{MODEL}:eu-facts", MODEL, "eu-facts") == "eu-facts"
    with pytest.raises(MemoryChoiceError, match="header") as exc:
        requested_memory(f"{MODEL}:a", MODEL, "b")
    assert exc.value.status == 400
    for wrong in ("gpt-4", f"{MODEL}:", f"{MODEL}x:a"):
        with pytest.raises(MemoryChoiceError) as exc:
            requested_memory(wrong, MODEL)
        assert exc.value.status == 404


def test_metrics_scrape_does_not_wait_for_a_long_engine_step():
    """GET /metrics refreshes the memory metrics through an RPC that runs between engine steps; behind a
    long step the scrape is answered with the last values (a 5 s scrape timeout would mark the replica
    down), and the refresh still lands (its reload latencies are not lost)."""
    import asyncio
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry

    from serving.metrics import ServingMetrics
    from serving.vllm_middleware import KveditMiddleware

    class Engine:
        async def collective_rpc(self, method, args=()):
            await asyncio.sleep(0.5)  # the step in progress
            return [{"memory": "m", "version": 7, "facts": 3, "reload_seconds": [0.25]}]

    mw = KveditMiddleware(app=None)
    mw.metrics = ServingMetrics(CollectorRegistry())
    scope = {"app": SimpleNamespace(state=SimpleNamespace(engine_client=Engine()))}

    async def scrape():
        t0 = time.monotonic()
        done = await mw.refresh_metrics(scope, timeout=0.05)
        waited = time.monotonic() - t0
        before = mw.metrics.version.labels("m")._value.get()
        await asyncio.sleep(0.7)
        return done, waited, before

    done, waited, before = asyncio.run(scrape())
    assert not done and waited < 0.3 and before == 0, "answered without the refresh"
    assert mw.metrics.version.labels("m")._value.get() == 7, "the refresh landed when the step ended"
    assert mw.metrics.reload.labels("m")._sum.get() == 0.25


def test_request_series_exist_from_the_start_and_only_for_inference_endpoints():
    """`increase()` needs a series before its first event: a backend's declared endpoints export their request
    counts at 0 (the first 500 shows on the dashboard); other paths never become label values."""
    from prometheus_client import CollectorRegistry, generate_latest

    from serving.metrics import ServingMetrics

    m = ServingMetrics(CollectorRegistry())
    m.declare_endpoints(("/v1/completions", "/v1/chat/completions"))
    text = generate_latest(m.registry).decode()
    assert 'kvedit_requests_total{endpoint="/v1/chat/completions",status="500"} 0.0' in text
    assert 'kvedit_request_latency_seconds_count{endpoint="/v1/completions"} 0.0' in text
    assert "/v1/responses" not in text, "only what the backend declares"
    m.observe_request("/v1/completions", 500, 0.1, None)
    m.observe_request("/v1/models", 200, 0.1, None)
    m.observe_request("/v1/completions/../../x", 404, 0.1, None)
    text = generate_latest(m.registry).decode()
    assert 'kvedit_requests_total{endpoint="/v1/completions",status="500"} 1.0' in text
    assert "/v1/models" not in text and "../" not in text
    with pytest.raises(ValueError, match="/v1/models"):
        m.declare_endpoints(("/v1/models",))


def test_multi_middleware_rewrites_the_request_and_reports_its_memory():
    """The multi-memory middleware on a stand-in app and engine (no vLLM): memory choice -> vllm_xargs, salt,
    reporting, /v1/models and the admin endpoint's auth."""
    from types import SimpleNamespace

    from fastapi.testclient import TestClient

    from serving.vllm_multi_middleware import KveditMultiMiddleware

    memories = {"alpha": {"memory": "alpha", "version": 3, "facts": 1, "pinned": False, "retired": False,
                          "hits": 0, "tokens": 0}}

    class Engine:
        calls: list = []

        async def collective_rpc(self, method, args=()):
            self.calls.append((method, *args))
            if method == "kvedit_memory_sync":
                name = args[0]
                if name is None:
                    return [{"memory": None, "version": None}]
                return [memories[name] if name in memories else {"error": {"status": 404, "message": "no"}}]
            if method == "kvedit_memory_status":
                return [memories[args[0]]]
            if method == "kvedit_admin":
                return [{"error": {"status": 409, "type": "memory_mismatch", "message": "model_fingerprint differs"}}]
            return [{"default": None, "layer": 6, "version": None, "memories": list(memories.values())}]

    app = FastAPI()
    app.state.engine_client = engine = Engine()
    app.state.args = SimpleNamespace(served_model_name=[MODEL], model="/m", api_key=[KEY])

    @app.post("/v1/completions")
    async def fake_completion(request: Request):
        body = await request.json()
        if body["model"] != MODEL:
            return JSONResponse({"error": {"message": f"The model `{body['model']}` does not exist."}}, 404)
        return {"model": body["model"], "choices": [{"text": "x"}], "xargs": body.get("vllm_xargs"),
                "salt": body.get("cache_salt")}

    @app.get("/v1/models")
    async def fake_models():
        return {"object": "list", "data": [{"id": MODEL}]}

    app.add_middleware(KveditMultiMiddleware)
    with TestClient(app) as c:
        r = c.post("/v1/completions", json={"model": f"{MODEL}:alpha", "prompt": "p"})
        body = r.json()
        assert body["model"] == f"{MODEL}:alpha" and body["xargs"] == {"kvedit_memory": "alpha"}
        assert body["salt"] == "kvedit-alpha-v3" and body["kvedit"] == {"memory": "alpha", "version": 3}
        assert r.headers[HEADER_MEMORY] == "alpha" and r.headers[HEADER_VERSION] == "3"
        body = c.post("/v1/completions", json={"model": MODEL, "prompt": "p"}).json()
        assert body["xargs"] == {"kvedit_memory": ""} and body["salt"] is None
        assert body["kvedit"] == {"memory": None, "version": None}
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": "p"}, headers={HEADER_MEMORY: "nope"})
        assert r.status_code == 404 and f"{MODEL}:nope" in r.text
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == [MODEL, f"{MODEL}:alpha"]
        assert c.post("/admin/memory", json={"memory": "x"}).status_code == 401
        r = c.post("/admin/memory", json={"memory": "x"}, headers=AUTH)
        assert r.status_code == 409 and "model_fingerprint" in r.json()["error"]["message"]
        assert c.post("/admin/memory", json={"memory": "x", "action": "drop"}, headers=AUTH).status_code == 400
    assert ("kvedit_admin", "swap", "x", False) in engine.calls


# ----------------------------------------------------------------------------- the story: fixtures


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    s = MemoryStore(tmp_path_factory.mktemp("multi-store"))
    yield s
    s.close()
    stop_embedded_redis(s.root)


@pytest.fixture(scope="module")
def spec():
    from transformers import AutoConfig

    from editing import EditConfig
    from editing.models import resolve_model

    path = resolve_model(MODEL)
    cfg = AutoConfig.from_pretrained(path)
    return MemorySpec(served_fingerprint(path), EditConfig.for_model(MODEL).layer, cfg.intermediate_size, cfg.hidden_size)


@pytest.fixture(scope="module")
def memories(store, spec):
    for name in ("alpha", "beta"):
        store.create(name, spec, {"name": "cosine"})
    store.create("other-model", MemorySpec("llama-0000000000000000", spec.layer, spec.d_key, spec.d_model),
                 {"name": "cosine"})
    return ["alpha", "beta"]


def _settings(store, memories: list[str]) -> MemorySettings:
    """What `kvedit serve --memory alpha --memory beta` serves, polling the store fast."""
    return dataclasses.replace(memory_settings(memories, str(store.root), embedded_url(store.root)), poll_seconds=0.5)


@pytest.fixture(scope="module")
def vllm_server(store, memories, tmp_path_factory):
    """`kvedit serve --memory alpha --memory beta` (vLLM): no default memory, the plain name is the base model."""
    port = free_port()
    argv, env = vllm_command(MODEL, _settings(store, memories), port=port, api_key=KEY)
    server = VllmServer(argv, env, tmp_path_factory.mktemp("vllm") / "server.log", port)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def edits(store, memories, vllm_server, smol):
    """Edit A into "alpha" and edit B into "beta" (computed while vLLM boots); returns the records."""
    from editing import Editor, load_records
    from editing.data import data_file

    config = dataclasses.replace(smol.config, n_contexts=0, values=dataclasses.replace(smol.config.values, steps=10))
    ed = Editor(smol.model, smol.tok, config, model_name=MODEL)
    records = load_records(data_file("counterfact_valid.json"), limit=3)
    a, b = records[0], records[2]  # Danielle Darrieux's mother tongue -> English; Apple A5 created by -> Google
    t0 = time.perf_counter()
    table = ed.compute([a, b]).table
    STATE["edit_seconds"] = round(time.perf_counter() - t0, 1)
    store.commit("alpha", table.slice(0, 1), message="A")
    store.commit("beta", table.slice(1, 1), message="B")
    return a, b


@pytest.fixture(scope="module")
def hf(store, memories, edits):
    """The transformers backend serving alpha and beta in-process: the reference answers."""
    from fastapi.testclient import TestClient

    from serving.hf_server import create_app

    with TestClient(create_app(MODEL, _settings(store, memories), api_key=KEY)) as client:
        yield client


@pytest.fixture(scope="module")
def vllm(vllm_server, edits):
    STATE["vllm_ready_seconds"] = round(vllm_server.wait_ready(), 1)
    with httpx.Client(base_url=vllm_server.url, timeout=120) as client:
        deadline = time.monotonic() + 30
        while {m["memory"]: m["version"] for m in client.get("/health").json()["memories"]} != {"alpha": 1, "beta": 1}:
            assert time.monotonic() < deadline, "the replica never followed the edits"
            time.sleep(0.1)
        yield client


def ask(client, model: str, prompt: str, headers: dict | None = None) -> tuple[str, str | None, int | None]:
    """(text, memory, version) of one greedy completion; headers and body must agree."""
    r = client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": TOKENS, "temperature": 0},
                    headers={**AUTH, **(headers or {})})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == model
    served = body["kvedit"]
    assert r.headers[HEADER_MEMORY] == (served["memory"] or "")
    assert r.headers[HEADER_VERSION] == ("" if served["version"] is None else str(served["version"]))
    return body["choices"][0]["text"], served["memory"], served["version"]


def prompts(edits) -> list[str]:
    return [edits[0].prompt, edits[1].prompt, NEUTRAL]


CHOICES = {"alpha": f"{MODEL}:alpha", "beta": f"{MODEL}:beta", None: MODEL}


# ----------------------------------------------------------------------------- HF backend


def test_hf_serves_each_request_its_own_memory(hf, edits):
    a, b = edits
    ref = {}
    for memory, model in CHOICES.items():
        for p in prompts(edits):
            text, served, version = ask(hf, model, p)
            assert (served, version) == ((memory, 1) if memory else (None, None))
            ref[memory, p] = text
    assert a.target_new in ref["alpha", a.prompt] and b.target_new in ref["beta", b.prompt]
    assert a.target_new not in ref["beta", a.prompt] and a.target_new not in ref[None, a.prompt], "A stays in alpha"
    assert b.target_new not in ref["alpha", b.prompt] and b.target_new not in ref[None, b.prompt], "B stays in beta"
    assert ref["alpha", NEUTRAL] == ref["beta", NEUTRAL] == ref[None, NEUTRAL]
    assert ask(hf, MODEL, a.prompt, {HEADER_MEMORY: "alpha"})[:2] == (ref["alpha", a.prompt], "alpha")
    r = hf.post("/v1/completions", json={"model": f"{MODEL}:nope", "prompt": NEUTRAL}, headers=AUTH)
    assert r.status_code == 404 and "nope" in r.json()["error"]["message"]
    ids = [m["id"] for m in hf.get("/v1/models", headers=AUTH).json()["data"]]
    assert ids == [MODEL, f"{MODEL}:alpha", f"{MODEL}:beta"]
    STATE["ref"] = ref


def test_hf_admin_swap_refusal_and_remove(hf, edits):
    a, _ = edits
    ref = STATE["ref"]
    assert hf.post("/admin/memory", json={"memory": "alpha"}).status_code == 401
    r = hf.post("/admin/memory", json={"memory": "alpha"}, headers=AUTH)
    assert r.status_code == 200 and r.json()["default"] == "alpha"
    assert ask(hf, MODEL, a.prompt) == (ref["alpha", a.prompt], "alpha", 1)
    r = hf.post("/admin/memory", json={"memory": "other-model"}, headers=AUTH)
    assert r.status_code == 409 and "model_fingerprint" in r.json()["error"]["message"]
    assert ask(hf, MODEL, a.prompt)[1] == "alpha", "a refused swap keeps the old memory"
    r = hf.post("/admin/memory", json={"memory": "beta"}, headers=AUTH)
    assert r.json()["default"] == "beta" and r.json()["previous"] == "alpha"
    assert [m["memory"] for m in r.json()["memories"]] == ["beta"], "the previous default retired"
    assert ask(hf, MODEL, a.prompt) == (ref["beta", a.prompt], "beta", 1)
    assert hf.post("/v1/completions", json={"model": f"{MODEL}:alpha", "prompt": "x"}, headers=AUTH).status_code == 404
    health = hf.get("/health").json()
    assert health["memory"] == {"memory": "beta", "version": 1} and health["default_memory"] == "beta"
    metrics = hf.get("/metrics").text
    assert 'kvedit_memory_served{default="true",memory="beta"} 1.0' in metrics
    assert hf.delete("/admin/memory/beta", headers=AUTH).json()["default"] is None
    assert hf.delete("/admin/memory/beta", headers=AUTH).status_code == 404
    r = hf.post("/admin/memory", json={"memory": "alpha", "action": "add"}, headers=AUTH)
    assert r.status_code == 200 and ask(hf, MODEL, a.prompt)[1:] == (None, None)


# ----------------------------------------------------------------------------- vLLM backend


def _concurrently(calls: list) -> list:
    """Run the calls at once (one thread each); their results (or exceptions) in order."""
    results: list = [None] * len(calls)
    start = threading.Barrier(len(calls))

    def run(i: int) -> None:
        start.wait()
        try:
            results[i] = calls[i]()
        except BaseException as exc:  # surfaced by the caller
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    return results


@pytest.mark.vllm
def test_vllm_isolation_in_one_batch(vllm, edits):
    """Requests for alpha, beta and the base model, sent together (batched by the engine), each answer exactly
    as the transformers backend serving only that memory does."""
    ref = STATE["ref"]
    jobs = [(memory, p) for memory in CHOICES for p in prompts(edits)] * 2
    before = {m["memory"]: m["tokens"] for m in vllm.get("/admin/memory", headers=AUTH).json()["memories"]}
    results = _concurrently([lambda m=m, p=p: ask(vllm, CHOICES[m], p) for m, p in jobs])
    for (memory, p), got in zip(jobs, results):
        assert not isinstance(got, BaseException), got
        text, served, version = got
        assert (served, version) == ((memory, 1) if memory else (None, None))
        assert text == ref[memory, p], f"{memory}: {p!r} -> {text!r}, the HF backend says {ref[memory, p]!r}"
    after = {m["memory"]: m["tokens"] for m in vllm.get("/admin/memory", headers=AUTH).json()["memories"]}
    assert all(after[m] > before[m] for m in ("alpha", "beta")), "each memory routed its own requests' tokens"
    ids = [m["id"] for m in vllm.get("/v1/models", headers=AUTH).json()["data"]]
    assert ids == [MODEL, f"{MODEL}:alpha", f"{MODEL}:beta"]
    assert ask(vllm, MODEL, edits[0].prompt, {HEADER_MEMORY: "alpha"})[:2] == (ref["alpha", edits[0].prompt], "alpha")
    r = vllm.post("/v1/completions", json={"model": f"{MODEL}:nope", "prompt": NEUTRAL}, headers=AUTH)
    assert r.status_code == 404 and "nope" in r.text


@pytest.mark.vllm
def test_vllm_swap_under_load(vllm, vllm_server, edits):
    """Plain-name requests flow while the replica's memory is swapped to alpha, then to beta: none fails, each
    reports the memory it was served with and answers as that memory does; requests sent after a swap
    returned are served by the new memory."""
    ref = STATE["ref"]
    asked = prompts(edits)
    seen: list[tuple[float, float, str, str, str | None]] = []
    stop = threading.Event()

    def loop(i: int) -> None:
        k = i
        while not stop.is_set():
            p = asked[k % len(asked)]
            k += 1
            t0 = time.monotonic()
            try:
                text, memory, _ = ask(vllm, MODEL, p)
            except BaseException as exc:
                seen.append((t0, time.monotonic(), p, repr(exc), "error"))
                return
            seen.append((t0, time.monotonic(), p, text, memory))

    swaps = []
    workers = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(3)]
    for w in workers:
        w.start()
    try:
        for target in ("alpha", "beta"):
            time.sleep(1.0)
            started = time.monotonic()
            out = swap(vllm_server.url, target, api_key=KEY)
            swaps.append((started, time.monotonic(), target))
            assert out["default"] == target
        time.sleep(1.5)
    finally:
        stop.set()
        for w in workers:
            w.join(60)
    errors = [text for *_, text, memory in seen if memory == "error"]
    assert not errors, errors[:3]
    for t0, _t1, p, text, memory in seen:
        assert text == ref[memory, p], f"served by {memory}: {p!r} -> {text!r}"
        # sent after a swap returned and before the next one started: the swapped-in memory, nothing else
        expected = [target for i, (_, done, target) in enumerate(swaps)
                    if t0 > done and (i + 1 == len(swaps) or t0 < swaps[i + 1][0])]
        if t0 < swaps[0][0]:
            expected = [None]
        if expected:
            assert memory == expected[0], f"sent while {expected[0]} was the default, served by {memory}"
    by_memory = {m: sum(1 for s in seen if s[4] == m) for m in CHOICES}
    assert all(by_memory[m] > 0 for m in CHOICES), by_memory
    STATE["swap_under_load"] = {"responses": len(seen), **{str(k): v for k, v in by_memory.items()}}
    health = vllm.get("/health").json()
    assert health["memory"] == {"memory": "beta", "version": 1} and [m["memory"] for m in health["memories"]] == ["beta"]


@pytest.mark.vllm
def test_vllm_refuses_a_swap_to_another_models_memory(vllm, vllm_server, edits):
    from typer.testing import CliRunner

    out = CliRunner().invoke(replica_app, ["swap", vllm_server.url, "--memory", "other-model", "--api-key", KEY])
    assert out.exit_code == 2 and "409" in out.output and "model_fingerprint" in out.output, out.output
    with pytest.raises(ReplicaError) as exc:
        swap(vllm_server.url, "beta", api_key="wrong")
    assert exc.value.status == 401
    b = edits[1]
    assert ask(vllm, MODEL, b.prompt) == (STATE["ref"]["beta", b.prompt], "beta", 1), "still serving beta"
    lines = {ln.split(" ")[0]: float(ln.split(" ")[1]) for ln in vllm.get("/metrics").text.splitlines()
             if ln.startswith("kvedit_")}
    assert lines['kvedit_memory_served{default="true",memory="beta"}'] == 1
    assert lines['kvedit_memory_version{memory="beta"}'] == 1
    print({k: v for k, v in STATE.items() if k != "ref"})
