"""Correctness tests of the models: causality, padding, routes, attention, ablations, overfit."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from retr.config import flat_dict
from retr.errors import ConfigError
from retr.models import MODELS, build_model, config_class, model_names
from retr.models.base import SequentialRecommender
from retr.models.bert4rec import BERT4Rec, cloze_batch
from retr.models.kernels import dropout_attention
from retr.models.layers import (
    Dropout,
    MultiHeadAttention,
    attention_mask,
    count_parameters,
)
from retr.models.pathway import (
    PathwayAttention,
    PathwayRouter,
    RouterOptions,
    pool_on_route,
    straight_through_gumbel,
)
from retr.models.retr import RETR, RETRConfig
from retr.models.sasrec import SASRecConfig

N_ITEMS, N, D = 30, 12, 16
ROUTER = dict(router_hidden=8)
TINY: dict[str, tuple[str, dict[str, Any]]] = {
    "retr": ("retr", dict(hidden_size=D, num_heads=2, num_layers=2, max_len=16, ffn_size=D,
                          **ROUTER)),
    "sasrec": ("sasrec", dict(hidden_size=D, num_heads=2, num_layers=2, max_len=16)),
    "sasrec_pathway": ("sasrec", dict(hidden_size=D, num_heads=2, num_layers=2, max_len=16,
                                      attention="pathway", **ROUTER)),
    "gru4rec": ("gru4rec", dict(embedding_size=D, hidden_size=D, max_len=16)),
    "bert4rec": ("bert4rec", dict(hidden_size=D, num_heads=2, num_layers=2, max_len=16,
                                  ffn_size=4 * D)),
    "bert4rec_pathway": ("bert4rec", dict(hidden_size=D, num_heads=2, num_layers=2, max_len=16,
                                          ffn_size=4 * D, attention="pathway", **ROUTER)),
    "retr_keys": ("retr", dict(hidden_size=D, num_heads=2, num_layers=2, max_len=16, ffn_size=D,
                               gate="keys", **ROUTER)),
}
CAUSAL = ["retr", "sasrec", "sasrec_pathway", "gru4rec", "retr_keys"]
TRANSFORMERS = ["retr", "sasrec", "sasrec_pathway", "bert4rec", "bert4rec_pathway", "retr_keys"]
PATHWAY = ["retr", "sasrec_pathway", "bert4rec_pathway", "retr_keys"]


def tiny(key: str, seed: int = 0, **overrides: Any) -> Any:
    name, fields = TINY[key]
    torch.manual_seed(seed)
    return build_model(name, N_ITEMS, {**fields, **overrides})


def batch(seed: int = 0) -> torch.Tensor:
    """[4, N] left-padded histories of lengths N, 7, 3 and 1."""
    g = torch.Generator().manual_seed(seed)
    seqs = torch.randint(1, N_ITEMS + 1, (4, N), generator=g)
    for row, length in enumerate((N, 7, 3, 1)):
        seqs[row, : N - length] = 0
    return seqs


def run(model: SequentialRecommender, seqs: torch.Tensor, seed: int | None = None,
        attentions: bool = True) -> Any:
    if seed is not None:
        torch.manual_seed(seed)
    return model(seqs, output_attentions=attentions)


def change_at(seqs: torch.Tensor, j: int) -> torch.Tensor:
    """Replace every real item at position j by a different real item."""
    out = seqs.clone()
    out[:, j] = torch.where(seqs[:, j] > 0, seqs[:, j] % N_ITEMS + 1, seqs[:, j])
    return out


def assert_prefix_equal(a: Any, b: Any, j: int) -> None:
    torch.testing.assert_close(a.hidden[:, :j], b.hidden[:, :j], rtol=0, atol=1e-5)
    for name in ("attentions", "routes", "keep_probs"):
        for x, y in zip(getattr(a, name) or [], getattr(b, name) or [], strict=True):
            torch.testing.assert_close(x[..., :j, :] if x.dim() == 4 else x[:, :j],
                                       y[..., :j, :] if y.dim() == 4 else y[:, :j],
                                       rtol=0, atol=1e-5)


# ---------------------------------------------------------------- causality and padding


@pytest.mark.parametrize("key", CAUSAL)
def test_causal_models_never_look_ahead_eval(key: str) -> None:
    model = tiny(key).eval()
    seqs = batch()
    with torch.no_grad():
        base = run(model, seqs)
        for j in range(N):
            changed = run(model, change_at(seqs, j))
            assert_prefix_equal(base, changed, j)
            assert not torch.allclose(base.hidden[0, j], changed.hidden[0, j])


@pytest.mark.parametrize("key", ["retr", "sasrec_pathway", "retr_keys"])
def test_causal_in_training_mode_with_router_and_dropout(key: str) -> None:
    model = tiny(key, dropout=0.3).train()
    seqs = batch()
    with torch.no_grad():
        base = run(model, seqs, seed=7)
        for j in range(1, N):
            assert_prefix_equal(base, run(model, change_at(seqs, j), seed=7), j)


@pytest.mark.parametrize("training", [True, False])
def test_sparse_path_never_looks_ahead(training: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A budgeted RETR that drops most tokens takes the sparse path (in training with its
    straight-through route too), with its kept queries in chunks: changing a future item never
    changes an earlier state. No attention dropout: with it, the draws' layout follows the
    number of kept queries, as it follows the length groups."""
    import retr.models.layers as layers

    monkeypatch.setattr(layers, "ATTENTION_CHUNK", 2)
    calls = []
    active = layers.MultiHeadAttention.forward_active
    monkeypatch.setattr(layers.MultiHeadAttention, "forward_active",
                        lambda self, *a: calls.append(1) or active(self, *a))
    model = tiny("retr", dropout=0.0, keep_target=0.25, keep_weight=1.0, omega_floor=0.1,
                 inference_rule="threshold").train(training)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.router.keep_mlp[-1].bias.copy_(torch.tensor([0.8, -0.8]))
            if block.attn.router.threshold is not None:
                block.attn.router.threshold.fill_(1.0)
    seqs = batch()
    with torch.no_grad():
        base = run(model, seqs, seed=7, attentions=False)
        assert calls
        for j in range(1, N):
            changed = run(model, change_at(seqs, j), seed=7, attentions=False)
            torch.testing.assert_close(base.hidden[:, :j], changed.hidden[:, :j], rtol=0,
                                       atol=1e-5)


