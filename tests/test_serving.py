"""Serving: recommendations agree with evaluation; policies; batch; HTTP; CLI; ONNX export."""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from retr.cli import main
from retr.data.dataset import Vocabulary
from retr.data.histories import read_histories
from retr.errors import DataError, RetrError, RunDirError
from retr.evaluation.ranking import history_pairs, topk_items, user_states
from retr.models.base import ModelOutput, SequentialRecommender
from retr.runs import load_run, save_item_counts
from retr.serving import (
    EmptyHistoryError,
    Recommender,
    UnknownItemError,
)
from retr.serving.commands import register
from retr.serving.recommender import RequestError

TINY = "synthetic:n_users=150,n_items=150,n_themes=10,min_len=10,max_len=16,seed=1"
RETR_SETS = ["train.epochs=1", "model.hidden_size=16", "model.num_heads=2", "model.max_len=10",
             "model.ffn_size=16", "model.router_hidden=8", "train.progress=false"]


def _train(out: Path, model: str, sets: list[str]) -> Path:
    argv = ["train", "--data", TINY, "--model", model, "--out", str(out)]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def pop_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tmp_path_factory.mktemp("pop") / "run", "pop", ["train.progress=false"])


@pytest.fixture(scope="module")
def retr_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("retr.models.retr")
    return _train(tmp_path_factory.mktemp("retr") / "run", "retr", RETR_SETS)


def _evaluation_topk(run_dir: Path, k: int) -> tuple[list[list[str]], list[list[str]], np.ndarray,
                                                     np.ndarray]:
    """Histories of the test examples and the evaluation path's own top-k for them."""
    run = load_run(run_dir)
    data, model = run.data.dataset, run.model
    ex = run.data.split.examples("test")
    h = user_states(model, data, ex.users, ex.lengths)
    rows, items = history_pairs(data, ex.users, ex.lengths)
    ids, scores = topk_items(model, h, k, data.n_items, rows, items)
    vocab = data.vocab.items
    histories = [[vocab[i - 1] for i in data.sequence(u)[:n]] for u, n in zip(ex.users, ex.lengths, strict=True)]
    expected = [[vocab[i - 1] for i in row if i > 0] for row in ids.numpy()]
    return histories, expected, scores.numpy(), ex.targets


@pytest.mark.parametrize("which", ["pop", "retr"])
def test_recommend_agrees_with_evaluation(which, pop_run, retr_run):
    run_dir = pop_run if which == "pop" else retr_run
    histories, expected, exp_scores, _ = _evaluation_topk(run_dir, k=10)
    rec = Recommender.load(run_dir)
    got = rec.recommend_batch(histories, k=10)
    assert [g.items for g in got] == expected
    np.testing.assert_array_equal(np.array([g.scores for g in got], dtype=np.float32), exp_scores)
    for i in (0, 7, 42):  # one history at a time ranks the same items
        single = rec.recommend(histories[i], k=10)
        assert single.items == expected[i]
        np.testing.assert_allclose(single.scores, exp_scores[i], rtol=1e-5, atol=1e-6)


def test_hit_rate_from_recommendations_matches_results_json(retr_run):
    histories, _, _, targets = _evaluation_topk(retr_run, k=10)
    rec = Recommender.load(retr_run)
    vocab = rec.vocab.items
    hits = [vocab[t - 1] in r.items for t, r in zip(targets, rec.recommend_batch(histories, k=10), strict=True)]
    saved = json.loads((retr_run / "results.json").read_text())
    full = [r for r in saved["results"] if r["split"] == "test" and r["protocol"] == "full"][0]
    assert np.mean(hits) == pytest.approx(full["metrics"]["HR@10"])


def test_padding_equals_dataset_prefixes(retr_run):
    run = load_run(retr_run)
    data, ex = run.data.dataset, run.data.split.examples("test")
    rec = Recommender.load(retr_run)
    vocab = data.vocab.items
    encoded = [rec.encode([vocab[i - 1] for i in data.sequence(u)[:n]])
               for u, n in zip(ex.users[:20], ex.lengths[:20], strict=True)]
    expected = data.padded_prefixes(ex.users[:20], ex.lengths[:20], rec.max_len)
    np.testing.assert_array_equal(rec.padded(encoded).numpy(), expected)


