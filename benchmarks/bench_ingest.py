"""Ingestion of a large interaction log: time and peak memory from Parquet to compact sequences.

Usage:
    python -m benchmarks.bench_ingest --rows 20000000 [--users 200000 --items 50000] [--dir /tmp]
        [--dataframe]

Writes a synthetic Parquet log (Zipf-popular items, random timestamps), then times
`load_dataset` on it (streamed parquet read, 5-core, chronological sort, vocabulary, flat
storage). ``--dataframe`` instead times the DataFrame path, `retr.read_interactions` then
`retr.dataset_from_frame` (the same preprocessing), with the read/preprocess split. Peak RSS
is the process maximum, so run one mode per process.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import retr

from .common import peak_rss_mb


def write_log(path: Path, rows: int, users: int, items: int, seed: int = 0) -> None:
    """Write the log in row groups of 2M rows so generating it stays small too."""
    rng = np.random.default_rng(seed)
    writer = None
    chunk = 2_000_000
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        table = pa.table({
            "user_id": rng.integers(0, users, n).astype(np.int64),
            "item_id": ((rng.zipf(1.2, n) - 1) % items).astype(np.int64),
            "timestamp": rng.integers(1_000_000_000, 1_700_000_000, n).astype(np.int64),
        })
        if writer is None:
            writer = pq.ParquetWriter(str(path), table.schema)
        writer.write_table(table)
    if writer is not None:
        writer.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=20_000_000)
    p.add_argument("--users", type=int, default=200_000)
    p.add_argument("--items", type=int, default=50_000)
    p.add_argument("--dir", type=Path, default=Path("/tmp"))
    p.add_argument("--dataframe", action="store_true",
                   help="time read_interactions + dataset_from_frame instead of load_dataset")
    a = p.parse_args()
    path = a.dir / f"retr-ingest-{a.rows}.parquet"
    data = retr.RunConfig.from_dict({"data": {"source": str(path), "min_user_interactions": 5,
                                              "min_item_interactions": 5}}).data
    t0 = time.perf_counter()
    if not path.exists():
        write_log(path, a.rows, a.users, a.items)
    gen_s = time.perf_counter() - t0
    rss0 = peak_rss_mb()
    stages: dict[str, float] = {}
    t0 = time.perf_counter()
    if a.dataframe:
        log = retr.read_interactions(path)
        stages["read_seconds"] = round(time.perf_counter() - t0, 1)
        stages["peak_rss_mb_after_read"] = round(peak_rss_mb())
        t1 = time.perf_counter()
        ds = retr.dataset_from_frame(log, data, name=path.name)
        stages["preprocess_seconds"] = round(time.perf_counter() - t1, 1)
        del log
    else:
        ds = retr.load_dataset(data)
    total_s = time.perf_counter() - t0
    print(json.dumps({
        "rows": a.rows, "file_mb": round(path.stat().st_size / 2**20, 1),
        "path": "dataframe" if a.dataframe else "load_dataset (streamed)",
        "generate_seconds": round(gen_s, 1), "total_seconds": round(total_s, 1), **stages,
        "rows_per_second": round(a.rows / total_s),
        "peak_rss_mb_before_read": round(rss0), "peak_rss_mb": round(peak_rss_mb()),
        "users": ds.n_users, "items": ds.n_items, "interactions": ds.n_interactions,
        "compact_storage_mb": round((ds.items.nbytes + ds.offsets.nbytes
                                     + (ds.timestamps.nbytes if ds.timestamps is not None else 0))
                                    / 2**20, 1),
    }, indent=2))


if __name__ == "__main__":
    main()
