"""The pathway router against the paper's equations, and the budget options beyond it (ours)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from retr.config import RunConfig
from retr.errors import ConfigError
from retr.models import build_model
from retr.models.pathway import (
    PathwayRouter,
    RouterOptions,
    causal_topk,
    received_attention_loss,
    straight_through_gumbel,
    training_routes,
)
from retr.training.trainer import batch_loss

from .test_models import N_ITEMS, D, N, batch  # the same small model inputs

TINY = dict(hidden_size=D, num_heads=2, num_layers=2, max_len=16, ffn_size=D, router_hidden=8)
BUDGET = {"keep_target": 0.25, "keep_weight": 1.0, "omega_floor": 0.1, "inference_rule": "topk"}
DISTILLED = {"keep_target": 0.25, "inference_rule": "topk", "router_target": "attention"}
THRESHOLD = {"keep_target": 0.25, "inference_rule": "threshold", "router_target": "attention",
             "hierarchical": False}


def tiny(seed: int = 0, **overrides: Any) -> Any:
    torch.manual_seed(seed)
    return build_model("retr", N_ITEMS, {**TINY, **overrides})


def gumbel_of(shape: torch.Size, seed: int) -> torch.Tensor:
    """The noise ``straight_through_gumbel`` draws after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    u = torch.rand(shape).clamp_min(torch.finfo(torch.float32).tiny)
    return -torch.log(-torch.log(u))


# ---------------------------------------------------------------- equation 3


def test_paper_sample_is_argmax_of_unweighted_log_pi_plus_noise() -> None:
    alpha = torch.rand(64, 5)
    log_pi = torch.stack([torch.log1p(-alpha), torch.log(alpha)], dim=-1)  # [64, 5, 2]
    omega = 4.0 * torch.rand(64, 5, 1)
    torch.manual_seed(11)
    paper = straight_through_gumbel(omega * log_pi, 1.0, log_pi)
    torch.manual_seed(11)
    weighted = straight_through_gumbel(omega * log_pi)
    g = gumbel_of(log_pi.shape, 11)
    expect_paper = ((log_pi + g).argmax(-1) == 1).float()
    expect_weighted = ((omega * log_pi + g).argmax(-1) == 1).float()
    assert torch.equal(paper, expect_paper) and torch.equal(weighted, expect_weighted)
    assert not torch.equal(paper, weighted)  # ω matters for the weighted draw only


def test_paper_sample_keeps_with_probability_alpha_whatever_omega() -> None:
    log_pi = torch.log(torch.tensor([0.3, 0.7])).expand(40000, 1, 2)  # α = 0.7
    for omega in (0.0, 1.0, 50.0):
        torch.manual_seed(0)
        kept = straight_through_gumbel(omega * log_pi, 1.0, log_pi).mean().item()
        assert abs(kept - 0.7) < 0.01, omega
    torch.manual_seed(0)
    assert straight_through_gumbel(50.0 * log_pi).mean().item() > 0.999  # weighted: sharpened


def test_paper_sample_gradient_is_that_of_the_relaxed_v_keep() -> None:
    alpha = torch.rand(8, 5)
    log_pi = torch.stack([torch.log1p(-alpha), torch.log(alpha)], dim=-1)
    omega = torch.rand(8, 5, 1) * 3
    w = torch.randn(8, 5)
    scaled = (omega * log_pi).requires_grad_(True)
    torch.manual_seed(5)
    (straight_through_gumbel(scaled, 1.0, log_pi) * w).sum().backward()
    relaxed = (omega * log_pi).requires_grad_(True)
    v_keep = (relaxed + gumbel_of(log_pi.shape, 5)).softmax(-1)[..., 1]
    (v_keep * w).sum().backward()
    assert scaled.grad is not None and relaxed.grad is not None
    torch.testing.assert_close(scaled.grad, relaxed.grad)


def set_omega(model: Any, bias: float) -> None:
    """Make every router's ω the constant ReLU(bias) (weights of its last layer zeroed)."""
    with torch.no_grad():
        for block in model.blocks:
            last = block.attn.router.omega_mlp[-1]
            last.weight.zero_()
            last.bias.fill_(bias)