def test_unknown_items_policy(pop_run):
    rec = Recommender.load(pop_run)
    known = rec.vocab.items[:3]
    out = rec.recommend([*known, "no-such-item", "other"], k=5)
    assert out.skipped == ["no-such-item", "other"]
    assert out.used_history == known
    assert out.items == rec.recommend(known, k=5).items
    with pytest.raises(UnknownItemError, match="no-such-item"):
        rec.recommend([*known, "no-such-item"], unknown="error")
    strict = Recommender.load(pop_run, unknown="error")
    with pytest.raises(UnknownItemError):
        strict.recommend(["no-such-item"])
    assert rec.recommend([int(known[0])], k=3).used_history == [known[0]]  # ints are accepted


def test_empty_history_policies(pop_run, retr_run, tmp_path):
    rec = Recommender.load(pop_run)
    with pytest.raises(EmptyHistoryError, match="no known item"):
        rec.recommend([])
    with pytest.raises(EmptyHistoryError):
        rec.recommend(["unknown-only"])
    fallback = rec.recommend(["unknown-only"], k=5, empty="popularity")
    assert fallback.fallback == "popularity" and fallback.skipped == ["unknown-only"]
    counts = torch.as_tensor(rec.model.counts).numpy()
    assert [float(s) for s in fallback.scores] == sorted(counts[1:], reverse=True)[:5]
    # a neural run needs stored item counts (the trainer writes them) for the fallback
    copy = tmp_path / "run"
    copy.mkdir()
    for f in ("config.json", "vocab.json", "model.safetensors"):
        (copy / f).write_bytes((retr_run / f).read_bytes())
    with pytest.raises(RunDirError, match="item_counts.npy"):
        Recommender.load(copy, empty="popularity")
    save_item_counts(copy, counts)
    neural = Recommender.load(copy, empty="popularity")
    mixed = neural.recommend_batch([["unknown-only"], rec.vocab.items[:4]], k=5)
    assert mixed[0].fallback == "popularity" and mixed[0].items == fallback.items
    assert mixed[1].fallback is None


def test_long_history_is_truncated(retr_run):
    rec = Recommender.load(retr_run)
    history = rec.vocab.items[:25]
    out = rec.recommend(history, k=10, exclude_seen=False)
    assert out.truncated and out.used_history == history[-rec.max_len:]
    recent = rec.recommend(history[-rec.max_len:], k=10, exclude_seen=False)
    assert not recent.truncated and recent.items == out.items
    # exclusion covers the whole history, not only the window (as in evaluation)
    assert not set(rec.recommend(history, k=50).items) & set(history)


def test_batch_equals_singles(retr_run):
    rec = Recommender.load(retr_run)
    rng = np.random.default_rng(0)
    items = rec.vocab.items
    histories = [list(rng.choice(items, size=int(rng.integers(1, 15)), replace=False))
                 for _ in range(12)]
    batch = rec.recommend_batch(histories, k=8)
    for h, b in zip(histories, batch, strict=True):
        single = rec.recommend(h, k=8)
        assert single.items == b.items and single.used_history == b.used_history
        np.testing.assert_allclose(single.scores, b.scores, rtol=1e-5, atol=1e-6)


def test_candidates_and_small_catalogue(retr_run):
    rec = Recommender.load(retr_run)
    history = rec.vocab.items[:3]
    full = rec.recommend(history, k=rec.n_items)
    cands = full.items[::-1][:6] + ["nope"]
    out = rec.recommend(history, k=4, candidates=cands)
    assert out.items == [i for i in full.items if i in cands][:4]
    assert out.skipped_candidates == ["nope"]
    assert len(full.items) == rec.n_items - 3  # fewer than k left: no padding ids returned
    with pytest.raises(UnknownItemError):
        rec.recommend(history, candidates=["nope"])


