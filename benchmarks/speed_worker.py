"""One implementation's side of `benchmarks.bench_speed`, run in that implementation's own interpreter
(``python -m benchmarks.speed_worker`` from the repository root).

Needs only numpy, pandas and the library under test, so it runs in a peer's virtualenv (where
retr is not installed): it imports nothing else from this package. Reads the shared work
directory that bench_speed prepared:

- ``train.csv``: user_id, item_id, datetime (each user's training items, in order);
- ``valid.npz``: users [U], targets [U], negatives [U, 100] (external ids);
- ``latency_users.npy``: users whose training history is the single-request workload.

Prints one JSON object: per-epoch training seconds and validation sampled NDCG@10, the
validation NDCG@10 over all items (history excluded) at the end of the budget, top-10
full-ranking time over every user, single-history latencies, and for a retr model with a
router its inference keep rate per layer.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def sampled_ndcg10(scores: np.ndarray, target_col: np.ndarray, neg_cols: np.ndarray) -> float:
    """Mean NDCG@10 of the target among its negatives; ties count half (expected rank)."""
    rows = np.arange(len(scores))[:, None]
    t = scores[rows[:, 0], target_col][:, None]  # [U, 1]
    neg = scores[rows, neg_cols]  # [U, 100]
    rank = (neg > t).sum(1) + 0.5 * (neg == t).sum(1)  # 0-based expected rank
    gain = np.where(rank < 10, 1.0 / np.log2(rank + 2.0), 0.0)
    return float(gain.mean())


def full_ndcg10(scores: np.ndarray, target_col: np.ndarray, seen: list[np.ndarray]) -> float:
    """Mean NDCG@10 of the target among all items, each user's training items excluded;
    ties count half (a constant scorer lands at the middle of the catalogue)."""
    scores = scores.astype(np.float64)  # a copy: the history is masked in place
    for row, cols in enumerate(seen):
        scores[row, cols[cols != target_col[row]]] = -np.inf
    t = scores[np.arange(len(scores)), target_col][:, None]  # [U, 1]
    rank = (scores > t).sum(1) + 0.5 * ((scores == t).sum(1) - 1)  # 0-based expected rank
    gain = np.where(rank < 10, 1.0 / np.log2(rank + 2.0), 0.0)
    return float(gain.mean())


def columns_of(items: np.ndarray, ext: np.ndarray) -> np.ndarray:
    """Column of each external id in a score matrix whose columns are ``items``."""
    names = items.astype(str)
    order = np.argsort(names)
    return order[np.searchsorted(names[order], ext.astype(str))]


def _percentiles(values: list[float]) -> dict[str, float]:
    ms = np.asarray(values) * 1000.0
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2)}


class RecToolsSide:
    """RecTools' SASRecModel driven through its public API (fit_partial, recommend)."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        import torch
        from rectools import Columns
        from rectools.dataset import Dataset
        from rectools.models import SASRecModel
        from rectools.models.nn.item_net import IdEmbeddingsItemNet

        torch.set_num_threads(args.threads)
        torch.manual_seed(args.seed)
        self.columns = Columns
        df = pd.read_csv(work / "train.csv")
        df["weight"] = 1.0
        df["datetime"] = pd.to_datetime(df["datetime"], unit="s")
        self.dataset = Dataset.construct(df)
        loss = {"bce": "BCE", "ce": "softmax"}[args.loss]
        self.model = SASRecModel(
            n_blocks=args.layers, n_heads=args.heads, n_factors=args.hidden, dropout_rate=0.2,
            session_max_len=args.max_len, loss=loss, n_negatives=1, lr=1e-3,
            batch_size=args.batch_size, epochs=1, deterministic=False,
            item_net_block_types=(IdEmbeddingsItemNet,),  # ID embeddings only, as retr here
            recommend_n_threads=args.threads)
        self.items = np.sort(df["item_id"].unique())

    def train_epoch(self) -> None:
        self.model.fit_partial(self.dataset, min_epochs=1, max_epochs=1)

    def scores(self, users: np.ndarray) -> np.ndarray:
        """[U, n_items] scores over ``self.items`` (external ids), in chunks of users."""
        out = np.full((len(users), len(self.items)), -np.inf, dtype=np.float32)
        pos = {u: i for i, u in enumerate(users)}
        for start in range(0, len(users), 500):
            chunk = users[start:start + 500]
            reco = self.model.recommend(chunk, self.dataset, k=len(self.items),
                                        filter_viewed=False)
            rows = reco[self.columns.User].map(pos).to_numpy()
            cols = np.searchsorted(self.items, reco[self.columns.Item].to_numpy())
            out[rows, cols] = reco[self.columns.Score].to_numpy()
        return out

    def topk_all(self, users: np.ndarray) -> None:
        self.model.recommend(users, self.dataset, k=10, filter_viewed=True)

    def one(self, user: Any) -> None:
        self.model.recommend([user], self.dataset, k=10, filter_viewed=True)


