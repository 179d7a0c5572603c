"""Full-ranking evaluation throughput and peak memory of `pop` (the scoring path every model uses).

Usage:
    python -m benchmarks.bench_full_ranking ml-1m            # needs RETR_DATA_DIR
    python -m benchmarks.bench_full_ranking catalogue --items 1000000 --users 20000

Prints users/s and peak RSS; memory stays bounded by batch_size x item_chunk scores whatever the
catalogue size.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

import retr
from retr import SequenceDataset, Vocabulary

from .common import peak_rss_mb


def big_catalogue(n_items: int, n_users: int, seq_len: int, seed: int = 0) -> SequenceDataset:
    """Random Zipf-popular sequences over ``n_items`` items, built directly in compact form."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(seq_len // 2, seq_len * 2, n_users)
    items = (rng.zipf(1.3, int(lens.sum())) - 1) % n_items + 1
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    vocab = Vocabulary(users=[str(u) for u in range(n_users)], items=[str(i) for i in range(n_items)])
    return SequenceDataset(items=items.astype(np.int64), offsets=offsets, vocab=vocab,
                           name=f"catalogue-{n_items}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", help="a registry name (e.g. ml-1m) or 'catalogue'")
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--users", type=int, default=20_000)
    p.add_argument("--seq-len", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--item-chunk", type=int, default=4096)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.source == "catalogue":
        ds = big_catalogue(args.items, args.users, args.seq_len)
    else:
        ds = retr.load_dataset(retr.RunConfig.from_dict({"data": {"source": args.source}}).data)
    split = retr.make_split(ds, "loo")
    load_s = time.perf_counter() - t0
    model = retr.build_model("pop", ds.n_items)
    model.fit_counts(split.train_item_counts(ds))
    cfg = retr.RunConfig.from_dict({"eval": {"ks": [10], "batch_size": args.batch_size,
                                             "item_chunk": args.item_chunk}}).eval
    rss_before = peak_rss_mb()
    t0 = time.perf_counter()
    res = retr.evaluate(model, ds, split.test, "full", cfg, progress=True)
    secs = time.perf_counter() - t0
    print(json.dumps({
        "dataset": ds.name, "users": len(split.test), "items": ds.n_items,
        "load_seconds": round(load_s, 2), "eval_seconds": round(secs, 2),
        "users_per_second": round(len(split.test) / secs, 1),
        "peak_rss_mb_before_eval": round(rss_before, 1), "peak_rss_mb": round(peak_rss_mb(), 1),
        "batch_size": args.batch_size, "item_chunk": args.item_chunk,
        "threads": torch.get_num_threads(),
        "HR@10": round(res["metrics"]["HR@10"], 4), "NDCG@10": round(res["metrics"]["NDCG@10"], 4),
    }, indent=2))


if __name__ == "__main__":
    main()
