"""Core engine on tiny random models of every supported family (built locally, no download)."""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, build_tiny
from editing.adapters import UnsupportedModelError, get_adapter
from editing.hooks import capture_input, edit_output
from editing.keys import compute_keys
from editing.prompts import encode
from editing.records import EditRequest
from editing.routed import RoutedFFN, attach, detach
from editing.routers import make_router
from editing.values import ValueHparams, _partition, optimise_residuals, optimise_residuals_reference

REQS = [
    EditRequest(subject="Danielle Darrieux", prompt="The mother tongue of Danielle Darrieux is", target_new="English", target_true="French"),
    EditRequest(subject="Edwin of Northumbria", prompt="Edwin of Northumbria's religious values strongly emphasize", target_new="Islam", target_true="Christianity"),
    EditRequest(subject="Toko Yasuda", prompt="Toko Yasuda, the", target_new="piano player", target_true="guitar"),
]
TEMPLATES = ["{}", "The cat sat on the mat. {}", "Because it rained. {}"]


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_key_is_down_projection_input(family, tokenizer):
    model = build_tiny(family)
    ad = get_adapter(model)
    assert ad.n_layers == 4
    ids = tokenizer(["The mother tongue of Danielle Darrieux is"], return_tensors="pt")["input_ids"]
    seen_out = {}
    with capture_input(ad.down_proj(2)) as keys, edit_output(ad.down_proj(2), lambda o: seen_out.setdefault("o", o)):
        model(input_ids=ids)
    key, out = keys[0], seen_out["o"]
    assert key.shape[-1] == ad.d_key and out.shape[-1] == ad.d_model
    bias = getattr(ad.down_proj(2), "bias", None)
    expect = key @ ad.down_weight(2).T + (0 if bias is None else bias)
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)


def test_encode_locates_the_subject_tokens_in_context(tokenizer):
    # alone "Austria" is two tokens; after "of " the leading space merges it into one
    assert len(tokenizer("Austria", add_special_tokens=False)["input_ids"]) == 2
    for prompt, subject in [("The official language of Austria is", "Austria"), (REQS[0].prompt, REQS[0].subject),
                            ("Danielle Darrieux was born in", "Danielle Darrieux")]:
        e = encode(tokenizer, prompt, subject, context="Some {{braced}} text. {}")  # "{{" is one "{" once formatted
        assert tokenizer.decode(e.ids[e.subject_first: e.subject_last + 1]).strip() == subject
        assert subject not in tokenizer.decode(e.ids[e.subject_first + 1: e.subject_last + 1])
    with pytest.raises(ValueError, match="no '{}'"):
        encode(tokenizer, REQS[0].prompt, REQS[0].subject, context="Some {{braced}} text.")


def test_key_weights_the_unprefixed_prompt(tokenizer):
    from editing.keys import context_weights

    model = build_tiny("llama")
    ad = get_adapter(model)
    per = torch.stack([compute_keys(model, tokenizer, ad, 1, REQS, [t]) for t in TEMPLATES], 1)  # [n, C, d]
    torch.testing.assert_close(compute_keys(model, tokenizer, ad, 1, REQS, TEMPLATES), per.mean(1))  # ROME's mean
    w = context_weights(TEMPLATES, 0.5)
    assert w.tolist() == [0.5, 0.25, 0.25]
    torch.testing.assert_close(compute_keys(model, tokenizer, ad, 1, REQS, TEMPLATES, weights=w),
                               0.5 * per[:, 0] + 0.5 * per[:, 1:].mean(1))
    bare = compute_keys(model, tokenizer, ad, 1, REQS, TEMPLATES, weights=context_weights(TEMPLATES, 1.0))
    torch.testing.assert_close(bare, per[:, 0])
    assert context_weights(TEMPLATES, None) is None and context_weights(["{}"], 0.5) is None
    with pytest.raises(ValueError, match="unprefixed_weight"):
        context_weights(TEMPLATES, 1.5)