def test_global_pooling_leaks_the_future_into_earlier_routes() -> None:
    """The paper's literal pool lets item j change α_t for t < j; the causal pool does not."""
    seqs = batch()
    j = N - 1
    for pooling, leaks in (("global", True), ("causal", False)):
        model = tiny("retr", pooling=pooling).eval()
        with torch.no_grad():
            a, b = run(model, seqs), run(model, change_at(seqs, j))
        same = all(torch.allclose(x[:, :j], y[:, :j], atol=1e-6)
                   for x, y in zip(a.keep_probs, b.keep_probs, strict=True))
        assert same is not leaks, pooling


@pytest.mark.parametrize("key", list(TINY))
def test_more_left_padding_changes_nothing(key: str) -> None:
    model = tiny(key).eval()
    seqs = batch()
    longer = torch.cat([torch.zeros(4, 4, dtype=seqs.dtype), seqs], dim=1)  # [4, N + 4]
    with torch.no_grad():
        a, b = run(model, seqs), run(model, longer)
        torch.testing.assert_close(a.hidden, b.hidden[:, 4:], rtol=0, atol=1e-5)
        # BERT4Rec's appended [mask] pushes the oldest item of a full window (row 0) out
        rows = slice(1, None) if key.startswith("bert4rec") else slice(None)
        torch.testing.assert_close(model.user_representation(seqs)[rows],
                                   model.user_representation(longer)[rows], rtol=0, atol=1e-5)
    for x, y in zip(a.routes or [], b.routes or [], strict=True):
        assert torch.equal(x, y[:, 4:])


@pytest.mark.parametrize("key", list(TINY))
@pytest.mark.parametrize("training", [False, True])
def test_all_padding_rows_are_finite(key: str, training: bool) -> None:
    model = tiny(key).train(training)
    seqs = batch()
    seqs[2] = 0
    for attentions in (False, True):
        out = run(model, seqs, seed=0, attentions=attentions)
        assert torch.isfinite(out.hidden).all()
        assert torch.isfinite(model.user_representation(seqs)).all()
        for name in ("attentions", "routes", "keep_probs"):
            assert all(torch.isfinite(x).all() for x in getattr(out, name) or [])
        for r in out.routes or []:
            assert r[2].abs().sum() == 0


# ---------------------------------------------------------------- outputs and attention


@pytest.mark.parametrize("key", list(TINY))
def test_output_shapes_and_attentions_only_when_asked(key: str) -> None:
    model = tiny(key).eval()
    seqs = batch()
    with torch.no_grad():
        plain = run(model, seqs, attentions=False)
        full = run(model, seqs)
    assert plain.attentions is None and plain.routes is None and plain.keep_probs is None
    torch.testing.assert_close(plain.hidden, full.hidden, rtol=0, atol=1e-5)  # fast == explicit
    width = D + 1 if key.startswith("bert4rec") else D
    assert plain.hidden.shape == (4, N, width)
    assert model.item_representation(torch.tensor([[1, 2, 3]])).shape == (1, 3, width)
    assert model.user_representation(seqs).shape == (4, width)
    if key in TRANSFORMERS:
        assert full.attentions is not None and len(full.attentions) == 2
        assert all(a.shape == (4, 2, N, N) for a in full.attentions)
    if key in PATHWAY:
        assert len(full.routes) == 2 and all(r.shape == (4, N) for r in full.routes)
        assert len(full.keep_probs) == 2 and all(p.shape == (4, N) for p in full.keep_probs)
    else:
        assert full.routes is None and full.keep_probs is None


@pytest.mark.parametrize("key", TRANSFORMERS)
def test_attention_rows_are_distributions_over_allowed_keys(key: str) -> None:
    model = tiny(key).eval()
    seqs = batch()
    real = seqs != 0
    with torch.no_grad():
        out = run(model, seqs)
    allowed = real[:, None, None, :].expand(4, 1, N, N)  # [B, 1, N, N] real keys
    if model.causal:
        allowed = allowed & torch.ones(N, N, dtype=torch.bool).tril()
    for w in out.attentions:
        sums = w.sum(-1)  # [B, h, N]
        torch.testing.assert_close(sums[real[:, None, :].expand_as(sums)],
                                   torch.ones(int(real.sum()) * 2))
        assert (w.masked_select(~allowed.expand_as(w)) == 0).all()  # future and padding keys
        assert (w.masked_select(~real[:, None, :, None].expand_as(w)) == 0).all()  # pad queries