def test_router_samples_with_alpha_in_training_and_uses_its_mode_at_inference() -> None:
    seqs = batch().repeat(500, 1)  # the same 4 histories, many draws
    real = seqs != 0
    for sample, omega in (("paper", -1.0), ("paper", 40.0), ("weighted", 40.0)):
        model = tiny(route_sample=sample, hierarchical=False, dropout=0.0)
        set_omega(model, omega)
        with torch.no_grad():
            model.train()
            torch.manual_seed(0)
            out = model(seqs, output_attentions=True)
            model.eval()
            det = model(seqs, output_attentions=True)
        alpha = out.keep_probs[0][:4]  # layer 1 sees the same input in both modes
        kept = out.routes[0].view(500, 4, N).mean(0)  # [4, N] frequency of keep
        drawn = out.sample_probs[0][:4]
        if sample == "paper":
            torch.testing.assert_close(drawn, alpha)  # drawn with α, ω or not
            assert torch.equal(det.routes[0], ((det.keep_probs[0] >= 0.5) & real).float())
        else:  # σ(ω·logit), sharper than α
            logit = torch.log(alpha) - torch.log1p(-alpha)
            torch.testing.assert_close(drawn[real[:4]], torch.sigmoid(40 * logit)[real[:4]])
        assert (kept - drawn).abs()[real[:4]].max() < 0.1
        if omega < 0:
            assert (out.omegas[0] == 0).all()  # the dead zone: still drawn with α


def test_weighted_inference_keeps_every_token_at_omega_zero() -> None:
    model = tiny(route_sample="weighted").eval()
    set_omega(model, -1.0)
    seqs = batch()
    with torch.no_grad():
        out = model(seqs, output_attentions=True)
    assert torch.equal(out.routes[-1], (seqs != 0).float())  # 0 >= 0 keeps
    torch.testing.assert_close(out.sample_probs[0][seqs != 0],
                               torch.full((int((seqs != 0).sum()),), 0.5))


def test_omega_floor_closes_the_dead_zone() -> None:
    model = tiny(omega_floor=0.3).eval()
    set_omega(model, -1.0)
    with torch.no_grad():
        out = model(batch(), output_attentions=True)
    real = batch() != 0
    assert all(torch.allclose(o[real], torch.full_like(o[real], 0.3)) for o in out.omegas)


# ---------------------------------------------------------------- causality of every rule


def change_at(seqs: torch.Tensor, j: int) -> torch.Tensor:
    out = seqs.clone()
    out[:, j] = torch.where(seqs[:, j] > 0, seqs[:, j] % N_ITEMS + 1, seqs[:, j])
    return out


@pytest.mark.parametrize("options", [{}, {"route_sample": "weighted"}, BUDGET, DISTILLED,
                                     THRESHOLD, {**BUDGET, "inference_rule": "threshold"}],
                         ids=["paper", "weighted", "budget", "distilled", "threshold",
                              "budget-threshold"])
@pytest.mark.parametrize("training", [False, True])
def test_a_later_item_never_changes_an_earlier_output_or_route(options: dict[str, Any],
                                                               training: bool) -> None:
    model = tiny(dropout=0.3 if training else 0.2, **options).train(training)
    state = {k: v.clone() for k, v in model.state_dict().items()}  # θ moves in training
    seqs = batch()
    with torch.no_grad():
        torch.manual_seed(7)
        base = model(seqs, output_attentions=True)
        for j in range(1, N):
            model.load_state_dict(state)
            torch.manual_seed(7)
            other = model(change_at(seqs, j), output_attentions=True)
            torch.testing.assert_close(base.hidden[:, :j], other.hidden[:, :j], rtol=0, atol=1e-5)
            for a, b in zip(base.routes, other.routes, strict=True):
                assert torch.equal(a[:, :j], b[:, :j])


# ---------------------------------------------------------------- the budget (ours)


def test_causal_topk_keeps_the_quota_of_each_prefix() -> None:
    score = torch.randn(200, 40)
    real = torch.ones(200, 40, dtype=torch.bool)
    real[:, :10] = False  # left padding
    kept = causal_topk(score, real, real, 0.25)
    assert kept[~real].sum() == 0
    rate = kept[real].mean().item()
    assert abs(rate - 0.25) < 0.05
    row, t = 0, 25  # by the definition: rank in its own prefix below ⌈ρ n_t⌉
    prefix = score[row, 10: t + 1]
    rank = int((prefix > score[row, t]).sum())
    assert bool(kept[row, t]) == (rank < int(0.25 * (t - 9) + 0.5))
    # non-candidates are never kept and do not take a place in the quota
    cand = real & (torch.rand(200, 40) < 0.5)
    assert causal_topk(score, cand, real, 0.25)[~cand].sum() == 0