def test_edit_config_rejects_a_bad_unprefixed_weight():
    from editing.editor import EditConfig

    with pytest.raises(ValueError, match="unprefixed_weight"):
        EditConfig(unprefixed_weight=-0.1)
    assert EditConfig.for_model("smollm2-135m").unprefixed_weight == 0.5


@pytest.mark.parametrize("family", FAMILIES)
def test_routed_layer_empty_is_bit_identical_and_edit_routes(family, tokenizer):
    model = build_tiny(family)
    ad = get_adapter(model)
    ids = tokenizer(["The mother tongue of Danielle Darrieux is"], return_tensors="pt")["input_ids"]
    base = model(input_ids=ids).logits
    mem = attach(model, ad, 1, RoutedFFN(make_router("cosine"), ad.d_key, ad.d_model))
    assert torch.equal(model(input_ids=ids).logits, base), "empty memory must be bit-identical"
    keys = compute_keys(model, tokenizer, ad, 1, REQS[:1], ["{}"])
    mem.add(["e1"], keys, torch.full((1, ad.d_model), 3.0))
    edited = model(input_ids=ids).logits
    pos = encode(tokenizer, REQS[0].prompt, REQS[0].subject).subject_last
    assert torch.equal(edited[0, :pos], base[0, :pos]), "tokens before the subject are untouched"
    assert not torch.allclose(edited[0, pos:], base[0, pos:]), "the stored key must gate on at the subject"
    mem.enabled.fill_(False)
    assert torch.equal(model(input_ids=ids).logits, base), "routing off must be bit-identical"
    mem.enabled.fill_(True)
    mem.delete(["e1"])
    assert torch.equal(model(input_ids=ids).logits, base), "deleting restores the exact logits"
    detach(model, ad, 1)
    assert type(ad.down_proj(1)).__name__ != "RoutedDownProj"


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_truncated_optimiser_matches_reference(family, tokenizer):
    model = build_tiny(family)
    ad = get_adapter(model)
    hp = ValueHparams(steps=6, lr=0.1)
    fast = optimise_residuals(model, tokenizer, ad, 1, REQS, TEMPLATES, hp)
    ref = optimise_residuals_reference(model, tokenizer, ad, 1, REQS, TEMPLATES, hp)
    assert fast.steps == ref.steps
    torch.testing.assert_close(fast.loss, ref.loss, rtol=1e-4, atol=0)
    torch.testing.assert_close(fast.residuals, ref.residuals, rtol=0, atol=1e-3)
    assert fast.residuals.abs().sum() > 0, "the optimiser must move the residuals"
    assert (fast.loss < ref.loss.new_tensor([float("inf")])).all()


def test_optimiser_clamp_matches(tokenizer):
    model = build_tiny("llama", seed=3)
    ad = get_adapter(model)
    # A large lr and a tight clamp make the clamp bind on every step.
    hp = ValueHparams(steps=8, lr=2.0, clamp_norm_factor=0.5, stop_loss=0.0)
    fast = optimise_residuals(model, tokenizer, ad, 2, REQS, TEMPLATES, hp)
    ref = optimise_residuals_reference(model, tokenizer, ad, 2, REQS, TEMPLATES, hp)
    assert fast.steps == ref.steps == [7, 7, 7]
    torch.testing.assert_close(fast.residuals, ref.residuals, rtol=0, atol=1e-3)
    loose = optimise_residuals(model, tokenizer, ad, 2, REQS, TEMPLATES, ValueHparams(steps=8, lr=2.0, clamp_norm_factor=50.0, stop_loss=0.0))
    assert (fast.residuals.norm(dim=-1) < loose.residuals.norm(dim=-1)).all(), "the clamp must bind"


