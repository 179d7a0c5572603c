"""Explanations: JSON shape, routes equal to the model's own, PNG written, item titles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from retr.cli import main
from retr.config import resolve_config
from retr.data.dataset import Vocabulary
from retr.data.load import load_dataset
from retr.data.splits import leave_one_out
from retr.explain import draw_pathway, explain_history, item_titles
from retr.explain.deletion import delete_tokens, deletion_test
from retr.models import build_model
from retr.serving import Recommender

TINY = "synthetic:n_users=150,n_items=150,n_themes=10,min_len=10,max_len=16,seed=1"
PNG = b"\x89PNG\r\n\x1a\n"


def _model_or_skip(name: str, **config: object) -> Recommender:
    try:
        from retr.models import build_model

        model = build_model(name, 30, dict(config))
    except Exception as exc:  # the model may not exist yet in this checkout
        pytest.skip(f"model {name!r} unavailable: {exc}")
    torch.manual_seed(0)
    vocab = Vocabulary(users=[], items=[f"m{i}" for i in range(30)])
    return Recommender(model, vocab, name)


@pytest.fixture(scope="module")
def retr_rec() -> Recommender:
    return _model_or_skip("retr", hidden_size=16, num_heads=2, num_layers=3, max_len=8,
                          ffn_size=16, router_hidden=8)


def test_explain_shape_and_routes_match_model(retr_rec, tmp_path):
    history = [f"m{i}" for i in (3, 1, 4, 1, 5, 9, 2, 6, 5, 3)]
    out = explain_history(retr_rec, history, k=4)
    n = retr_rec.window
    assert out["items"] == history[-n:] and out["truncated"] and out["has_router"]
    assert len(out["layers"]) == 3 and len(out["recommendations"]) == 4
    enc = retr_rec.encode(history)
    with torch.no_grad():
        own = retr_rec.model(retr_rec.padded([enc]), output_attentions=True)
    for layer, route, keep in zip(out["layers"], own.routes, own.keep_probs, strict=True):
        assert layer["route"] == route[0, -n:].round().int().tolist()
        np.testing.assert_allclose(layer["keep_prob"], keep[0, -n:].numpy(), atol=1e-5)
        att = np.array(layer["attention"])
        assert att.shape == (n, n)
        np.testing.assert_allclose(att.sum(1), 1.0, atol=1e-4)  # every real query row
        assert np.allclose(np.triu(att, 1), 0.0)  # causal
        assert layer["pathway"] == [t for t, r in zip(out["tokens"], layer["route"], strict=True) if r]
    # hierarchical routes: a token dropped once stays dropped
    routes = np.array([layer["route"] for layer in out["layers"]])
    assert (np.diff(routes, axis=0) <= 0).all()
    assert [r["item"] for r in out["recommendations"]] == retr_rec.recommend(history, k=4).items
    png = draw_pathway(out, tmp_path / "pathway.png")
    assert png.read_bytes()[:8] == PNG


def test_explain_attention_only_and_cloze(tmp_path):
    sasrec = _model_or_skip("sasrec", hidden_size=16, num_heads=2, max_len=6)
    out = explain_history(sasrec, ["m1", "m2", "m3"], k=2)
    assert not out["has_router"] and all(layer["route"] is None for layer in out["layers"])
    assert np.array(out["layers"][0]["attention"]).shape == (3, 3)
    assert draw_pathway(out, tmp_path / "s.png").read_bytes()[:8] == PNG
    bert = _model_or_skip("bert4rec", hidden_size=16, num_heads=2, max_len=6)
    out = explain_history(bert, [f"m{i}" for i in range(8)], k=2)
    assert out["tokens"][-1] == "[mask]" and len(out["items"]) == bert.window == 5
    assert np.array(out["layers"][0]["attention"]).shape == (6, 6)


def test_explain_pop_has_no_layers(tmp_path):
    run = tmp_path / "pop"
    assert main(["train", "--data", TINY, "--model", "pop", "--out", str(run),
                 "--set", "train.progress=false"]) == 0
    rec = Recommender.load(run)
    out = explain_history(rec, rec.vocab.items[:3], k=3)
    assert out["layers"] == [] and len(out["recommendations"]) == 3
    assert draw_pathway(out, tmp_path / "pop.png").read_bytes()[:8] == PNG


def test_item_titles(tmp_path: Path):
    (tmp_path / "ml-100k").mkdir()
    (tmp_path / "ml-100k" / "u.item").write_bytes(
        "1|Toy Story (1995)|01-Jan-1995||url|0\n2|Café (1995)|x\n".encode("latin-1"))
    assert item_titles("ml-100k", tmp_path) == {"1": "Toy Story (1995)", "2": "Café (1995)"}
    (tmp_path / "ml-1m").mkdir()
    (tmp_path / "ml-1m" / "movies.dat").write_text("3186::Girl, Interrupted (1999)::Drama\n")
    assert item_titles("ml-1m", tmp_path) == {"3186": "Girl, Interrupted (1999)"}
    (tmp_path / "Office").mkdir()
    (tmp_path / "Office" / "Office.item2index").write_text("B001\t1\nB002\t2\n")
    (tmp_path / "Office" / "Office.text").write_text("id\ttext\nB001\tStapler Red\n")
    assert item_titles("office", tmp_path) == {"1": "Stapler Red"}
    assert item_titles("synthetic:n_users=5", tmp_path) == {}
    assert item_titles("beauty", tmp_path) == {}
    assert item_titles("ml-100k", tmp_path / "empty") == {}
    rec = _model_or_skip("sasrec", hidden_size=16, num_heads=2, max_len=6)
    out = explain_history(rec, ["m1", "m2"], k=1, titles={"m1": "First movie"})
    assert out["labels"] == ["First movie", "m2"]


@pytest.mark.parametrize("route_sample", ["paper", "weighted"])
def test_explain_shows_the_drawn_probability_and_a_route_that_follows_the_rule(route_sample,
                                                                               tmp_path):
    """The route is red exactly where the eval-mode rule keeps it: under the weighted sampling
    with ω = 0 a token is kept although α < 1/2, and the drawn-with probability (1/2) says so."""
    rec = _model_or_skip("retr", hidden_size=16, num_heads=2, num_layers=2, max_len=8,
                         ffn_size=16, router_hidden=8, route_sample=route_sample)
    with torch.no_grad():  # ω = 0 everywhere: the dead zone
        for block in rec.model.blocks:
            block.attn.router.omega_mlp[-1].weight.zero_()
            block.attn.router.omega_mlp[-1].bias.fill_(-1.0)
    out = explain_history(rec, [f"m{i}" for i in (3, 1, 4, 1, 5, 9, 2)], k=3)
    prev = [1] * len(out["tokens"])
    for layer in out["layers"]:
        drawn, alpha = np.array(layer["sample_prob"]), np.array(layer["keep_prob"])
        assert layer["omega"] == [0.0] * len(drawn)
        if route_sample == "paper":
            np.testing.assert_allclose(drawn, alpha)
            assert "alpha >= 1/2" in layer["rule"]
        else:
            np.testing.assert_allclose(drawn, 0.5)
            assert "omega = 0 keeps" in layer["rule"]
        expect = [int(p and d >= 0.5) for p, d in zip(prev, drawn, strict=True)]
        assert layer["route"] == expect
        prev = layer["route"]
    assert draw_pathway(out, tmp_path / "p.png").read_bytes()[:8] == PNG


def test_delete_tokens_removes_and_repads_in_order():
    seqs = torch.tensor([[0, 0, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6]])
    drop = torch.tensor([[False, False, False, True, False, False],
                         [True, False, False, False, False, True]])
    assert delete_tokens(seqs, drop).tolist() == [[0, 0, 0, 5, 7, 8], [0, 0, 2, 3, 4, 5]]


def test_deletion_test_reports_every_method(tmp_path):
    cfg = resolve_config(None, [f'data.source="{TINY}"'], base={"model": {"name": "retr"}})
    dataset = load_dataset(cfg.data)
    torch.manual_seed(0)
    model = build_model("retr", dataset.n_items, dict(hidden_size=16, num_heads=2, max_len=16,
                                                      ffn_size=16, router_hidden=8))
    test = leave_one_out(dataset).test
    out = deletion_test(model, dataset, test, k=2, batch_size=64)
    assert out["examples"] == int((np.minimum(test.lengths, 16) > 4).sum()) > 0
    assert set(out["methods"]) == {"route", "attention", "gradient", "gradient_abs", "recency",
                                   "random"}
    for method in out["methods"].values():
        for part in ("top", "bottom"):
            assert 0.0 <= method[part]["HR@10"] <= 1.0
            assert 0.0 <= method[part]["mean_log2_rank"] <= np.log2(dataset.n_items)


def test_deletion_controls_rank_by_magnitude_and_by_recency(retr_rec):
    """gradient_abs is |gradient x input|; recency ranks the newest behavior first, so its
    top-k deletion removes exactly the last k behaviors of a left-padded window."""
    from retr.explain.deletion import explanation_scores, gradient_x_input

    model = retr_rec.model.eval()
    seqs = torch.tensor([[0, 0, 3, 1, 4, 7, 5, 9], [2, 6, 8, 1, 3, 5, 7, 4]])
    targets = torch.tensor([11, 12])
    scores = explanation_scores(model, seqs, targets, torch.Generator().manual_seed(0))
    torch.testing.assert_close(scores["gradient_abs"],
                               gradient_x_input(model, seqs, targets).abs())
    real = seqs != 0
    newest = torch.topk(scores["recency"].masked_fill(~real, float("-inf")), 2, dim=1).indices
    oldest = torch.topk((-scores["recency"]).masked_fill(~real, float("-inf")), 2, dim=1).indices
    assert newest.sort(dim=1).values.tolist() == [[6, 7], [6, 7]]
    assert oldest.sort(dim=1).values.tolist() == [[2, 3], [0, 1]]  # padding is never picked
    drop = torch.zeros_like(real).scatter_(1, newest, True)
    assert delete_tokens(seqs, drop).tolist() == [[0, 0, 0, 0, 3, 1, 4, 7],
                                                  [0, 0, 2, 6, 8, 1, 3, 5]]


def test_relied_on_names_its_method_and_ranks_the_history(retr_rec):
    """By default the magnitude of the top recommendation's gradient x input (the method that
    measured best for the paper's router), the same numbers as the deletion test's; the other
    methods on request, each ranking exactly the window's behaviors."""
    from retr.explain.deletion import gradient_x_input

    history = [f"m{i}" for i in (3, 1, 4, 7, 5, 9)]
    out = explain_history(retr_rec, history, k=3)
    relied = out["relied_on"]
    assert relied["method"] == "gradient_abs" and "deletion" in relied["why"]
    assert relied["target"] == out["recommendations"][0]["item"]
    assert sorted(relied["items"]) == sorted(history)
    assert relied["scores"] == sorted(relied["scores"], reverse=True)
    enc = retr_rec.encode(history)
    seqs = retr_rec.padded([enc])
    target = torch.as_tensor(retr_rec.encode([relied["target"]]).ids)
    expected = gradient_x_input(retr_rec.model, seqs, target)[0, -len(history):]
    by_item = dict(zip(relied["items"], relied["scores"], strict=True))
    np.testing.assert_allclose([by_item[h] for h in history], expected.abs().numpy(), atol=1e-5)
    assert all(p.grad is None for p in retr_rec.model.parameters())  # nothing left behind
    signed = explain_history(retr_rec, history, k=3, by="gradient")["relied_on"]
    by_item = dict(zip(signed["items"], signed["scores"], strict=True))
    np.testing.assert_allclose([by_item[h] for h in history], expected.numpy(), atol=1e-5)
    for method in ("attention", "route"):
        other = explain_history(retr_rec, history, k=3, by=method)["relied_on"]
        assert other["method"] == method and sorted(other["items"]) == sorted(history)
    with pytest.raises(Exception, match="explanation method must be one of"):
        explain_history(retr_rec, history, by="saliency")


def test_relied_on_follows_the_model():
    """A router distilled from attention explains by the last query's attention; a model
    without a router has no route to rank by; BERT4Rec ranks its history, not [mask]."""
    distilled = _model_or_skip("retr", hidden_size=16, num_heads=2, num_layers=2, max_len=8,
                               ffn_size=16, keep_target=0.25, inference_rule="threshold",
                               router_target="attention")
    history = ["m1", "m2", "m3", "m4"]
    assert explain_history(distilled, history)["relied_on"]["method"] == "attention"
    sasrec = _model_or_skip("sasrec", hidden_size=16, num_heads=2, max_len=6)
    assert explain_history(sasrec, history, by="route")["relied_on"] is None
    bert = _model_or_skip("bert4rec", hidden_size=16, num_heads=2, max_len=6)
    relied = explain_history(bert, history)["relied_on"]
    assert relied["method"] == "gradient_abs" and sorted(relied["items"]) == sorted(history)