@pytest.mark.parametrize("query_bias", ["on_route", "always"])
def test_off_route_query_equals_attention_with_zero_query(query_bias: str) -> None:
    """on_route (default): Q = (R ⊙ Z) W_Q + R b_Q, an off-route query is 0 and its attention
    is uniform over its causal prefix; always: it is b_Q, the zero vector through W_Q + b_Q."""
    torch.manual_seed(0)
    mha = MultiHeadAttention(D, 2, 0.0, causal=True, out_proj=False)
    with torch.no_grad():
        mha.query.bias.normal_()  # a bias to tell the two readings apart
    router = PathwayRouter(D, RouterOptions(router="random", random_keep_prob=0.5,
                                            query_bias=query_bias))
    layer = PathwayAttention(mha, router).eval()
    z = torch.randn(4, N, D)
    real = batch() != 0
    with torch.no_grad():
        torch.manual_seed(1)
        out, weights, route, _ = layer(z, z, real, real.float(), output_attentions=True)
        plain, _ = mha(z, z, real)  # every query on the route
        zero, _ = mha(torch.zeros_like(z), z, real)  # every query built from the zero vector
        no_bias, _ = mha(torch.zeros_like(z), z, real,
                         query_gate=torch.zeros(4, N))  # the zero query itself
    on, off = route.bool(), real & ~route.bool()
    assert on.any() and off.any()
    torch.testing.assert_close(out[on], plain[on])
    if query_bias == "always":
        torch.testing.assert_close(out[off], zero[off])
        assert not torch.allclose(out[off], no_bias[off])
    else:
        torch.testing.assert_close(out[off], no_bias[off])
        prefix = (real[:, None, :] & torch.ones(N, N, dtype=torch.bool).tril())  # [B, N, N]
        uniform = prefix / prefix.sum(-1, keepdim=True).clamp_min(1)
        for h in range(2):
            torch.testing.assert_close(weights[:, h][off], uniform[off].float())


# ---------------------------------------------------------------- routes


@pytest.mark.parametrize("key", PATHWAY)
@pytest.mark.parametrize("training", [False, True])
def test_routes_binary_hierarchical_and_never_on_padding(key: str, training: bool) -> None:
    model = tiny(key).train(training)
    seqs = batch()
    real = seqs != 0
    out = run(model, seqs, seed=3)
    prev = real.float()
    for r, p in zip(out.routes, out.keep_probs, strict=True):
        assert ((r == 0) | (r == 1)).all()
        assert (r <= prev).all()  # R^l = R̂^l ⊙ R^{l-1}
        assert (r[~real] == 0).all() and (p[~real] == 0).all()
        assert ((p >= 0) & (p <= 1)).all()
        prev = r


def test_inference_route_deterministic_and_sample_option() -> None:
    seqs = batch()
    model = tiny("retr").eval()
    with torch.no_grad():
        a, b = run(model, seqs, seed=1), run(model, seqs, seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a.routes, b.routes, strict=True))
    torch.testing.assert_close(a.hidden, b.hidden, rtol=0, atol=0)
    # deterministic rule: keep iff α >= 1/2 (ω > 0 at initialisation)
    assert torch.equal(a.routes[0], ((a.keep_probs[0] >= 0.5) & (seqs != 0)).float())
    sampler = tiny("retr", inference_route="sample").eval()
    with torch.no_grad():
        c, d = run(sampler, seqs, seed=1), run(sampler, seqs, seed=2)
    assert not all(torch.equal(x, y) for x, y in zip(c.routes, d.routes, strict=True))


def next_item_loss(model: SequentialRecommender, seqs: torch.Tensor) -> torch.Tensor:
    """Plain cross-entropy next-item loss on the shifted sequence (inputs s_{<N}, targets s_{>1})."""
    inputs, targets = seqs[:, :-1], seqs[:, 1:]
    h = model(inputs).hidden  # [B, N-1, d]
    logits = h @ model.item_representation(torch.arange(N_ITEMS + 1)).T  # [B, N-1, n+1]
    keep = (inputs > 0) & (targets > 0)
    return F.cross_entropy(logits[keep], targets[keep])


@pytest.mark.parametrize("key", ["retr", "sasrec_pathway"])
def test_straight_through_gradients_reach_the_router(key: str) -> None:
    model = tiny(key).train()
    seqs = torch.randint(1, N_ITEMS + 1, (16, N), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    next_item_loss(model, seqs).backward()
    for block in model.blocks:
        router = block.attn.router
        for part in ("context_mlp", "keep_mlp", "omega_mlp"):
            grads = [p.grad for p in getattr(router, part).parameters()]
            assert all(g is not None and g.abs().sum() > 0 for g in grads), part


def test_straight_through_gumbel_forward_is_binary_and_omega_controls_sharpness() -> None:
    log_pi = torch.log(torch.tensor([0.1, 0.9])).expand(20000, 1, 2)  # α = 0.9 everywhere
    torch.manual_seed(0)
    coin = straight_through_gumbel(0.0 * log_pi)  # ω = 0: pure noise, a fair coin
    sharp = straight_through_gumbel(50.0 * log_pi)  # large ω: nearly always α >= 1/2
    plain = straight_through_gumbel(1.0 * log_pi)  # ω = 1: keep with probability α
    assert ((coin == 0) | (coin == 1)).all()
    assert abs(coin.mean().item() - 0.5) < 0.02
    assert sharp.mean().item() > 0.999
    assert abs(plain.mean().item() - 0.9) < 0.02
    scaled = (1.0 * log_pi[:4]).clone().requires_grad_(True)
    straight_through_gumbel(scaled).sum().backward()
    assert scaled.grad is not None and (scaled.grad[..., 1] > 0).all()  # ∂v_keep/∂ log α > 0


def test_causal_prefix_pool_matches_its_definition() -> None:
    z = torch.randn(2, 5, 3)
    route = torch.tensor([[0, 1, 1, 0, 1], [0, 0, 0, 0, 0]], dtype=torch.float)
    pooled = pool_on_route(z, route, "causal")
    for t in range(5):
        w = route[0, : t + 1]
        expect = (w[:, None] * z[0, : t + 1]).sum(0) / w.sum().clamp_min(1)
        torch.testing.assert_close(pooled[0, t], expect)
    assert (pooled[1] == 0).all()
    glob = pool_on_route(z, route, "global")
    torch.testing.assert_close(glob[0, 0], z[0, [1, 2, 4]].mean(0))


# ---------------------------------------------------------------- ablation switches


def test_random_router_ignores_input_and_has_no_parameters() -> None:
    model = tiny("retr", router="random", random_keep_prob=0.7).train()
    seqs = torch.randint(1, N_ITEMS + 1, (4, N), generator=torch.Generator().manual_seed(1))
    other = torch.randint(1, N_ITEMS + 1, (4, N), generator=torch.Generator().manual_seed(2))
    a, b = run(model, seqs, seed=5), run(model, other, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a.routes, b.routes, strict=True))
    assert all(torch.allclose(p, torch.full_like(p, 0.7)) for p in a.keep_probs)
    assert all(count_parameters(blk.attn.router) == 0 for blk in model.blocks)