@pytest.mark.parametrize("options", [BUDGET, DISTILLED], ids=["budget", "distilled"])
def test_topk_inference_is_the_causal_topk_of_the_sampling_scores(options: dict[str, Any]) -> None:
    model = tiny(**options).eval()
    seqs = torch.randint(1, N_ITEMS + 1, (64, N), generator=torch.Generator().manual_seed(2))
    seqs[:8, :5] = 0  # some left padding
    real = seqs != 0
    with torch.no_grad():
        out = model(seqs, output_attentions=True)
    prev = real
    for route, score in zip(out.routes, out.sample_probs, strict=True):
        expect = causal_topk(score, prev, real, 0.25)  # σ is monotone: the same ranks
        assert torch.equal(route, expect)
        prev = route.bool()


def test_distilled_router_draws_the_same_route_in_training_and_inference() -> None:
    model = tiny(dropout=0.0, **DISTILLED)
    seqs = batch()
    with torch.no_grad():
        model.train()
        train = model(seqs, output_attentions=True)
        model.eval()
        test = model(seqs, output_attentions=True)
        with training_routes(model):
            sampled = model(seqs, output_attentions=True)
    for a, b, c in zip(train.routes, test.routes, sampled.routes, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert "aux_loss" in train.extras and "aux_loss" not in test.extras


def test_distilled_router_learns_from_received_attention_only() -> None:
    model = tiny(**DISTILLED).train()
    seqs = torch.randint(1, N_ITEMS + 1, (8, N), generator=torch.Generator().manual_seed(0))
    out = model(seqs)
    router = model.blocks[0].attn.router
    assert router.omega_mlp is None
    out.hidden.sum().backward(retain_graph=True)  # the task side: no gradient to the router
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in router.parameters())
    out.extras["aux_loss"].mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in router.keep_mlp.parameters())


def test_received_attention_loss_prefers_the_attended_token() -> None:
    n = 4
    weights = torch.zeros(1, 1, n, n)
    weights[0, 0, :, 0] = 1.0  # every query reads token 0 only
    real = torch.ones(1, n, dtype=torch.bool)
    route = torch.ones(1, n)
    right = torch.tensor([[5.0, 0.0, 0.0, 0.0]])
    wrong = torch.tensor([[0.0, 5.0, 0.0, 0.0]])
    assert received_attention_loss(right, weights, route, real) < \
        received_attention_loss(wrong, weights, route, real)
    none = received_attention_loss(right, weights, torch.zeros(1, n), real)
    assert none.item() == 0.0  # no later on-route query: no target