@pytest.mark.parametrize("kwargs, match", [
    ({"k": 0}, "k must be"), ({"k": 2.5}, "k must be"), ({"k": True}, "k must be"),
    ({"exclude_seen": "yes"}, "exclude_seen"), ({"unknown": "ignore"}, "unknown"),
    ({"empty": "zero"}, "empty"),
])
def test_bad_arguments(pop_run, kwargs, match):
    rec = Recommender.load(pop_run)
    with pytest.raises(RequestError, match=match):
        rec.recommend(rec.vocab.items[:2], **kwargs)
    with pytest.raises(RequestError, match="not a single string"):
        rec.recommend("a,b")
    with pytest.raises(RequestError, match="strings or integers"):
        rec.recommend([1.5])


class LastItem(SequentialRecommender):
    """Test model: the state is the embedding of the most recent item."""

    name: ClassVar[str] = "last"

    def __init__(self, n_items: int, max_len: int) -> None:
        super().__init__()
        self.n_items, self.max_len = n_items, max_len
        self.emb = nn.Embedding(n_items + 1, 4)

    def forward(self, seqs: torch.Tensor, output_attentions: bool = False) -> ModelOutput:
        return ModelOutput(hidden=self.emb(seqs))

    def item_representation(self, items: torch.Tensor) -> torch.Tensor:
        return self.emb(items)


def test_custom_model_scores_by_hand():
    torch.manual_seed(0)
    model = LastItem(12, max_len=3)
    vocab = Vocabulary(users=[], items=[f"i{j}" for j in range(12)])
    rec = Recommender(model, vocab, "last")
    out = rec.recommend(["i1", "i4", "i7", "i9"], k=12)
    emb = model.emb.weight.detach()
    scores = emb[1:] @ emb[10]  # i9 is internal id 10
    order = [f"i{j}" for j in torch.argsort(scores, descending=True, stable=True).tolist()]
    assert out.items == [i for i in order if i not in {"i1", "i4", "i7", "i9"}]
    assert out.truncated and out.used_history == ["i4", "i7", "i9"]
    assert rec.info()["n_items"] == 12


# ----- HTTP -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(retr_run):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient
    from retr.serving.http import create_app

    rec = Recommender.load(retr_run)
    return TestClient(create_app(rec, max_batch=4, max_body_bytes=4096, max_k=50),
                      raise_server_exceptions=False)


def test_http_endpoints(client, retr_run):
    rec = Recommender.load(retr_run)
    history = rec.vocab.items[:6]
    assert client.get("/health").json() == {"status": "ok"}
    info = client.get("/model").json()
    assert info["model"] == "retr" and info["n_items"] == rec.n_items
    assert any(r["protocol"] == "full" and "HR@10" in r["metrics"] for r in info["results"])
    one = client.post("/recommend", json={"history": history, "k": 5})
    assert one.status_code == 200
    assert one.json() == rec.recommend(history, k=5).to_dict()
    histories = [history, history[:2], [*history[3:], "unknown"]]
    batch = client.post("/recommend/batch", json={"histories": histories, "k": 5})
    assert batch.status_code == 200
    assert batch.json()["results"] == [r.to_dict() for r in rec.recommend_batch(histories, k=5)]
    explained = client.post("/explain", json={"history": history, "k": 3})
    assert explained.status_code == 200
    assert len(explained.json()["layers"]) == 2
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/docs").status_code == 200


@pytest.mark.parametrize("path, body, status", [
    ("/recommend", {"history": "a,b"}, 422),
    ("/recommend", {"history": [1.5]}, 422),
    ("/recommend", {"history": [True]}, 422),
    ("/recommend", {"history": [["x"]]}, 422),
    ("/recommend", {}, 422),
    ("/recommend", {"history": ["1"], "k": 0}, 422),
    ("/recommend", {"history": ["1"], "k": 51}, 422),
    ("/recommend", {"history": ["1"], "k": "ten"}, 422),
    ("/recommend", {"history": ["1"], "exclude_seen": "no"}, 422),
    ("/recommend", {"history": ["1"], "surprise": 1}, 422),
    ("/recommend", {"history": ["1"], "unknown": "maybe"}, 422),
    ("/recommend", {"history": ["unknown-id"]}, 400),
    ("/recommend", {"history": []}, 400),
    ("/recommend", {"history": ["unknown-id"], "unknown": "error"}, 400),
    ("/recommend", {"history": ["1"], "candidates": ["nope"]}, 400),
    ("/recommend", {"history": ["1"] * 2000}, 413),
    ("/recommend/batch", {"histories": [["1"]] * 5}, 422),
    ("/recommend/batch", {"histories": []}, 422),
    ("/recommend/batch", {"histories": ["1"]}, 422),
    ("/explain", {"history": ["unknown-id"]}, 400),
    ("/explain", {"history": ["1"], "k": -1}, 422),
])
def test_http_bad_input_is_4xx(client, path, body, status):
    resp = client.post(path, json=body)
    assert resp.status_code == status, resp.text
    detail = resp.json()["detail"]
    assert isinstance(detail, str) and detail and "Traceback" not in resp.text