def test_hierarchical_off_allows_reentry() -> None:
    seqs = torch.randint(1, N_ITEMS + 1, (8, N), generator=torch.Generator().manual_seed(0))
    flat = tiny("retr", router="random", hierarchical=False).train()
    out = run(flat, seqs, seed=0)
    assert ((out.routes[0] == 0) & (out.routes[1] == 1)).any()  # dropped, then back
    tree = tiny("retr", router="random", hierarchical=True).train()
    out = run(tree, seqs, seed=0)
    assert not ((out.routes[0] == 0) & (out.routes[1] == 1)).any()


def test_fixed_tau_changes_gradients_not_samples() -> None:
    """argmax((log π + G)/τ) does not depend on τ; the relaxed v (the gradient) does."""
    seqs = torch.randint(1, N_ITEMS + 1, (8, N), generator=torch.Generator().manual_seed(0))
    cold = tiny("retr", gumbel="fixed", tau=0.5).train()
    hot = tiny("retr", gumbel="fixed", tau=2.0).train()
    hot.load_state_dict(cold.state_dict())
    assert all(blk.attn.router.omega_mlp is None for blk in cold.blocks)
    grads = []
    for model in (cold, hot):
        torch.manual_seed(0)
        out = model(seqs[:, :-1], output_attentions=True)
        torch.manual_seed(0)
        next_item_loss(model, seqs).backward()
        grads.append(model.blocks[0].attn.router.keep_mlp[0].weight.grad)
        if model is cold:
            routes = out.routes
    assert all(torch.equal(x, y) for x, y in zip(routes, out.routes, strict=True))
    assert not torch.allclose(grads[0], grads[1], rtol=1e-2, atol=0)


def test_adaptive_and_fixed_have_the_documented_parameters() -> None:
    adaptive = tiny("retr")
    fixed = tiny("retr", gumbel="fixed")
    assert count_parameters(adaptive) - count_parameters(fixed) == 2 * (D * 8 + 8 + 8 + 1)


# ---------------------------------------------------------------- BERT4Rec


def test_cloze_batch_properties() -> None:
    g = torch.Generator().manual_seed(0)
    seqs = torch.randint(1, N_ITEMS + 1, (200, 50), generator=g)
    lengths = torch.randint(0, 51, (200,), generator=g)
    seqs[torch.arange(50)[None, :] < (50 - lengths)[:, None]] = 0
    seqs[0], seqs[1, :-1] = 0, 0  # one empty row, one row with a single item
    mask_id = N_ITEMS + 1
    masked, labels = cloze_batch(seqs, mask_id, 0.2, torch.Generator().manual_seed(1))
    again = cloze_batch(seqs, mask_id, 0.2, torch.Generator().manual_seed(1))
    assert torch.equal(masked, again[0]) and torch.equal(labels, again[1])
    is_masked = labels > 0
    assert torch.equal(is_masked, masked == mask_id)
    assert torch.equal(labels[is_masked], seqs[is_masked])
    assert torch.equal(masked[~is_masked], seqs[~is_masked])
    assert not is_masked[seqs == 0].any()  # padding never masked
    nonempty = (seqs > 0).any(1)
    assert is_masked[nonempty].any(1).all() and not is_masked[~nonempty].any()
    assert abs(is_masked.sum().item() / (seqs > 0).sum().item() - 0.2) < 0.03
    _, labels = cloze_batch(seqs, mask_id, 0.2, g, last_item_mask_prob=1.0)
    expect = torch.zeros_like(is_masked)
    expect[:, -1] = nonempty  # only the most recent item of each non-empty row
    assert torch.equal(labels > 0, expect)


def test_bert4rec_output_layer_and_mask_token() -> None:
    model = tiny("bert4rec").eval()
    assert isinstance(model, BERT4Rec) and model.mask_id == N_ITEMS + 1
    seqs = batch()
    masked, labels = model.cloze_batch(seqs, torch.Generator().manual_seed(0))
    assert (masked[labels > 0] == N_ITEMS + 1).all()
    with torch.no_grad():
        h = model(seqs).hidden
        assert (h[..., -1][seqs > 0] == 1).all()
        appended = torch.cat([seqs[:, 1:], torch.full((4, 1), N_ITEMS + 1)], dim=1)
        torch.testing.assert_close(model.user_representation(seqs), model(appended).hidden[:, -1])
        items = torch.arange(1, N_ITEMS + 1)
        scores = model.score_items(h[:, -1], items)  # GELU(hW+b) E^T + b^O
        expect = h[:, -1, :-1] @ model.item_embedding(items).T + model.output_bias[items]
        torch.testing.assert_close(scores, expect)