def test_optimiser_staggered_early_stop_matches(tokenizer):
    model = build_tiny("llama", seed=3)
    ad = get_adapter(model)
    # A stop loss between the lowest NLL before and after one update stops some edits after that
    # update (their Adam state is then live and must not move them) while the others go on. No
    # weight decay and a loose clamp, so the target NLL drives delta.
    settings = dict(lr=1.0, clamp_norm_factor=1e4, weight_decay=0.0)
    nll = [optimise_residuals_reference(model, tokenizer, ad, 2, REQS, TEMPLATES,
                                        ValueHparams(steps=s, stop_loss=0.0, **settings)).nll for s in (1, 2)]
    hp = ValueHparams(steps=8, stop_loss=float(nll[0].min() + nll[1].min()) / 2, **settings)
    fast = optimise_residuals(model, tokenizer, ad, 2, REQS, TEMPLATES, hp)
    ref = optimise_residuals_reference(model, tokenizer, ad, 2, REQS, TEMPLATES, hp)
    assert fast.steps == ref.steps and any(0 < s < 7 for s in ref.steps) and 7 in ref.steps, ref.steps
    torch.testing.assert_close(fast.loss, ref.loss, rtol=1e-4, atol=0)
    torch.testing.assert_close(fast.residuals, ref.residuals, rtol=0, atol=1e-3)