@pytest.mark.parametrize("path, body", [
    ("/recommend", b'{"history": ["\\ud800"]}'),
    ("/recommend", b'{"history": ["1", "a\\udfffb"]}'),
    ("/recommend", b'{"history": ["1"], "candidates": ["\\ud800"]}'),
    ("/recommend/batch", b'{"histories": [["1"], ["\\ud800"]]}'),
    ("/explain", b'{"history": ["\\ud800"]}'),
])
def test_http_lone_surrogate_ids_are_422(client, path, body):
    """A JSON escape that is half a surrogate pair is no text: refused, not answered with a 500."""
    resp = client.post(path, content=body, headers={"content-type": "application/json"})
    assert resp.status_code == 422, resp.text
    assert "not valid Unicode text" in resp.json()["detail"]


def test_recommender_refuses_lone_surrogates(pop_run):
    rec = Recommender.load(pop_run)
    with pytest.raises(RequestError, match=r"history\[1\]: item id '\\ud800' is not valid Unicode"):
        rec.recommend(["1", "\ud800"], k=3)
    with pytest.raises(RequestError, match="not valid Unicode"):
        rec.recommend(["1"], k=3, candidates=["2", "\udcff"])


def test_http_malformed_bodies(client):
    bad_json = client.post("/recommend", content=b"{oops", headers={"content-type": "application/json"})
    assert bad_json.status_code == 422 and "not valid JSON" in bad_json.json()["detail"]
    not_object = client.post("/recommend", content=b"[1, 2]",
                             headers={"content-type": "application/json"})
    assert not_object.status_code == 422
    streamed = client.post("/recommend", content=iter([b"x" * 3000, b"x" * 3000]),
                           headers={"content-type": "application/json"})
    assert streamed.status_code == 413
    assert client.get("/recommend").status_code == 405


# ----- CLI ------------------------------------------------------------------------------------


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="retr")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return int(args.handler(args))