def test_budget_penalty_pulls_the_sampled_keep_rate_to_rho() -> None:
    model = tiny(**BUDGET).train()
    routers = [b.attn.router for b in model.blocks]
    opt = torch.optim.Adam([p for r in routers for p in r.parameters()], lr=0.05)
    seqs = torch.randint(1, N_ITEMS + 1, (32, N), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    for _ in range(60):
        opt.zero_grad()
        model(seqs).extras["aux_loss"].mean().backward()
        opt.step()
    model.eval()
    with torch.no_grad(), training_routes(model):
        rates = [sum(model(seqs, output_attentions=True).routes[-1].mean().item()
                     for _ in range(20)) / 20]
    assert abs(rates[0] - 0.25) < 0.05


def test_the_trainer_adds_the_mean_auxiliary_loss() -> None:
    seqs = torch.randint(1, N_ITEMS + 1, (8, N + 1), generator=torch.Generator().manual_seed(0))
    inputs, targets = seqs[:, :-1], seqs[:, 1:]
    tc = RunConfig().train
    tc.length_groups = 1  # one forward, so the routes drawn match the one below
    with_budget = tiny(**BUDGET).train()
    plain = tiny(**{**BUDGET, "keep_weight": 0.0}).train()
    plain.load_state_dict(with_budget.state_dict())
    losses = []
    for model in (with_budget, plain):
        torch.manual_seed(3)
        losses.append(batch_loss(tc, model, model, inputs, targets,
                                 torch.Generator().manual_seed(0))[0])
    torch.manual_seed(3)
    aux = with_budget(inputs).extras["aux_loss"]
    assert aux.shape == (8,) and (aux > 0).any()
    torch.testing.assert_close(losses[0] - losses[1], aux.mean(), rtol=1e-4, atol=1e-6)
    assert "aux_loss" not in tiny().train()(inputs).extras  # the paper's model: none


def test_router_options_refuse_incoherent_budgets() -> None:
    for bad in ({"keep_weight": 1.0}, {"inference_rule": "topk"},
                {"router_target": "attention", "keep_target": 0.25},
                {"router": "random", "keep_target": 0.25, "inference_rule": "topk"},
                {"omega_floor": -1.0}, {"route_sample": "sharp"}, {"query_bias": "never"}):
        with pytest.raises(ConfigError):
            RouterOptions(**bad)
    assert not RouterOptions().budget and RouterOptions(**BUDGET).budget
    assert PathwayRouter(D, RouterOptions(**DISTILLED)).omega_mlp is None


def test_threshold_rule_keeps_rho_of_a_batch_and_infers_with_the_same_theta() -> None:
    model = tiny(dropout=0.0, **THRESHOLD)
    seqs = torch.randint(1, N_ITEMS + 1, (64, N), generator=torch.Generator().manual_seed(4))
    routers = [b.attn.router for b in model.blocks]
    assert all(r.threshold is not None and float(r.threshold) == 0.0 for r in routers)
    model.train()
    with torch.no_grad():
        first = model(seqs, output_attentions=True)  # drawn with θ = 0, then θ calibrated
        model.eval()
        test = model(seqs, output_attentions=True)
        model.train()
        second = model(seqs, output_attentions=True)  # the same θ as the eval pass
    for layer, router in enumerate(routers):
        assert int(router.threshold_updates) == 2
        logit = torch.log(first.sample_probs[layer]) - torch.log1p(-first.sample_probs[layer])
        assert torch.equal(first.routes[layer], (logit >= 0).float())  # θ = 0 on the first batch
        assert torch.equal(second.routes[layer], test.routes[layer])  # training = inference
    # layer 1 sees the same input in every pass: θ is that batch's quantile, the rate is ρ
    assert abs(test.routes[0].mean().item() - 0.25) < 0.01
    state = model.state_dict()
    assert "blocks.0.attn.router.threshold" in state  # saved with the weights
    assert "blocks.0.attn.router.threshold" not in tiny().state_dict()


def test_last_query_distillation_target_is_the_last_querys_attention() -> None:
    n = 4
    weights = torch.zeros(1, 2, n, n)
    weights[0, :, :, 0] = 1.0  # every query but the last reads token 0
    weights[0, :, -1] = torch.tensor([0.0, 0.0, 0.25, 0.75])  # the last reads 2 and itself
    real = torch.ones(1, n, dtype=torch.bool)
    route = torch.ones(1, n)
    logit = torch.tensor([[0.0, 0.0, 1.0, 2.0]], requires_grad=True)
    loss = received_attention_loss(logit, weights, route, real, source="last")
    expect = -(0.25 * logit.log_softmax(1)[0, 2] + 0.75 * logit.log_softmax(1)[0, 3])
    torch.testing.assert_close(loss[0], expect)
    # later queries, each weight times the query's number of keys, averaged over the queries:
    # token 0 gets (1 + 1 + 0) / 3, token 2 gets 0.25 x 2 / 1; normalised: 4/7 and 3/7
    later = received_attention_loss(logit, weights, route, real)
    log_q = logit.log_softmax(1)[0]
    torch.testing.assert_close(later[0], -(4 / 7 * log_q[0] + 3 / 7 * log_q[2]))


# ---------------------------------------------------------------- the last position alone


@pytest.mark.parametrize(("name", "overrides"), [
    ("retr", {}),
    ("retr", {"route_sample": "weighted"}),
    ("retr", {"gumbel": "fixed", "tau": 0.5}),
    ("retr", {"pooling": "global", "hierarchical": False}),
    ("retr", {"query_bias": "always"}),
    ("retr", BUDGET),
    ("retr", {**BUDGET, "inference_rule": "threshold", "route_sample": "weighted"}),
    ("retr", THRESHOLD),
    ("retr", {"router": "random", "random_keep_prob": 0.4}),
    ("retr", {"gate": "keys"}),
    ("retr", {**BUDGET, "gate": "keys", "inference_rule": "threshold"}),
    ("retr", {"inference_route": "sample"}),
    ("retr", {"layout": "prenorm", "norm_type": "rmsnorm", "residual": "gated"}),
    ("sasrec", {"attention": "pathway"}),
    ("bert4rec", {"attention": "pathway"}),
])
def test_last_position_alone_equals_the_full_forward(name: str, overrides: dict[str, Any]) -> None:
    """Serving computes the last block for the last position only (its router still reads every
    token): the same user state as the full forward's last position, for every routing rule."""
    fields = {k: v for k, v in TINY.items() if name == "retr" or k != "ffn_size"}
    torch.manual_seed(0)
    model = build_model(name, N_ITEMS, {**fields, "max_len": N, **overrides}).eval()
    for m in model.modules():  # a calibrated threshold that keeps some tokens and drops others
        if isinstance(m, PathwayRouter) and m.threshold is not None:
            m.threshold.fill_(0.0)
    seqs = batch()
    with torch.no_grad():
        torch.manual_seed(4)
        state = model.user_representation(seqs)  # [B, d]
        torch.manual_seed(4)
        if name == "bert4rec":  # the same input: the window slid by one, [mask] appended
            mask_col = torch.full_like(seqs[:, :1], model.mask_id)
            full = model(torch.cat([seqs[:, 1:], mask_col], dim=1)).hidden[:, -1]
        else:
            full = model(seqs).hidden[:, -1]
    torch.testing.assert_close(state, full, rtol=1e-5, atol=1e-6)



# ---------------------------------------------------------------- key-gated pathways (ours)


@pytest.mark.parametrize("causal", [True, False])
def test_key_gates_all_on_are_self_attention_and_every_path_agrees(
        causal: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every key on: the host's attention. A binary gate: the explicit differentiable path, the
    masked fast path and the chunked path give the same outputs; each query reads only the
    gated-on keys and itself."""
    import retr.models.layers as layers
    from retr.models.layers import MultiHeadAttention

    torch.manual_seed(0)
    b, n, d = 3, 9, 8
    mha = MultiHeadAttention(d, 2, 0.0, causal, out_proj=True).eval()
    z = torch.randn(b, n, d)
    real = torch.ones(b, n, dtype=torch.bool)
    real[0, :3] = False
    plain, _ = mha(z, z, real)
    torch.testing.assert_close(mha(z, z, real, key_gate=torch.ones(b, n))[0], plain)
    gate = (torch.rand(b, n) < 0.4).float()
    soft = torch.zeros(b, n, requires_grad=True)
    explicit, weights = mha(z, z, real, True, key_gate=gate + (soft - soft.detach()))
    fast, _ = mha(z, z, real, key_gate=gate)
    monkeypatch.setattr(layers, "ATTENTION_CHUNK", 2)
    chunked, _ = mha(z, z, real, key_gate=gate)
    torch.testing.assert_close(fast, explicit)
    torch.testing.assert_close(chunked, explicit)
    assert weights is not None
    eye = torch.eye(n, dtype=torch.bool)
    readable = (gate > 0.5)[:, None, None, :] | eye  # [B, 1, N, N]
    assert float(weights.detach().masked_fill(readable, 0.0).abs().max()) == 0.0
    torch.testing.assert_close(weights[1].sum(-1), torch.ones(2, n))  # rows still sum to one


def test_key_gates_train_the_router_from_every_later_position() -> None:
    """Query gates: the last position's loss reaches only its own route value. Key gates: it
    reaches the route of every earlier token it could read (dropping a token changes the later
    predictions, so every position's loss trains the router)."""
    from retr.models.pathway import attention_module

    torch.manual_seed(0)
    z = torch.randn(2, 7, D)
    real = torch.ones(2, 7, dtype=torch.bool)
    grads = {}
    for gate in ("queries", "keys"):
        torch.manual_seed(1)
        attn = attention_module(D, 2, 0.0, True, False, RouterOptions(gate=gate)).train()
        torch.manual_seed(2)
        out, _, route, _ = attn(z, z, real, torch.ones(2, 7))
        (g,) = torch.autograd.grad(out[:, -1].pow(2).sum(), route)
        grads[gate] = g
    assert float(grads["queries"][:, :-1].abs().max()) == 0.0
    assert float(grads["keys"][:, :-1].abs().min()) > 0.0


def test_key_gates_reject_nothing_else() -> None:
    with pytest.raises(ConfigError, match="model.gate must be one of"):
        RouterOptions(gate="values")


@pytest.mark.parametrize("sliced", [False, True])
def test_router_recomputed_in_the_backward_pass_gives_the_same_gradients(
        sliced: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """``router_recompute`` recomputes the router's MLPs in the backward pass (memory): the loss
    and every gradient are those of keeping their activations (up to the order of float sums,
    which the backward pass's schedule may change), also a user at a time (a byte budget of
    1)."""
    import retr.models.pathway as pathway

    if sliced:
        monkeypatch.setattr(pathway, "CHUNK_BYTES", 1)
    grads = []
    calls = []
    real_checkpoint = pathway.checkpoint
    monkeypatch.setattr(pathway, "checkpoint",
                        lambda *a, **k: calls.append(1) or real_checkpoint(*a, **k))
    for recompute in (True, False):
        model = tiny(dropout=0.0, router_recompute=recompute, **BUDGET).train()
        torch.manual_seed(3)
        out = model(batch())
        loss = out.hidden.pow(2).mean() + out.extras["aux_loss"].mean()
        grads.append(torch.autograd.grad(loss, list(model.parameters()), allow_unused=True))
    # one per layer with the option only (one per user and layer when sliced)
    assert len(calls) == (2 * len(batch()) if sliced else 2)
    for a, b in zip(*grads, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
