"""Routers, the routed layer's buffers, and second-moment statistics."""

from __future__ import annotations

import pytest
import torch

from conftest import build_tiny
from editing.adapters import get_adapter
from editing.routed import RoutedFFN
from editing.routers import mahalanobis_score, make_router, shifted_gelu_weight
from editing.stats import SecondMoment, collect_second_moment, corpus_chunks, corpus_half

D_KEY, D_MODEL = 256, 16


def _anisotropic(n, seed=0):
    """n keys from one anisotropic background distribution (fixed spectrum, shared mean)."""
    q, _ = torch.linalg.qr(torch.randn(D_KEY, D_KEY, generator=torch.Generator().manual_seed(123)))
    mix = torch.diag(torch.linspace(0.2, 2.0, D_KEY)) @ q
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D_KEY, generator=g) @ mix + 0.3


def _c0(seed=1):
    x = _anisotropic(4000, seed)
    return (x.T @ x) / x.shape[0]


@pytest.mark.parametrize("name", ["cosine", "whitened", "margin"])
def test_stored_key_routes_to_itself_and_random_key_is_gated_off(name):
    router = make_router(name, stats=_c0() if name == "whitened" else None)
    mem = RoutedFFN(router, D_KEY, D_MODEL, capacity=4)
    keys = _anisotropic(20, seed=5)
    mem.add([f"e{i}" for i in range(20)], keys, torch.randn(20, D_MODEL))
    assert mem.capacity >= 20, "capacity grows by doubling"
    best, score, weight = mem.route(keys)
    slots = torch.tensor([mem.slots[f"e{i}"] for i in range(20)])
    assert torch.equal(best, slots)
    torch.testing.assert_close(score, torch.ones(20), rtol=1e-4, atol=1e-4)
    assert (weight > 0).all()
    # Keys of other tokens, drawn from the same (background) distribution, are gated off.
    _, score_r, weight_r = mem.route(_anisotropic(50, seed=9))
    assert (weight_r == 0).all(), f"random keys must be gated off, scores {score_r.max()}"