def test_cli_recommend_history(pop_run, capsys):
    rec = Recommender.load(pop_run)
    history = rec.vocab.items[:4]
    assert _cli(["recommend", str(pop_run), "--history", ",".join(history), "-k", "3",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["items"] == rec.recommend(history, k=3).items
    assert _cli(["recommend", str(pop_run), "--history", " ".join(history), "-k", "3"]) == 0
    table = capsys.readouterr().out
    assert all(i in table for i in out["items"])


def test_cli_recommend_files(pop_run, tmp_path):
    rec = Recommender.load(pop_run)
    items = rec.vocab.items
    hist = tmp_path / "histories.csv"
    pd.DataFrame({"id": ["a", "b"], "history": [" ".join(items[:3]), ",".join(items[5:9])]}
                 ).to_csv(hist, index=False)
    out = tmp_path / "out.jsonl"
    assert _cli(["recommend", str(pop_run), "--input", str(hist), "--output", str(out), "-k", "4",
                 "--no-progress"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b"]
    assert rows[1]["items"] == rec.recommend(items[5:9], k=4).items
    # raw interactions, grouped per user by (timestamp, row)
    inter = tmp_path / "log.parquet"
    pd.DataFrame({"user": ["u2", "u1", "u2", "u1"], "item": [items[0], items[1], items[2], items[3]],
                  "timestamp": [5, 1, 2, 1]}).to_parquet(inter)
    ids, histories = read_histories(str(inter))
    assert ids == ["u2", "u1"] and histories == [[items[2], items[0]], [items[1], items[3]]]
    out_pq = tmp_path / "out.parquet"
    assert _cli(["recommend", str(pop_run), "--input", str(inter), "--output", str(out_pq),
                 "--no-progress"]) == 0
    assert list(pd.read_parquet(out_pq)["id"]) == ["u2", "u1"]
    lists = tmp_path / "lists.jsonl"
    lists.write_text('{"user": 7, "history": [1, 2]}\n{"user": 8, "history": []}\n')
    ids, histories = read_histories(str(lists))
    assert ids == ["7", "8"] and histories == [["1", "2"], []]
    with pytest.raises(RetrError, match="history '8' has no known item"):
        _cli(["recommend", str(pop_run), "--input", str(lists), "--no-progress"])
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="no user column"):
        _cli(["recommend", str(pop_run), "--input", str(bad)])


def test_cli_explain_and_errors(retr_run, tmp_path, capsys):
    rec = Recommender.load(retr_run)
    png, js = tmp_path / "p.png", tmp_path / "p.json"
    assert _cli(["explain", str(retr_run), "--history", ",".join(rec.vocab.items[:6]),
                 "--out", str(png), "--json", str(js), "-k", "3"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(json.loads(js.read_text())["recommendations"]) == 3
    assert "on the pathway" in capsys.readouterr().out
    with pytest.raises(RetrError, match="no known item"):
        _cli(["explain", str(retr_run), "--history", "nope"])
    with pytest.raises(RetrError, match="no such run directory"):
        _cli(["recommend", str(tmp_path / "missing"), "--history", "1"])


# ----- ONNX -----------------------------------------------------------------------------------


def test_onnx_export_parity(retr_run, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from retr.serving.export import sample_inputs

    path = tmp_path / "model.onnx"
    assert _cli(["export", str(retr_run), "--out", str(path)]) == 0
    assert ": ok" in capsys.readouterr().out
    rec = Recommender.load(retr_run)
    seqs = sample_inputs(rec, 5, seed=3)
    scores, state = ort.InferenceSession(str(path)).run(None, {"seqs": seqs.numpy()})
    with torch.no_grad():
        ref_state = rec.model.user_representation(seqs)
        ref = rec.model.score_items(ref_state, torch.arange(1, rec.n_items + 1)).numpy()
    assert np.isneginf(scores[:, 0]).all()
    tol = 1e-4 * max(1.0, float(np.abs(ref).max()))
    assert np.abs(scores[:, 1:] - ref).max() <= tol
    assert np.abs(state - ref_state.numpy()).max() <= tol


def test_export_refuses_random_routes(tmp_path):
    from retr.models import build_model
    from retr.serving.export import ExportError, export_onnx

    pytest.importorskip("onnxscript")
    model = build_model("retr", 12, {"hidden_size": 8, "num_heads": 2, "max_len": 4,
                                     "router": "random"})
    rec = Recommender(model, Vocabulary(users=[], items=[str(i) for i in range(12)]), "retr")
    with pytest.raises(ExportError, match="random"):
        export_onnx(rec, tmp_path / "m.onnx")


@pytest.mark.parametrize("max_len", [300, pytest.param(2048, marks=pytest.mark.slow)])
def test_long_windows_train_serve_and_export(max_len, tmp_path, capsys):
    """Windows past the chunked-attention threshold: a RETR run trains, serves, and exports
    to ONNX with the PyTorch scores (the export takes the explicit attention path)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    long_data = "synthetic:n_users=60,n_items=400,n_themes=10,min_len=10,max_len=400,seed=2"
    run = tmp_path / "run"
    argv = ["train", "--data", long_data, "--model", "retr", "--out", str(run), "--quiet"]
    for s in ["model.hidden_size=8", "model.num_heads=2", f"model.max_len={max_len}",
              "model.router_hidden=4", "train.epochs=1", "eval.negatives=20"]:
        argv += ["--set", s]
    assert main(argv) == 0
    rec = Recommender.load(run)
    history = rec.vocab.items[:350]
    assert len(rec.recommend(history, k=5).items) == 5
    capsys.readouterr()
    assert _cli(["export", str(run), "--out", str(tmp_path / "m.onnx")]) == 0
    assert ": ok" in capsys.readouterr().out