# ---------------------------------------------------------------- learning


@pytest.mark.parametrize("key", ["retr", "sasrec"])
def test_overfits_a_handful_of_sequences(key: str) -> None:
    """Six histories whose prefixes are all distinct: next-item CE must memorise them."""
    g = torch.Generator().manual_seed(0)
    seqs = torch.stack([torch.randperm(N_ITEMS, generator=g)[:N] + 1 for _ in range(6)])
    seqs[:, 0] = torch.arange(1, 7)  # distinct first items: every prefix has one answer
    name, fields = TINY[key]
    torch.manual_seed(0)
    model = build_model(name, N_ITEMS, {**fields, "hidden_size": 32, "num_heads": 2,
                                        "dropout": 0.0})
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(100):
        opt.zero_grad()
        next_item_loss(model, seqs).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        h = model(seqs[:, :-1]).hidden
        pred = (h @ model.item_representation(torch.arange(1, N_ITEMS + 1)).T).argmax(-1) + 1
    assert (pred == seqs[:, 1:]).float().mean().item() >= 0.95


# ---------------------------------------------------------------- registry and sizes


def test_registry_builds_every_model_and_rejects_bad_configs() -> None:
    assert set(model_names()) == {"pop", "retr", "sasrec", "bert4rec", "gru4rec"}
    for name in model_names():
        cfg_cls, model_cls = MODELS[name]
        assert config_class(name) is cfg_cls and dataclasses.is_dataclass(cfg_cls)
        model = build_model(name, N_ITEMS, cfg_cls())
        assert isinstance(model, model_cls) and model.name == name
        for value in flat_dict(cfg_cls()).values():  # one flat [model] table of scalars
            assert isinstance(value, int | float | str | bool)
    with pytest.raises(ConfigError, match="valid names"):
        build_model("nope", N_ITEMS)
    with pytest.raises(ConfigError, match="unknown key"):
        build_model("retr", N_ITEMS, {"hidden": 8})
    with pytest.raises(ConfigError, match="router"):
        build_model("retr", N_ITEMS, {"router": "off"})
    with pytest.raises(ConfigError, match="divisible"):
        build_model("sasrec", N_ITEMS, {"hidden_size": 10, "num_heads": 4})
    with pytest.raises(ConfigError):
        build_model("retr", N_ITEMS, SASRecConfig())


def test_router_is_light_at_paper_size() -> None:
    retr = RETR(3416, RETRConfig())
    sasrec = build_model("sasrec", 3416, SASRecConfig(hidden_size=256, num_heads=4,
                                                      num_layers=2, max_len=200))
    ratio = count_parameters(retr) / count_parameters(sasrec)
    assert 1.0 < ratio < 1.1


