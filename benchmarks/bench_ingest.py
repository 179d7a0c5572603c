"""Ingestion of a large interaction log: time and peak memory from Parquet to compact sequences.

Usage:
    python -m benchmarks.bench_ingest --rows 20000000 [--users 200000 --items 50000] [--dir /tmp]
        [--csv] [--dataframe] [--json-out benchmarks/results/ingest-20M.json]

Writes a synthetic Parquet log (Zipf-popular items, random timestamps; in a child process, so
that writing it does not count), then times `load_dataset` on it (streamed parquet read, 5-core,
chronological sort, vocabulary, flat storage). ``--csv`` writes and reads the same log as a CSV
file (streamed by Arrow's CSV reader). ``--dataframe`` instead times the DataFrame path,
`retr.read_interactions` then `retr.dataset_from_frame` (the same preprocessing), with the
read/preprocess split. Peak RSS is the process
maximum, so run one mode per process. ``rss_growth_mb`` is the peak minus the resident memory
before the read (the interpreter, numpy, pandas, pyarrow and torch, which `retr.config` imports),
and ``growth_over_compact`` divides it by the size of the arrays the dataset keeps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import retr

from .common import peak_rss_mb


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


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


def write_csv_log(path: Path, rows: int, users: int, items: int) -> None:
    """The same log as CSV (no quotes), written batch by batch from the Parquet one."""
    import pyarrow.csv as pcsv

    parquet = path.with_suffix(".parquet")
    if not parquet.exists():
        write_log(parquet, rows, users, items)
    with path.open("wb") as fh:
        fh.write(b"user_id,item_id,timestamp\n")
        options = pcsv.WriteOptions(include_header=False, quoting_style="none")
        for batch in pq.ParquetFile(str(parquet)).iter_batches(batch_size=2_000_000):
            pcsv.write_csv(batch, fh, write_options=options)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=20_000_000)
    p.add_argument("--users", type=int, default=200_000)
    p.add_argument("--items", type=int, default=50_000)
    p.add_argument("--dir", type=Path, default=Path("/tmp"))
    p.add_argument("--dataframe", action="store_true",
                   help="time read_interactions + dataset_from_frame instead of load_dataset")
    p.add_argument("--csv", action="store_true", help="read the log as CSV instead of Parquet")
    p.add_argument("--json-out", type=Path, help="also write the record to this file")
    p.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    path = a.dir / f"retr-ingest-{a.rows}.{'csv' if a.csv else 'parquet'}"
    data = retr.RunConfig.from_dict({"data": {"source": str(path), "min_user_interactions": 5,
                                              "min_item_interactions": 5}}).data
    if a.generate_only:
        (write_csv_log if a.csv else write_log)(path, a.rows, a.users, a.items)
        return
    t0 = time.perf_counter()
    if not path.exists():  # in a child process: its memory is not this process's peak
        subprocess.run([sys.executable, "-m", "benchmarks.bench_ingest", "--generate-only",
                        "--rows", str(a.rows),
                        "--users", str(a.users), "--items", str(a.items), "--dir", str(a.dir),
                        *(["--csv"] if a.csv else [])], check=True)
    gen_s = time.perf_counter() - t0
    rss0 = rss_mb()
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
    compact = (ds.items.nbytes + ds.offsets.nbytes
               + (ds.timestamps.nbytes if ds.timestamps is not None else 0)) / 2**20
    peak = peak_rss_mb()
    argv = ["python", "-m", "benchmarks.bench_ingest", *sys.argv[1:]]
    record = {
        "rows": a.rows, "file_mb": round(path.stat().st_size / 2**20, 1),
        "format": "csv" if a.csv else "parquet",
        "path": "dataframe" if a.dataframe else "load_dataset (streamed)",
        "generate_seconds": round(gen_s, 1), "total_seconds": round(total_s, 1), **stages,
        "rows_per_second": round(a.rows / total_s),
        "rss_mb_before_read": round(rss0), "peak_rss_mb": round(peak),
        "rss_growth_mb": round(peak - rss0),
        "users": ds.n_users, "items": ds.n_items, "interactions": ds.n_interactions,
        "compact_storage_mb": round(compact, 1),
        "growth_over_compact": round((peak - rss0) / compact, 2),
        "threads": os.environ.get("OMP_NUM_THREADS", "unset"),
        "hardware": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "command": " ".join(argv),
    }
    text = json.dumps(record, indent=2)
    print(text)
    if a.json_out is not None:
        a.json_out.parent.mkdir(parents=True, exist_ok=True)
        a.json_out.write_text(text + "\n")


if __name__ == "__main__":
    main()
