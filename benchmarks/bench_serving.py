"""Serving latency and throughput of ``retr serve`` on loopback, printed as JSON.

The server runs in its own process on 127.0.0.1 (a free port); a bounded number of client
threads send requests for a bounded time per scenario: one history per request
(``POST /recommend``) and batches (``POST /recommend/batch``). Reported per scenario: requests,
errors, requests/s, histories/s and latency p50/p90/p99. The in-process Python call
(``Recommender.recommend``, no HTTP) is timed too, as the floor HTTP adds to.

    python -m benchmarks.bench_serving RUN_DIR --concurrency 4 --seconds 5 --batches 1,16,64
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import socket
import sys
import threading
import time
from typing import Any

import numpy as np

MAX_SECONDS = 60.0
MAX_CONCURRENCY = 64


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(run_dir: str, port: int, threads: int, max_batch: int) -> None:
    import torch
    import uvicorn

    from retr import Recommender, create_app

    if threads:
        torch.set_num_threads(threads)
    app = create_app(Recommender.load(run_dir), max_batch=max_batch, max_body_bytes=8 << 20)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", limit_concurrency=256)


def _rss_mb(pid: int | None) -> float | None:
    """Resident memory of process ``pid`` from /proc (None where /proc is unavailable)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def _wait_ready(url: str, timeout: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server at {url} did not become ready in {timeout:.0f}s")


def _percentiles(ms: list[float]) -> dict[str, float]:
    if not ms:
        return {"p50_ms": float("nan"), "p90_ms": float("nan"), "p99_ms": float("nan"),
                "mean_ms": float("nan")}
    arr = np.asarray(ms)
    return {"p50_ms": round(float(np.percentile(arr, 50)), 3),
            "p90_ms": round(float(np.percentile(arr, 90)), 3),
            "p99_ms": round(float(np.percentile(arr, 99)), 3),
            "mean_ms": round(float(arr.mean()), 3)}


def _load_test(url: str, histories: list[list[str]], batch: int, k: int, concurrency: int,
               seconds: float) -> dict[str, Any]:
    import httpx

    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors = [0] * concurrency
    endpoint = "/recommend" if batch == 1 else "/recommend/batch"
    start_gate = threading.Barrier(concurrency + 1)

    def client(idx: int) -> None:
        rng = np.random.default_rng(idx)
        with httpx.Client(base_url=url, timeout=30.0) as http:
            start_gate.wait()
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                picks = rng.integers(0, len(histories), size=batch)
                body: dict[str, Any] = {"k": k}
                if batch == 1:
                    body["history"] = histories[int(picks[0])]
                else:
                    body["histories"] = [histories[int(i)] for i in picks]
                t0 = time.perf_counter()
                try:
                    ok = http.post(endpoint, json=body).status_code == 200
                except httpx.HTTPError:
                    ok = False
                elapsed = (time.perf_counter() - t0) * 1000.0
                if ok:
                    latencies[idx].append(elapsed)
                else:
                    errors[idx] += 1

    workers = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    for w in workers:
        w.start()
    start_gate.wait()
    t0 = time.perf_counter()
    for w in workers:
        w.join()
    wall = time.perf_counter() - t0
    done = [x for lat in latencies for x in lat]
    return {"endpoint": endpoint, "batch": batch, "requests": len(done), "errors": sum(errors),
            "requests_per_s": round(len(done) / wall, 2),
            "histories_per_s": round(len(done) * batch / wall, 2),
            "wall_s": round(wall, 3), **_percentiles(done)}


def _in_process(run_dir: str, histories: list[list[str]], k: int, seconds: float,
                threads: int) -> dict[str, Any]:
    import torch

    from retr import Recommender

    if threads:
        torch.set_num_threads(threads)
    rec = Recommender.load(run_dir)
    times = []
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:
        t0 = time.perf_counter()
        rec.recommend(histories[i % len(histories)], k=k)
        times.append((time.perf_counter() - t0) * 1000.0)
        i += 1
    return {"endpoint": "Recommender.recommend (in process)", "batch": 1, "requests": len(times),
            "requests_per_s": round(len(times) / max(sum(times) / 1000.0, 1e-9), 2),
            **_percentiles(times)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("run_dir")
    parser.add_argument("--concurrency", type=int, default=4, help="client threads (<= 64)")
    parser.add_argument("--seconds", type=float, default=5.0, help="per scenario (<= 60)")
    parser.add_argument("--batches", default="1,16,64", help="histories per request")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--history-len", type=int, default=20, help="items per history")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the server")
    args = parser.parse_args(argv)
    if not 1 <= args.concurrency <= MAX_CONCURRENCY:
        parser.error(f"--concurrency must be in 1..{MAX_CONCURRENCY}")
    if not 0 < args.seconds <= MAX_SECONDS:
        parser.error(f"--seconds must be in (0, {MAX_SECONDS:g}]")
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    if not batches or min(batches) < 1:
        parser.error("--batches must list integers >= 1")

    from retr import Recommender

    rec = Recommender.load(args.run_dir)
    rng = np.random.default_rng(0)
    length = min(args.history_len, rec.n_items)
    histories = [list(rng.choice(rec.vocab.items, size=length, replace=False)) for _ in range(512)]
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = mp.get_context("spawn").Process(
        target=_serve, args=(args.run_dir, port, args.threads, max(batches)), daemon=True)
    server.start()
    try:
        _wait_ready(url)
        _load_test(url, histories, 1, args.k, 1, min(1.0, args.seconds))  # warm-up
        rss_before = _rss_mb(server.pid)
        results = [_in_process(args.run_dir, histories, args.k, args.seconds, args.threads)]
        for batch in batches:
            res = _load_test(url, histories, batch, args.k, args.concurrency, args.seconds)
            res["server_rss_mb_after"] = _rss_mb(server.pid)
            results.append(res)
        rss_after = _rss_mb(server.pid)
    finally:
        server.terminate()
        server.join(10)
    import torch

    report = {"run_dir": args.run_dir, "model": rec.model_name, "n_items": rec.n_items,
              "max_len": rec.max_len, "history_len": length, "k": args.k,
              "concurrency": args.concurrency, "seconds_per_scenario": args.seconds,
              "server_threads": args.threads, "host": "127.0.0.1",
              "python": platform.python_version(), "torch": torch.__version__,
              "cpus": mp.cpu_count(), "server_rss_mb_after_warmup": rss_before,
              "server_rss_mb_after_load": rss_after, "results": results}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