@pytest.mark.parametrize("key", list(TINY))
def test_user_representation_is_the_full_forward_at_the_last_position(key: str) -> None:
    """The last-position shortcut of inference changes nothing but the work done."""
    model = tiny(key).eval()
    seqs = batch(3)
    with torch.no_grad():
        h = model.user_representation(seqs)
        if key.startswith("bert4rec"):  # its input: the window slid by one, then [mask]
            mask_col = torch.full_like(seqs[:, :1], model.mask_id)
            seqs = torch.cat([seqs[:, 1:], mask_col], dim=1)
        full = model(seqs).hidden[:, -1]
    assert h.shape == full.shape
    torch.testing.assert_close(h, full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("key", ["sasrec_pathway", "retr"])
def test_last_only_pathway_block_reads_every_token(key: str) -> None:
    """A routed block asked for the last position alone answers [B, 1, d], equal to the full
    block's last row, and its router still reads the earlier tokens."""
    block = tiny(key).blocks[-1].eval()
    x = torch.randn(2, 5, D)
    real = torch.ones(2, 5, dtype=torch.bool)
    route = torch.ones(2, 5)
    with torch.no_grad():
        full = block(x, real, route).x
        last = block(x, real, route, last_only=True)
        moved = block(torch.cat([x[:, :1] + 1.0, x[:, 1:]], dim=1), real, route,
                      last_only=True).x
    assert last.x.shape == (2, 1, D) and last.route is not None and last.route.shape == (2, 1)
    torch.testing.assert_close(last.x, full[:, -1:], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(moved, last.x)


@pytest.mark.parametrize("causal", [True, False])
def test_dropout_attention_is_softmax_attention_with_the_drawn_mask(causal: bool) -> None:
    """The CPU training path: its output and gradients are those of the textbook formula with
    the keep mask it draws (one uniform per weight, kept iff >= p), padding rows included."""
    b, h, n, dh, p = 3, 2, 7, 4, 0.3
    real = torch.ones(b, n, dtype=torch.bool)
    real[0, :3] = False
    real[2, :] = False
    allowed = attention_mask(real, causal)  # [B, 1, N, N]
    q, k, v = (torch.randn(b, h, n, dh, dtype=torch.float64, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(b, h, n, dh, dtype=torch.float64)

    torch.manual_seed(7)
    y = dropout_attention(q, k, v, allowed, p)
    grads = torch.autograd.grad(y, (q, k, v), grad_out)

    torch.manual_seed(7)
    keep = torch.rand(b, h, n, n, dtype=torch.float64) >= p
    scores = (q @ k.transpose(-2, -1)) / dh ** 0.5
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    ref = (probs * keep / (1 - p)) @ v
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    torch.testing.assert_close(y, ref)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want)
    assert 0.5 < keep.double().mean().item() < 0.9  # a real draw, about 1 - p kept


def test_dropout_attention_without_dropout_is_sdpa() -> None:
    real = torch.tensor([[False, True, True, True], [True, True, True, True]])
    allowed = attention_mask(real, causal=True)
    q, k, v = (torch.randn(2, 2, 4, 3) for _ in range(3))
    torch.testing.assert_close(dropout_attention(q, k, v, allowed, 0.0),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=allowed))


def test_dropout_keeps_each_value_with_probability_one_minus_p_and_rescales() -> None:
    x = torch.randn(400, 500, requires_grad=True)
    drop = Dropout(0.3)
    torch.manual_seed(3)
    y = drop(x)
    kept = y != 0
    assert abs(kept.double().mean().item() - 0.7) < 0.005  # 200,000 draws: 0.7 ± 0.001
    torch.testing.assert_close(y[kept], x[kept] / 0.7)
    y.sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(x.grad, kept / 0.7)  # the gradient passes the kept values only
    torch.manual_seed(3)
    assert torch.equal(drop(x), y)  # seeded: the same mask again
    assert drop.eval()(x) is x  # identity at inference
    with pytest.raises(ValueError, match="dropout must be in"):
        Dropout(1.0)


@pytest.mark.parametrize("causal", [True, False])
def test_chunked_attention_equals_the_masked_softmax(causal: bool) -> None:
    """Chunks of queries, log-sum-exp kept, probabilities recomputed in the backward: the same
    outputs and gradients as the [N, N] path, with left padding and fewer queries than keys."""
    from retr.models.kernels import chunked_attention

    torch.manual_seed(0)
    b, h, n, dh, nq = 3, 2, 11, 4, 7
    real = torch.ones(b, n, dtype=torch.bool)
    real[0, :4] = False  # left padding, some of it among the queries
    real[2, :9] = False
    qkv = [torch.randn(b, h, size, dh, requires_grad=True) for size in (nq, n, n)]
    y = chunked_attention(*qkv, real, causal, chunk=3)
    allowed = attention_mask(real, causal)[:, :, n - nq:]
    ref = dropout_attention(*qkv, allowed, 0.0)
    torch.testing.assert_close(y, ref)
    grads = torch.autograd.grad((y * torch.arange(dh)).sum(), qkv)
    ref_grads = torch.autograd.grad((ref * torch.arange(dh)).sum(), qkv)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r)


def test_chunked_attention_gradient_with_dropout() -> None:
    """With dropout the backward regenerates each chunk's mask from the seed (gradcheck)."""
    from retr.models.kernels import chunked_attention

    torch.manual_seed(1)
    real = torch.tensor([[False, True, True, True, True, True], [True] * 6])
    qkv = [torch.randn(2, 2, 6, 3, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    assert torch.autograd.gradcheck(
        lambda q, k, v: chunked_attention(q, k, v, real, True, 0.3, seed=7, chunk=4), qkv)
    a = chunked_attention(*qkv, real, True, 0.3, seed=7, chunk=4)
    b = chunked_attention(*qkv, real, True, 0.3, seed=7, chunk=4)
    c = chunked_attention(*qkv, real, True, 0.3, seed=8, chunk=4)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_long_windows_attend_in_chunks_with_the_same_result(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A window over ATTENTION_CHUNK takes the chunked path: same states as the [N, N] path,
    and still causal."""
    import retr.models.layers as layers

    torch.manual_seed(0)
    model = build_model("sasrec", N_ITEMS, {"hidden_size": 16, "num_heads": 2, "max_len": 40,
                                            "attention": "pathway"}).eval()
    seqs = torch.randint(1, N_ITEMS + 1, (3, 40))
    seqs[0, :25] = 0
    monkeypatch.setattr(layers, "ATTENTION_CHUNK", 16)
    chunked = model(seqs).hidden
    later = seqs.clone()
    later[:, 30:] = (later[:, 30:] % N_ITEMS) + 1
    torch.testing.assert_close(model(later).hidden[:, :30], chunked[:, :30])
    monkeypatch.setattr(layers, "ATTENTION_CHUNK", 10_000)
    torch.testing.assert_close(model(seqs).hidden, chunked)


MODERN = [{"layout": "prenorm"}, {"norm_type": "rmsnorm"}, {"ffn_type": "swiglu"},
          {"layout": "prenorm", "norm_type": "rmsnorm", "ffn_type": "swiglu",
           "residual": "gated"}]


@pytest.mark.parametrize("options", MODERN)
@pytest.mark.parametrize("name", ["retr", "sasrec", "sasrec-pathway"])
def test_modern_blocks_stay_causal_and_consistent(name: str, options: dict[str, str]) -> None:
    """Pre-norm, RMSNorm, SwiGLU and gated residuals: every combination trains (gradients reach
    every parameter), stays causal, and the last-position shortcut gives the same state."""
    model_name, extra = ("sasrec", {"attention": "pathway"}) if name == "sasrec-pathway" \
        else (name, {})
    torch.manual_seed(0)
    model = build_model(model_name, N_ITEMS, {"hidden_size": D, "num_heads": 2, "max_len": N,
                                              **extra, **options}).eval()
    seqs = torch.randint(1, N_ITEMS + 1, (3, N))
    seqs[0, :5] = 0
    hidden = model(seqs).hidden
    later = seqs.clone()
    later[:, 8:] = (later[:, 8:] % N_ITEMS) + 1
    torch.testing.assert_close(model(later).hidden[:, :8], hidden[:, :8])
    torch.testing.assert_close(model.user_representation(seqs), hidden[:, -1])
    if options.get("norm_type") == "rmsnorm":
        assert any(isinstance(m, torch.nn.RMSNorm) for m in model.modules())
    model.train()
    model(seqs).hidden.sum().backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None and "router" not in n
              and "item_embedding" not in n]
    assert not unused, unused


def test_gated_residuals_need_a_pre_norm_layout() -> None:
    with pytest.raises(ConfigError, match="model.layout = 'prenorm'"):
        build_model("retr", N_ITEMS, {"residual": "gated"})
    with pytest.raises(ConfigError, match="model.ffn_type"):
        build_model("sasrec", N_ITEMS, {"ffn_type": "gelu"})
    sasrec = build_model("sasrec", N_ITEMS, {"residual": "gated"})  # its own layout is pre-norm
    assert sasrec.blocks[0].gates is not None


@pytest.mark.parametrize("ffn_type", ["paper", "swiglu"])
def test_sasrec_ffn_width_defaults_to_d_and_can_widen(ffn_type: str) -> None:
    """SASRec's FFN is d wide (the paper) unless model.ffn_size widens it (eSASRec's 4d)."""
    paper = build_model("sasrec", N_ITEMS, {"hidden_size": D, "ffn_type": ffn_type})
    wide = build_model("sasrec", N_ITEMS, {"hidden_size": D, "ffn_type": ffn_type,
                                           "ffn_size": 4 * D})
    assert paper.blocks[0].ffn.fc1.out_features == D
    assert all(b.ffn.fc1.out_features == 4 * D and b.ffn.fc2.in_features == 4 * D
               for b in wide.blocks)
    seqs = torch.randint(1, N_ITEMS + 1, (2, N))
    assert wide(seqs).hidden.shape == (2, N, D)
    with pytest.raises(ConfigError, match="model.ffn_size"):
        build_model("sasrec", N_ITEMS, {"ffn_size": -1})


def test_sasrec_output_projection_and_normal_init_are_switches() -> None:
    """The paper's SASRec has no output projection and Glorot-uniform weights; model.out_proj
    adds a d x d projection with bias per block, model.init = "normal" draws N(0, 0.02)."""
    torch.manual_seed(0)
    paper = build_model("sasrec", N_ITEMS, {"hidden_size": 64})
    torch.manual_seed(0)
    other = build_model("sasrec", N_ITEMS, {"hidden_size": 64, "out_proj": True,
                                            "init": "normal"})
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(other) - count(paper) == 2 * (64 * 64 + 64)
    assert isinstance(paper.blocks[0].attn.out, torch.nn.Identity)
    ffn_paper, ffn_other = paper.blocks[0].ffn.fc1.weight, other.blocks[0].ffn.fc1.weight
    assert ffn_paper.std() > 0.1 and abs(ffn_other.std().item() - 0.0176) < 0.002
    assert other.item_embedding.table.weight[1:].abs().max() <= 0.04 + 1e-6  # truncated at 2σ
    seqs = torch.randint(1, N_ITEMS + 1, (2, N))
    assert other(seqs).hidden.shape == (2, N, 64)
    with pytest.raises(ConfigError, match="model.init"):
        build_model("sasrec", N_ITEMS, {"init": "kaiming"})


def test_swiglu_is_the_gated_linear_unit() -> None:
    from retr.models.layers import SwiGLU

    torch.manual_seed(0)
    ffn = SwiGLU(4, 6, dropout=0.0)
    x = torch.randn(2, 3, 4)
    expected = ffn.fc2(F.silu(ffn.fc1(x)) * ffn.gate(x))
    torch.testing.assert_close(ffn(x), expected)


@pytest.mark.parametrize("budget", [None, 1])
@pytest.mark.parametrize("chunk", [256, 2])
@pytest.mark.parametrize("causal", [True, False])
def test_skipping_off_route_queries_gives_the_dense_outputs_and_gradients(
        causal: bool, chunk: int, budget: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sparse path (zero queries as prefix means, active queries gathered, in chunks when
    there are many) equals the dense pathway attention for the same straight-through route:
    outputs, and gradients to inputs, weights and the route itself. A byte budget of 1 makes
    every chunk one query and the off-route slope one user at a time."""
    import retr.models.kernels as kernels
    import retr.models.layers as layers
    from retr.models.layers import MultiHeadAttention

    monkeypatch.setattr(layers, "ATTENTION_CHUNK", chunk)
    if budget is not None:
        monkeypatch.setattr(kernels, "CHUNK_BYTES", budget)
        monkeypatch.setattr(layers, "CHUNK_BYTES", budget)
    torch.manual_seed(0)
    b, n, d = 3, 9, 8
    mha = MultiHeadAttention(d, 2, 0.0, causal, out_proj=True)
    z = torch.randn(b, n, d, requires_grad=True)
    real = torch.ones(b, n, dtype=torch.bool)
    real[0, :3] = False
    real[2, :] = False  # an empty history
    real[2, -1] = True
    hard = ((torch.rand(b, n) < 0.4) & real).float()
    hard[1] = 0.0  # a row with nothing on the route
    soft = torch.rand(b, n, requires_grad=True)
    route = hard + (soft - soft.detach())  # forward: hard; backward: into ``soft``
    sparse = mha.forward_active(z, z, real, route)
    dense, _ = mha(route.unsqueeze(-1) * z, z, real, query_gate=route)
    torch.testing.assert_close(sparse, dense)
    params = [z, soft, *mha.parameters()]
    g_sparse = torch.autograd.grad(sparse.pow(2).sum(), params)
    g_dense = torch.autograd.grad(dense.pow(2).sum(), params)
    for gs, gd in zip(g_sparse, g_dense, strict=True):
        torch.testing.assert_close(gs, gd)
    assert g_sparse[1].abs().sum() > 0  # the route does get a gradient


def test_chunk_rows_keep_one_chunk_of_scores_under_the_byte_budget() -> None:
    from retr.models.kernels import ATTENTION_CHUNK, CHUNK_BYTES, chunk_rows

    assert chunk_rows(2, 200) == ATTENTION_CHUNK  # small windows: the row cap
    rows = chunk_rows(128 * 2, 2048)  # B = 128, two heads, N = 2,048
    assert 1 <= rows < ATTENTION_CHUNK and rows * 128 * 2 * 2048 * 4 <= CHUNK_BYTES
    assert chunk_rows(10**6, 10**6) == 1  # never zero rows


def test_causal_linear_attention_equals_the_masked_products() -> None:
    from retr.models.kernels import causal_linear_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 11, 4) for _ in range(3))
    expected = ((q @ k.transpose(-2, -1)).tril() @ v)  # [B, h, N, d]
    for chunk in (1, 4, 11, 64):
        torch.testing.assert_close(causal_linear_attention(q, k, v, chunk), expected)


def test_learned_router_trains_on_the_sparse_path_with_the_dense_gradients() -> None:
    """A budgeted RETR in training (straight-through routes, keep 0.25): the step through the
    sparse path gives the same loss and gradients as the dense path (no dropout: the sparse
    path gives the off-route queries' uniform weights none)."""
    cfg = {"hidden_size": D, "num_heads": 2, "max_len": N, "dropout": 0.0,
           "keep_target": 0.25, "keep_weight": 1.0, "omega_floor": 0.1}
    torch.manual_seed(0)
    sparse_model = build_model("retr", N_ITEMS, cfg).train()
    dense_model = build_model("retr", N_ITEMS, {**cfg, "sparse_below": 0.0}).train()
    dense_model.load_state_dict(sparse_model.state_dict())
    with torch.no_grad():  # push the routers to drop most tokens
        for m in (sparse_model, dense_model):
            for block in m.blocks:
                block.attn.router.keep_mlp[-1].bias.copy_(torch.tensor([0.8, -0.8]))
    seqs = torch.randint(1, N_ITEMS + 1, (6, N))
    seqs[0, :4] = 0
    grads = []
    for model in (sparse_model, dense_model):
        torch.manual_seed(3)
        out = model(seqs)
        loss = out.hidden.pow(2).mean() + out.extras["aux_loss"].mean()
        grads.append((loss.detach(), torch.autograd.grad(loss, list(model.parameters()),
                                                         allow_unused=True)))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    params = list(dense_model.parameters())
    for gs, gd, w in zip(grads[0][1], grads[1][1], params, strict=True):
        # a block with no query on the route leaves W_Q, W_K unused on the sparse path
        zero = torch.zeros_like(w)
        torch.testing.assert_close(zero if gs is None else gs, zero if gd is None else gd,
                                   atol=1e-7, rtol=1e-4)
    torch.manual_seed(3)
    attn = sparse_model.blocks[0].attn
    route, _, _ = attn.router(torch.randn(6, N, D), torch.ones(6, N), seqs != 0)
    assert route.requires_grad and float(route.detach().mean()) < 0.75
    assert attn._sparse(route, seqs != 0, False)


def test_distillation_from_the_last_query_reads_its_row_alone() -> None:
    from retr.models.pathway import received_attention_loss

    torch.manual_seed(0)
    real = torch.ones(2, 5, dtype=torch.bool)
    real[0, :2] = False
    weights = torch.rand(2, 3, 5, 5).tril().softmax(-1)
    logit = torch.randn(2, 5)
    full = received_attention_loss(logit, weights, real.float(), real, "last")
    row = received_attention_loss(logit, weights[:, :, -1:], real.float(), real, "last")
    torch.testing.assert_close(full, row)


def test_pathway_attention_takes_the_sparse_path_only_when_it_is_exact() -> None:
    """Random router at 0.25 in evaluation: sparse, same states as the forced dense path; a
    binary straight-through route: sparse too; a soft route or the old query bias: dense."""
    torch.manual_seed(0)
    model = build_model("retr", N_ITEMS, {"hidden_size": D, "num_heads": 2, "max_len": N,
                                          "router": "random", "random_keep_prob": 0.25}).eval()
    seqs = torch.randint(1, N_ITEMS + 1, (4, N))
    attn = model.blocks[0].attn
    route = (torch.rand(4, N) < 0.25).float()
    real = seqs != 0
    assert attn._sparse(route, real, False) and not attn._sparse(route, real, True)
    torch.manual_seed(5)
    sparse = model(seqs).hidden
    dense_model = build_model("retr", N_ITEMS, {"hidden_size": D, "num_heads": 2, "max_len": N,
                                                "router": "random", "random_keep_prob": 0.25,
                                                "sparse_below": 0.0}).eval()
    dense_model.load_state_dict(model.state_dict())
    torch.manual_seed(5)
    dense = dense_model(seqs).hidden
    torch.testing.assert_close(sparse, dense)
    learned = build_model("retr", N_ITEMS, {"hidden_size": D, "num_heads": 2, "max_len": N}).train()
    assert learned.blocks[0].attn._sparse(route.clone().requires_grad_(), real, False)
    assert not learned.blocks[0].attn._sparse(route * 0.5, real, False)  # not binary
    old = build_model("retr", N_ITEMS, {"hidden_size": D, "num_heads": 2, "max_len": N,
                                        "query_bias": "always"}).eval()
    assert not old.blocks[0].attn._sparse(route.detach(), real, False)