class RecBoleSide:
    """RecBole 1.2.1's SASRec through its own data pipeline, model and loss.

    RecBole turns every prefix of a user's training items into one sample (loss at its last
    position only), so one of its epochs is far longer than a budget: ``train_epoch`` trains
    one *segment* of ``budget / 6`` seconds, continuing the same shuffled epoch across calls,
    and reports which fraction of an epoch that was. Scoring uses ``full_sort_predict`` on the
    users' training items, left-aligned as RecBole pads them.
    """

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        import logging

        import torch
        from recbole.config import Config
        from recbole.data import create_dataset, data_preparation
        from recbole.model.sequential_recommender import SASRec
        from recbole.utils import init_seed

        logging.getLogger().setLevel(logging.WARNING)
        torch.set_num_threads(args.threads)
        df = pd.read_csv(work / "train.csv")
        valid = np.load(work / "valid.npz", allow_pickle=False)
        # RecBole holds out each user's last item ('valid_only'): append the shared validation
        # target, so that it trains on exactly train.csv, as the other implementations do
        last = df.groupby("user_id")["datetime"].max()
        extra = pd.DataFrame({"user_id": valid["users"], "item_id": valid["targets"],
                              "datetime": last.loc[valid["users"]].to_numpy() + 1})
        name = "ml1m"
        folder = work / "recbole" / name
        folder.mkdir(parents=True, exist_ok=True)
        inter = pd.concat([df, extra]).rename(columns={
            "user_id": "user_id:token", "item_id": "item_id:token", "datetime": "timestamp:float"})
        inter.to_csv(folder / f"{name}.inter", sep="\t", index=False)
        loss = {"bce": "BPR", "ce": "CE"}[args.loss]
        config = Config(model="SASRec", dataset=name, config_dict={
            "data_path": str(work / "recbole"), "checkpoint_dir": str(work / "recbole" / "saved"),
            "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "TIME_FIELD": "timestamp",
            "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
            "MAX_ITEM_LIST_LENGTH": args.max_len, "n_layers": args.layers,
            "n_heads": args.heads, "hidden_size": args.hidden, "inner_size": args.hidden,
            "hidden_act": "relu", "hidden_dropout_prob": 0.2, "attn_dropout_prob": 0.2,
            "loss_type": loss, "train_batch_size": args.batch_size, "learning_rate": 1e-3,
            "train_neg_sample_args": ({"distribution": "uniform", "sample_num": 1,
                                       "alpha": 1.0, "dynamic": False, "candidate_num": 0}
                                      if loss == "BPR" else None),
            "eval_args": {"split": {"LS": "valid_only"}, "order": "TO", "group_by": "user",
                          "mode": "full"},
            "seed": args.seed, "reproducibility": False, "device": "cpu", "use_gpu": False,
            "show_progress": False, "worker": 0})
        init_seed(config["seed"], config["reproducibility"])
        dataset = create_dataset(config)
        self.train_data, _, _ = data_preparation(config, dataset)
        self.samples_per_epoch = len(self.train_data.dataset)
        self.model = SASRec(config, self.train_data.dataset)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.segment_seconds = args.minutes * 60 / 6
        self.batches: Any = None
        self.items = np.sort(df["item_id"].unique())
        self.columns = dataset.token2id("item_id", self.items.astype(str))  # RecBole id per item
        self.max_len = args.max_len
        # every user's training items as RecBole ids, flat in user then time order (CSR)
        ordered = df.sort_values(["user_id", "datetime"])
        self.users, self.lengths = np.unique(ordered["user_id"].to_numpy(), return_counts=True)
        self.ends = np.cumsum(self.lengths)
        self.flat = dataset.token2id("item_id", ordered["item_id"].astype(str).to_numpy())
        self.epoch_fraction = 0.0

    def train_epoch(self) -> None:
        self.model.train()
        start, seen = time.perf_counter(), 0
        while time.perf_counter() - start < self.segment_seconds:
            if self.batches is None:
                self.batches = iter(self.train_data)
            batch = next(self.batches, None)
            if batch is None:  # the epoch is over: the next segment starts a new one
                self.batches = None
                continue
            loss = self.model.calculate_loss(batch)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            seen += len(batch)
        self.epoch_fraction = seen / self.samples_per_epoch

    def _all_scores(self, users: np.ndarray) -> Any:
        """[B, n_recbole_items] scores of ``users`` (external ids) from their training items."""
        import torch
        from recbole.data.interaction import Interaction

        r = np.searchsorted(self.users, users)
        lengths = np.minimum(self.lengths[r], self.max_len)  # the last max_len items
        cols = np.arange(self.max_len)
        pos = (self.ends[r] - lengths)[:, None] + cols  # [B, N]
        real = cols < lengths[:, None]  # left-aligned, as RecBole pads
        seq = np.where(real, self.flat[np.minimum(pos, len(self.flat) - 1)], 0)
        batch = Interaction({self.model.ITEM_SEQ: torch.from_numpy(seq.astype(np.int64)),
                             self.model.ITEM_SEQ_LEN: torch.from_numpy(lengths)})
        with torch.no_grad():
            return self.model.full_sort_predict(batch)

    def scores(self, users: np.ndarray) -> np.ndarray:
        self.model.eval()
        return np.concatenate([self._all_scores(users[s:s + 500])[:, self.columns].numpy()
                               for s in range(0, len(users), 500)])

    def _top10(self, users: np.ndarray) -> Any:
        import torch

        s = self._all_scores(users)
        s[:, 0] = -torch.inf  # padding
        # history excluded, as recommend(filter_viewed=True): every training item of each row
        r = np.searchsorted(self.users, users)
        n = self.lengths[r]
        within = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
        items = self.flat[np.repeat(self.ends[r] - n, n) + within]
        rows = np.repeat(np.arange(len(users)), n)
        s[torch.from_numpy(rows), torch.from_numpy(items.astype(np.int64))] = -torch.inf
        return s.topk(10, dim=1).indices

    def topk_all(self, users: np.ndarray) -> None:
        self.model.eval()
        for start in range(0, len(users), 256):
            self._top10(users[start:start + 256])

    def one(self, user: Any) -> None:
        self.model.eval()
        self._top10(np.array([user]))