@pytest.mark.parametrize("optimise", [optimise_residuals, optimise_residuals_reference])
def test_optimiser_fits_on_the_base_output_at_the_subject(optimise, tokenizer):
    """Sequential editing: an earlier row that fires at an edit's subject token is replaced there by
    the edit's own row once it is added, so the residual must be fitted as if that row were not live."""
    model = build_tiny("llama", seed=3)
    ad = get_adapter(model)
    hp = ValueHparams(steps=6, lr=0.1)
    plain = optimise(model, tokenizer, ad, 1, REQS, ["{}"], hp)
    mem = attach(model, ad, 1, RoutedFFN(make_router("cosine"), ad.d_key, ad.d_model, threshold=0.999))
    keys = compute_keys(model, tokenizer, ad, 1, REQS, ["{}"])  # fire at the prompts' subject tokens only
    mem.add(["a", "b", "c"], keys, 3.0 * torch.randn(3, ad.d_model, generator=torch.Generator().manual_seed(0)))
    ids = tokenizer([REQS[0].prompt], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        model(input_ids=ids)
    assert mem.hits.item() == 1, "the row must fire at the subject token (and nowhere else) of its prompt"
    try:
        live = optimise(model, tokenizer, ad, 1, REQS, ["{}"], hp)
    finally:
        detach(model, ad, 1)
    torch.testing.assert_close(live.residuals, plain.residuals, rtol=0, atol=1e-4)
    torch.testing.assert_close(live.loss, plain.loss, rtol=1e-4, atol=0)


def test_suffix_groups_minimise_the_padded_area():
    import itertools
    import random

    def area(need, ends):
        return sum((j - i) * need[j - 1] for i, j in zip([0] + ends[:-1], ends))

    rng = random.Random(0)
    for _ in range(30):
        need = sorted(rng.randint(1, 9) for _ in range(rng.randint(1, 9)))
        k = rng.randint(1, 4)
        ends = _partition(need, k)
        assert ends[-1] == len(need) and len(ends) <= k and ends == sorted(set(ends))
        best = min(area(need, list(c) + [len(need)])
                   for g in range(min(k, len(need))) for c in itertools.combinations(range(1, len(need)), g))
        assert area(need, ends) == best


def test_unsupported_family_is_refused():
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    with pytest.raises(UnsupportedModelError, match="bert"):
        get_adapter(model)


def test_families_whose_ffn_output_is_normed_or_scaled_are_refused():
    """Gemma-2 norms the FFN output before the residual add and soft-caps its logits: a residual fitted in the
    residual stream would be applied in the wrong place, so the family is refused with the reason."""
    from transformers import AutoModelForCausalLM, Gemma2Config

    cfg = Gemma2Config(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    with pytest.raises(UnsupportedModelError, match="post-feedforward norm"):
        get_adapter(AutoModelForCausalLM.from_config(cfg))
    capped = build_tiny("llama")
    capped.config.final_logit_softcapping = 30.0
    with pytest.raises(UnsupportedModelError, match="soft-capped"):
        get_adapter(capped)


def test_fingerprint_leaves_out_an_attached_memory(tokenizer):
    """Edit ids, memory specs and cached statistics carry the model's fingerprint: computed while a memory is
    attached (as `kvedit eval` first did) it must still be the plain model's, the one a replica serves."""
    from editing.models import fingerprint

    plain = fingerprint(build_tiny("llama"))
    model = build_tiny("llama")
    ad = get_adapter(model)
    mem = attach(model, ad, 1, RoutedFFN(make_router("cosine"), ad.d_key, ad.d_model))
    mem.add(["e1"], torch.randn(1, ad.d_key), torch.randn(1, ad.d_model))
    assert fingerprint(model) == plain
    assert fingerprint(build_tiny("llama", seed=1)) != plain, "other weights, another fingerprint"


def test_layer_out_of_range(tokenizer):
    ad = get_adapter(build_tiny("llama"))
    with pytest.raises(ValueError, match="out of range"):
        ad.down_proj(4)


def test_withdrawal_separates_deleted_edits_whose_subject_a_kept_edit_shares(tokenizer):
    """A deleted edit whose subject a kept edit also has still meets that edit's row (zsRE repeats
    subjects); it counts against `withdrawal_reverted` but not `withdrawal_reverted_unshared`."""
    from types import SimpleNamespace

    from editing.evaluate import next_token_logits, withdrawal, withdrawn_prompts

    model = build_tiny("llama")
    ad = get_adapter(model)
    reqs = [
        EditRequest(subject="Danielle Darrieux", prompt="The mother tongue of Danielle Darrieux is", target_new="English", target_true="French"),
        # same subject, same words before it: the same key at the subject's last token
        EditRequest(subject="Danielle Darrieux", prompt="The mother tongue of Danielle Darrieux was", target_new="German", target_true="French"),
        REQS[1],
        REQS[2],
    ]
    base = next_token_logits(model, tokenizer, withdrawn_prompts(reqs))
    mem = attach(model, ad, 1, RoutedFFN(make_router("cosine"), ad.d_key, ad.d_model, threshold=0.99))
    mem.add(["a", "b", "c", "d"], compute_keys(model, tokenizer, ad, 1, reqs, ["{}"]), torch.full((4, ad.d_model), 3.0))
    out = withdrawal(SimpleNamespace(model=model, tok=tokenizer, memory=mem), reqs, ["a", "b", "c", "d"], base)
    assert out["withdrawal_reverted"] == 0.5  # "a" still meets "b"'s row; "c" is the unedited model again
    assert out["withdrawal_shared_subject"] == 0.5 and out["withdrawal_reverted_unshared"] == 1.0
    assert sorted(mem.slots) == ["b", "d"]
    # a tiny residual from the kept row moves "a"'s logits but not its predicted token
    mem.clear()
    mem.add(["a", "b", "c", "d"], compute_keys(model, tokenizer, ad, 1, reqs, ["{}"]), torch.full((4, ad.d_model), 1e-3))
    out = withdrawal(SimpleNamespace(model=model, tok=tokenizer, memory=mem), reqs, ["a", "b", "c", "d"], base)
    assert out["withdrawal_reverted"] == 0.5 and out["withdrawal_reverted_top1"] == 1.0


def test_robust_key_rank_grows_with_the_memory():
    from editing.rep import RobustKeyHparams

    hp = RobustKeyHparams()
    assert [hp.rank_for(n, 1536) for n in (1, 100, 101, 400, 10**5)] == [64, 64, 128, 256, 1536]
    assert RobustKeyHparams(rank=8).rank_for(400, 1536) == 8