def test_a_failed_add_leaves_the_memory_as_it_was():
    """A router that fails to derive the rows leaves no id holding a slot without a row, and the deletes of
    the same delta undone (a replica keeps serving its last version whole); a delta that frees as many rows
    as it adds does not grow full buffers (a compiled graph holds their addresses)."""
    mem = RoutedFFN(make_router("cosine"), D_KEY, D_MODEL, capacity=2)
    mem.apply(["a", "x"], _anisotropic(2), torch.randn(2, D_MODEL), [], version=1)
    buffers = mem.rows.data_ptr()
    mem.apply(["y"], _anisotropic(1, seed=4), torch.randn(1, D_MODEL), ["x"], version=2)
    mem.apply(["y"], _anisotropic(1, seed=5), torch.randn(1, D_MODEL), ["y"], version=3)  # delete and re-add
    assert mem.capacity == 2 and mem.rows.data_ptr() == buffers and sorted(mem.slots) == ["a", "y"]
    mem.delete(["y"])

    class Broken(type(mem.router)):
        def derive_rows(self, keys):
            raise RuntimeError("cannot derive")

    import editing.routed as routed_module

    real_full, calls = torch.full, []

    def short_of_memory(*args, **kwargs):  # the third buffer cannot be allocated
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return real_full(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(routed_module.torch, "full", short_of_memory)
        with pytest.raises(RuntimeError, match="out of memory"):
            mem.apply(["b", "c", "d"], _anisotropic(3, seed=6), torch.randn(3, D_MODEL), ["a"], version=4)
    assert mem.capacity == 2 and {b.shape[0] for b in (mem.rows, mem.residuals, mem.bias, mem.gain, mem.low)} == {2}
    assert list(mem.slots) == ["a"] and mem.version == 3, "a failed growth leaves the layer whole"
    mem.add(["b", "c"], _anisotropic(2, seed=6), torch.randn(2, D_MODEL))  # and it can grow later
    assert mem.capacity == 4 and sorted(mem.slots) == ["a", "b", "c"]
    mem.delete(["b", "c"])

    mem.router.__class__ = Broken
    with pytest.raises(RuntimeError, match="cannot derive"):
        mem.add(["b", "c", "d"], _anisotropic(3, seed=2), torch.randn(3, D_MODEL))
    assert list(mem.slots) == ["a"] and mem.n_facts == 1 and int(torch.isfinite(mem.bias).sum()) == 1
    with pytest.raises(RuntimeError, match="cannot derive"):
        mem.apply(["b"], _anisotropic(1, seed=2), torch.randn(1, D_MODEL), ["a"], version=9)
    assert list(mem.slots) == ["a"] and int(torch.isfinite(mem.bias).sum()) == 1 and mem.version == 3
    with pytest.raises(ValueError, match="capacity"):
        RoutedFFN(make_router("cosine"), D_KEY, D_MODEL, capacity=0)  # doubling from 0 never ends


def test_whitened_scores_equal_explicit_mahalanobis_form():
    c0 = _c0()
    router = make_router("whitened", stats=c0, ridge=0.0)
    mem = RoutedFFN(router, D_KEY, D_MODEL, capacity=8)
    keys = _anisotropic(5, seed=7)
    mem.add([str(i) for i in range(5)], keys, torch.zeros(5, D_MODEL))
    q = torch.cat([keys + 0.2 * _anisotropic(5, seed=3), _anisotropic(30, seed=8)])
    best, score, _ = mem.route(q)
    slot_to_key = {mem.slots[str(i)]: i for i in range(5)}
    explicit = torch.stack([mahalanobis_score(c0, keys[j], q) for j in range(5)], 1)  # [T, 5]
    chosen = torch.tensor([slot_to_key[int(b)] for b in best])
    torch.testing.assert_close(score.double(), explicit[torch.arange(len(q)), chosen], rtol=1e-4, atol=1e-4)
    # Perturbed stored keys still select their own row.
    assert chosen[:5].tolist() == list(range(5))


def test_margin_activation_is_silent_below_margin_and_one_at_match():
    assert shifted_gelu_weight(0.5, 0.6) == 0.0
    assert shifted_gelu_weight(1.0, 0.6) == pytest.approx(1.0)
    router = make_router("margin")
    w = router.weight(torch.tensor([0.5, 0.6, 0.8, 1.0]), torch.tensor(0.6))
    assert w[0] == 0 and w[1] == 0
    assert 0 < w[2] < 1 and w[3] == pytest.approx(1.0)
    assert w[2] == pytest.approx(shifted_gelu_weight(0.8, 0.6), rel=1e-5)


def test_forward_applies_weighted_residual_and_is_exact_elsewhere():
    mem = RoutedFFN(make_router("cosine"), D_KEY, D_MODEL)
    keys = _anisotropic(3, seed=2)
    res = torch.randn(3, D_MODEL)
    mem.add(["a", "b", "c"], keys, res)
    q = torch.cat([keys[1:2], torch.randn(1, D_KEY)])
    base = torch.randn(2, D_MODEL)
    out = mem(q, base)
    torch.testing.assert_close(out[0], base[0] + res[1])
    assert torch.equal(out[1], base[1])
    mem.add(["b"], keys[1:2], res[0:1])  # replace by id keeps the slot
    torch.testing.assert_close(mem(q, base)[0], base[0] + res[0])
    assert mem.n_facts == 3
    assert mem.delete(["b", "zzz"]) == 1
    assert torch.equal(mem(q, base), base)
    assert int(mem.hits) >= 2 and int(mem.tokens) == 6


def test_prefilter_keeps_exact_top1_decisions():
    g = torch.Generator().manual_seed(0)
    n = 5000
    # Like real FFN keys, most of the energy lies in a few directions.
    signal = torch.randn(n, 24, generator=g) @ torch.randn(24, D_KEY, generator=g)
    keys = signal + 0.3 * torch.randn(n, D_KEY, generator=g)
    exact = RoutedFFN(make_router("cosine"), D_KEY, D_MODEL, capacity=n, prefilter_dim=0)
    pre = RoutedFFN(make_router("cosine"), D_KEY, D_MODEL, capacity=n, prefilter_dim=16, prefilter_min_rows=1024,
                    candidates=32)
    ids = [str(i) for i in range(n)]
    for m in (exact, pre):
        m.add(ids, keys, torch.randn(n, D_MODEL, generator=g))
    pre.fit_basis()
    assert pre.use_prefilter
    q = keys[:200] + 0.05 * torch.randn(200, D_KEY, generator=g)
    b1, s1, w1 = exact.route(q)
    b2, s2, w2 = pre.route(q)
    assert torch.equal(b1, b2)
    torch.testing.assert_close(s1, s2)


def test_long_inputs_are_routed_in_token_chunks(monkeypatch):
    """The [tokens, slots] scores (and the prefilter's [tokens, candidates, d_key] gather) are built a chunk of
    tokens at a time, with the same decisions as in one piece."""
    from editing import routed

    g = torch.Generator().manual_seed(1)
    keys = torch.randn(300, D_KEY, generator=g)
    q = torch.cat([keys[:50] + 0.1 * torch.randn(50, D_KEY, generator=g), torch.randn(50, D_KEY, generator=g)])
    for prefilter in (False, True):
        mem = RoutedFFN(make_router("cosine"), D_KEY, D_MODEL, capacity=512, prefilter_dim=16 if prefilter else 0,
                        prefilter_min_rows=64, candidates=8)
        mem.add([str(i) for i in range(300)], keys, torch.randn(300, D_MODEL, generator=g))
        if prefilter:
            mem.fit_basis()
        assert mem.use_prefilter == prefilter
        whole = mem.route(q)
        calls = []
        real = mem._route
        monkeypatch.setattr(mem, "_route", lambda k: calls.append(k.shape[0]) or real(k))
        width = max(512, 8 * D_KEY) if prefilter else 512  # slots, or candidates x d_key when larger
        monkeypatch.setattr(routed, "ROUTE_CHUNK_ELEMENTS", 7 * width)
        chunked = mem.route(q)
        assert calls == [7] * 14 + [2], calls
        for a, b in zip(whole, chunked):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        assert torch.equal(whole[0], chunked[0]) and (whole[2] > 0).sum() >= 40


def test_routed_ffn_under_torch_compile():
    mem = RoutedFFN(make_router("cosine"), D_KEY, D_MODEL, capacity=16)
    keys = _anisotropic(4, seed=3)
    res = torch.randn(4, D_MODEL)
    mem.add(list("abcd"), keys, res)
    compiled = torch.compile(mem, fullgraph=True, dynamic=False)
    q = torch.cat([keys[:2], torch.randn(2, D_KEY)])
    base = torch.randn(4, D_MODEL)
    torch.testing.assert_close(compiled(q, base), mem(q, base))
    # Buffers updated in place after compilation are seen by the compiled graph.
    mem.delete(["a"])
    mem.threshold.fill_(0.99)
    out = compiled(q, base)
    assert torch.equal(out[0], base[0])
    torch.testing.assert_close(out[1], base[1] + res[1])


def test_statistics_shards_merge_to_whole_corpus(tokenizer):
    from editing.data import data_file

    model = build_tiny("llama")
    ad = get_adapter(model)
    text = corpus_half(data_file("wikitext2_test.raw").read_text(), "first")[:20000]
    chunks = corpus_chunks(tokenizer, text, chunk_tokens=64)
    whole = collect_second_moment(model, ad, 2, chunks, batch_size=4, meta={"layer": 2})
    a = collect_second_moment(model, ad, 2, chunks[: len(chunks) // 2], batch_size=4, meta={"layer": 2})
    b = collect_second_moment(model, ad, 2, chunks[len(chunks) // 2:], batch_size=4, meta={"layer": 2})
    merged = SecondMoment.from_bytes(a.merge(b).to_bytes())
    assert merged.count == whole.count == sum(len(c) for c in chunks)
    torch.testing.assert_close(merged.mean, whole.mean, rtol=1e-6, atol=0)
    assert torch.linalg.eigvalsh(whole.mean).min() > -1e-6  # a second moment is PSD
    with pytest.raises(ValueError, match="layer"):
        a.merge(SecondMoment.empty(ad.d_key, {"layer": 3}))


def test_thresholds_outside_a_routers_range_are_refused():
    from editing.routers import ROUTERS

    assert ROUTERS["cosine"].check_threshold(0.5) == 0.5 and ROUTERS["whitened"].check_threshold(3.0) == 3.0
    for name, bad in (("cosine", -1.5), ("cosine", 1.0), ("margin", 1.0), ("whitened", float("nan"))):
        with pytest.raises(ValueError, match=rf"{name} router: threshold"):
            ROUTERS[name].check_threshold(bad)