class RetrSide:
    """retr's own training loop pieces (the same code `retr train` runs), one epoch at a time."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        import torch

        import retr

        torch.set_num_threads(args.threads)
        model_cfg: dict[str, Any] = {"hidden_size": args.hidden, "num_heads": args.heads,
                                     "num_layers": args.layers, "max_len": args.max_len}
        if args.model == "retr":
            model_cfg["ffn_size"] = args.hidden
        for item in args.set:  # model keys, e.g. keep_target=0.25 (values as JSON, else text)
            key, _, value = item.partition("=")
            try:
                model_cfg[key] = json.loads(value)
            except json.JSONDecodeError:
                model_cfg[key] = value
        self.cfg = retr.RunConfig.from_dict({
            "seed": args.seed, "model": {"name": args.model, **model_cfg},
            "data": {"min_user_interactions": 0, "min_item_interactions": 0},
            "train": {"loss": args.loss, "batch_size": args.batch_size, "lr": 1e-3,
                      "negatives": 1, "threads": args.threads, "progress": False,
                      "precision": args.precision, "length_groups": args.length_groups}},
            "bench")
        # user_id, item_id, datetime: the frame's usual column names; ids are read as text
        self.dataset = retr.dataset_from_frame(pd.read_csv(work / "train.csv"), self.cfg.data,
                                               name="ml-1m-train")
        torch.manual_seed(args.seed)
        self.model = retr.build_model(args.model, self.dataset.n_items, model_cfg)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.epoch = 0
        self.user_index = {u: i for i, u in enumerate(self.dataset.vocab.users)}
        self.items = np.array(self.dataset.vocab.items)

    def train_epoch(self) -> None:
        """One epoch of `retr train`'s loop (``retr.train_epoch``) over every user's sequence."""
        import retr

        self.epoch += 1
        d = self.dataset
        retr.train_epoch(self.model, d, np.arange(d.n_users), d.lengths, self.opt,
                         self.cfg.train, self.cfg.seed, self.epoch)

    def _ids(self, users: np.ndarray) -> np.ndarray:
        return np.array([self.user_index[str(u)] for u in users])

    def scores(self, users: np.ndarray) -> np.ndarray:
        import torch

        import retr

        self.model.eval()
        ids, out = self._ids(users), []
        for start in range(0, len(ids), 500):
            u = ids[start:start + 500]
            h = retr.user_states(self.model, self.dataset, u, self.dataset.lengths[u])
            with torch.no_grad():
                out.append(self.model.score_items(
                    h, torch.arange(1, self.dataset.n_items + 1)).numpy())
        return np.concatenate(out)

    def keep_rates(self, users: np.ndarray, sample: int = 512, batch: int = 64) -> list[float]:
        """Share of the real window tokens on the inference route, per layer ([] without a
        router), over ``sample`` of ``users`` (seeded). The routes are read by forward hooks on
        the routed attention modules: no attention weights, so no [N, N] memory."""
        import torch

        layers = [m for m in self.model.modules()  # the routed attentions: (y, w, R, info)
                  if getattr(m, "routed", False) and hasattr(m, "router")]
        if not layers:
            return []
        seen: list[torch.Tensor] = []
        hooks = [m.register_forward_hook(lambda _m, _i, out: seen.append(out[2]))
                 for m in layers]
        ids = np.random.default_rng(0).permutation(self._ids(users))[:sample]
        kept, real = [0.0] * len(layers), 0.0
        self.model.eval()
        try:
            with torch.no_grad():
                for start in range(0, len(ids), batch):
                    u = ids[start:start + batch]
                    seqs = torch.from_numpy(self.dataset.padded_prefixes(
                        u, self.dataset.lengths[u], self.model.max_len))
                    seen.clear()
                    self.model(seqs)
                    on = seqs > 0
                    kept = [a + float((r > 0.5)[on].sum()) for a, r in zip(kept, seen, strict=True)]
                    real += float(on.sum())
        finally:
            for h in hooks:
                h.remove()
        return [round(k / max(real, 1.0), 4) for k in kept]

    def _recommender(self) -> Any:
        import retr

        return retr.Recommender(self.model.eval(), self.dataset.vocab, self.cfg.model_name)

    def topk_all(self, users: np.ndarray) -> None:
        """Top-10 for every user, history excluded: the evaluation path (``retr.top_k``, user
        batches x item chunks), the same work as RecTools' ``recommend(filter_viewed=True)``."""
        import retr

        ids = self._ids(users)
        retr.top_k(self.model, self.dataset, ids, self.dataset.lengths[ids], k=10, batch_size=256)

    def one(self, user: Any) -> None:
        if not hasattr(self, "_rec"):
            self._rec = self._recommender()
        seq = self.dataset.sequence(self.user_index[str(user)])
        self._rec.recommend(self.items[seq - 1].tolist(), k=10)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--impl", choices=["retr", "rectools", "recbole"], required=True)
    p.add_argument("--model", default="sasrec")
    p.add_argument("--loss", choices=["bce", "ce"], default="bce")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--length-groups", type=int, default=4, help="retr: train.length_groups")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--minutes", type=float, default=4.0, help="training budget")
    p.add_argument("--max-epochs", type=int, default=200)
    p.add_argument("--target", type=float, default=0.55, help="valid sampled NDCG@10 to reach")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--max-len", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="retr: a model config key (repeatable)")
    p.add_argument("--no-stop", action="store_true",
                   help="train the whole budget even once the target is reached")
    p.add_argument("--final-eval-only", action="store_true",
                   help="validate once, after the budget (not after every epoch)")
    args = p.parse_args()
    work = args.work
    t0 = time.perf_counter()
    sides = {"retr": RetrSide, "rectools": RecToolsSide, "recbole": RecBoleSide}
    side: RecToolsSide | RecBoleSide | RetrSide = sides[args.impl](args, work)
    setup_s = time.perf_counter() - t0
    valid = np.load(work / "valid.npz", allow_pickle=False)
    users = valid["users"]
    target_cols = columns_of(side.items, valid["targets"])
    negative_cols = columns_of(side.items, valid["negatives"])
    epochs: list[dict[str, float]] = []
    trained = 0.0
    reached = None
    while trained < args.minutes * 60 and len(epochs) < args.max_epochs:
        t = time.perf_counter()
        side.train_epoch()
        sec = time.perf_counter() - t
        trained += sec
        epochs.append({"epoch": len(epochs) + 1, "seconds": round(sec, 2)})
        if isinstance(side, RecBoleSide):  # a segment of an epoch, not a whole one
            epochs[-1]["fraction_of_epoch"] = round(side.epoch_fraction, 5)
        last = trained >= args.minutes * 60 or len(epochs) == args.max_epochs
        if args.final_eval_only and not last:
            print(json.dumps(epochs[-1]), file=sys.stderr, flush=True)
            continue
        ndcg = sampled_ndcg10(side.scores(users), target_cols, negative_cols)
        epochs[-1]["valid_sampled_ndcg10"] = round(ndcg, 4)
        print(json.dumps(epochs[-1]), file=sys.stderr, flush=True)
        if reached is None and ndcg >= args.target:
            reached = round(trained, 1)
            if not args.no_stop:
                break
    history = pd.read_csv(work / "train.csv")
    history = history[history["user_id"].isin(users)]
    row_of = {u: i for i, u in enumerate(users)}
    seen: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * len(users)
    for user, items in history.groupby("user_id")["item_id"]:
        seen[row_of[user]] = columns_of(side.items, items.to_numpy())
    full = full_ndcg10(side.scores(users), target_cols, seen)
    t = time.perf_counter()
    side.topk_all(users)
    full_s = time.perf_counter() - t
    lat = []
    for u in np.load(work / "latency_users.npy", allow_pickle=False):
        t = time.perf_counter()
        side.one(u)
        lat.append(time.perf_counter() - t)
    extra: dict[str, Any] = {}
    if isinstance(side, RecBoleSide):  # what a whole epoch of its samples would take
        done = sum(e["fraction_of_epoch"] for e in epochs)
        extra = {"samples_per_epoch": side.samples_per_epoch,
                 "epoch_seconds_estimate": round(trained / done, 1) if done else None}
    if isinstance(side, RetrSide):
        extra["route_keep"] = side.keep_rates(users)
    print(json.dumps({**extra, "setup_seconds": round(setup_s, 1), "epochs": epochs,
                      "valid_full_ndcg10": round(full, 4),
                      "train_seconds": round(trained, 1), "time_to_target_seconds": reached,
                      "full_ranking_seconds": round(full_s, 3), "users": int(len(users)),
                      "latency": _percentiles(lat[5:])}))


if __name__ == "__main__":
    main()
