"""CLI commands over a trained run: ``recommend``, ``explain``, ``export`` and ``serve``.

``register(subparsers)`` adds them to the ``retr`` parser; each parser carries its handler in
``args.handler`` (also in :data:`COMMANDS`), which returns an exit code and raises
:class:`retr.errors.RetrError` for user errors. The optional packages (fastapi/uvicorn,
onnx/onnxruntime, matplotlib) are imported only when a command needs them.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from retr.data.histories import INPUT_FORMATS, file_format, parse_history, read_histories
from retr.errors import ConfigError
from retr.explain.pathway import RELIED_ON, draw_pathway, explain_history
from retr.explain.titles import item_titles
from retr.serving.export import RTOL, export_onnx
from retr.serving.http import serve
from retr.serving.recommender import EmptyHistoryError, Recommender
from retr.utils import atomic_write, atomic_write_json, atomic_write_text, progress_bars

Handler = Callable[[argparse.Namespace], int]

def _policy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--unknown", choices=["skip", "error"], default="skip",
                   help="items the model never saw: skip and report them (default) or fail")
    p.add_argument("--empty", choices=["error", "popularity"], default="error",
                   help="a history with no known item: fail (default) or recommend by popularity")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")


def register(subparsers: Any) -> None:
    """Add recommend, explain, export and serve to the ``retr`` sub-command parsers."""
    r = subparsers.add_parser("recommend", help="top-k items for histories of item ids",
                              description="Recommend the next items after a history given on the "
                              "command line or for every history / user in a file.")
    r.add_argument("run_dir")
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--history", help="item ids, oldest first, e.g. a,b,c")
    src.add_argument("--input", help="CSV / TSV / JSONL / Parquet file of histories (a column "
                     "with a list or a space/comma-joined string) or of interactions user,item"
                     "[,timestamp]")
    r.add_argument("--output", help="where --input results go (.csv/.tsv/.jsonl/.parquet); "
                   "default: JSON lines on stdout")
    r.add_argument("-k", "--k", type=int, default=10, help="items per history (default 10)")
    r.add_argument("--keep-seen", action="store_true",
                   help="allow items of the history in the recommendations")
    r.add_argument("--candidates", help="rank only these item ids (comma-separated)")
    r.add_argument("--json", action="store_true", help="print JSON instead of a table")
    r.add_argument("--input-format", choices=INPUT_FORMATS, help="default: from the extension")
    r.add_argument("--history-col", help="column holding histories (default: 'history')")
    r.add_argument("--id-col", help="column identifying each history in the output")
    r.add_argument("--user-col", help="interactions: user column (default user / user_id)")
    r.add_argument("--item-col", help="interactions: item column (default item / item_id)")
    r.add_argument("--time-col", help="interactions: timestamp column (default timestamp / time, "
                   "when present); rows keep file order within equal times")
    r.add_argument("--batch-size", type=int, default=256, help="histories per model call")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    _policy_args(r)
    r.set_defaults(handler=cmd_recommend)

    e = subparsers.add_parser("explain", help="which past behaviors a recommendation relied on",
                              description="Per layer: routes (the behavior pathway), keep "
                              "probabilities and attention, as a PNG heatmap and JSON.")
    e.add_argument("run_dir")
    e.add_argument("--history", required=True, help="item ids, oldest first, e.g. a,b,c")
    e.add_argument("--out", help="PNG to draw (e.g. pathway.png)")
    e.add_argument("--json", dest="json_out", metavar="PATH",
                   help="write the explanation JSON here ('-' for stdout)")
    e.add_argument("-k", "--k", type=int, default=10, help="recommendations to include")
    e.add_argument("--data-dir", help="where the dataset's item titles live (default: "
                   "RETR_DATA_DIR or the user cache)")
    e.add_argument("--no-titles", action="store_true", help="label items by id only")
    e.add_argument("--by", choices=RELIED_ON, default="auto",
                   help="how to rank what the top recommendation relied on (default: the "
                   "method that measured best in the deletion test for this model)")
    _policy_args(e)
    e.set_defaults(handler=cmd_explain)

    x = subparsers.add_parser("export", help="export the scoring graph (ONNX)",
                              description="Export seqs [B, max_len] -> scores [B, n_items + 1] "
                              "and user_state [B, d], and check it against PyTorch.")
    x.add_argument("run_dir")
    x.add_argument("--format", dest="export_format", choices=["onnx"], default="onnx")
    x.add_argument("--out", required=True, help="output file, e.g. model.onnx")
    x.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    x.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison")
    x.set_defaults(handler=cmd_export)

    s = subparsers.add_parser("serve", help="HTTP API: /recommend, /recommend/batch, /explain",
                              description="Serve a run over HTTP (OpenAPI docs at /docs).")
    s.add_argument("run_dir")
    s.add_argument("--host", default="127.0.0.1",
                   help="interface to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-batch", type=int, default=256, help="histories per batch request")
    s.add_argument("--max-body-bytes", type=int, default=1 << 20,
                   help="largest request body accepted (default 1 MiB)")
    s.add_argument("--limit-concurrency", type=int, default=64,
                   help="open connections before new ones get 503 (connections waiting for "
                   "a request are closed first to make room)")
    s.add_argument("--read-timeout", type=float, default=10.0,
                   help="seconds a request may take to arrive whole, headers and body "
                   "(default 10; then 408 and the connection is closed)")
    s.add_argument("--max-idle", type=int, default=32,
                   help="connections waiting for a request (silent, slow or keep-alive) before "
                   "the longest-waiting one is closed (default 32)")
    s.add_argument("--threads", type=int, default=1,
                   help="torch threads per process (default 1: requests already run "
                   "concurrently; 0 = torch's default)")
    s.add_argument("--data-dir", help="where the dataset's item titles live")
    _policy_args(s)
    s.set_defaults(handler=cmd_serve)


def _load(args: argparse.Namespace) -> Recommender:
    return Recommender.load(args.run_dir, device=args.device, unknown=args.unknown,
                            empty=args.empty)


def _titles(rec: Recommender, data_dir: str | None) -> dict[str, str]:
    return item_titles(rec.config.data.source if rec.config else None, data_dir)


def _check_positive(name: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"{name} must be >= 1, got {value}")


def cmd_recommend(args: argparse.Namespace) -> int:
    """One history -> a table or JSON; a file of histories -> a file of recommendations."""
    _check_positive("-k", args.k)
    _check_positive("--batch-size", args.batch_size)
    if args.output and not args.input:
        raise ConfigError("--output goes with --input; for one --history use --json")
    rec = _load(args)
    rec.batch_size = args.batch_size
    candidates = parse_history(args.candidates) if args.candidates else None
    if args.history is not None:
        history = parse_history(args.history)
        result = rec.recommend(history, k=args.k, exclude_seen=not args.keep_seen,
                               candidates=candidates)
        if args.json:
            print(json.dumps(result.to_dict(), indent=2))
            return 0
        titles = _titles(rec, None)
        notes = []
        if result.skipped:
            notes.append(f"skipped unknown: {', '.join(result.skipped)}")
        if result.truncated:
            notes.append(f"history truncated to its last {len(result.used_history)} items")
        if result.fallback:
            notes.append(f"no known item: {result.fallback} fallback")
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        print(f"{'rank':>4}  {'item':<16} {'score':>10}  title" if titles else
              f"{'rank':>4}  {'item':<16} {'score':>10}")
        for rank, (item, score) in enumerate(zip(result.items, result.scores, strict=True), 1):
            line = f"{rank:>4}  {item:<16} {score:>10.4f}"
            print(f"{line}  {titles.get(item, '')}" if titles else line)
        return 0
    ids, histories = read_histories(args.input, fmt=args.input_format,
                                    history_col=args.history_col, id_col=args.id_col,
                                    user_col=args.user_col, item_col=args.item_col,
                                    time_col=args.time_col)
    rows = recommend_histories(rec, ids, histories, k=args.k, exclude_seen=not args.keep_seen,
                               candidates=candidates, where=args.input,
                               progress=not args.no_progress)
    if args.output:
        write_recommendations(rows, args.output)
        print(f"wrote {len(rows)} recommendation lists to {args.output}", file=sys.stderr)
    else:
        for row in rows:
            print(json.dumps(row))
    return 0


def recommend_histories(rec: Recommender, ids: list[str], histories: list[list[str]], k: int,
                        exclude_seen: bool = True, candidates: list[str] | None = None,
                        where: str = "input", progress: bool = True) -> list[dict[str, Any]]:
    """Recommendations for many histories in model-sized batches, with a progress bar."""
    for ident, history in zip(ids, histories, strict=True):
        enc = rec.encode(history, where=f"{where}: history {ident!r}")
        if not len(enc.ids) and rec.empty == "error":
            raise EmptyHistoryError(f"{where}: history {ident!r} has no known item (use --empty "
                                    "popularity for a popularity fallback)")
    rows: list[dict[str, Any]] = []
    step = rec.batch_size
    with tqdm(total=len(histories), desc="recommend", unit="history", disable=not progress_bars(progress),
              leave=False) as bar:
        for start in range(0, len(histories), step):
            chunk = histories[start:start + step]
            recs = rec.recommend_batch(chunk, k=k, exclude_seen=exclude_seen,
                                       candidates=candidates)
            for ident, r in zip(ids[start:start + step], recs, strict=True):
                rows.append({"id": ident, "items": r.items, "scores": r.scores,
                             "truncated": r.truncated, "used_history": len(r.used_history),
                             "skipped": r.skipped, "fallback": r.fallback})
            bar.update(len(chunk))
    return rows


def write_recommendations(rows: list[dict[str, Any]], path: str) -> None:
    """JSONL and Parquet keep lists; CSV/TSV cells hold them as JSON lists."""

    fmt = file_format(path, None)
    if fmt == "jsonl":
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
        return
    frame = pd.DataFrame(rows, columns=["id", "items", "scores", "truncated", "used_history",
                                        "skipped", "fallback"])
    if fmt == "parquet":
        atomic_write(path, lambda p: frame.to_parquet(p, index=False))
        return
    for col in ("items", "scores", "skipped"):
        frame[col] = frame[col].map(json.dumps)
    sep = "," if fmt == "csv" else "\t"
    atomic_write(path, lambda p: frame.to_csv(p, sep=sep, index=False))


def cmd_explain(args: argparse.Namespace) -> int:
    """Routes, keep probabilities and attention for one history: PNG, JSON, and a summary."""
    _check_positive("-k", args.k)
    rec = _load(args)
    titles = {} if args.no_titles else _titles(rec, args.data_dir)
    explanation = explain_history(rec, parse_history(args.history), k=args.k, titles=titles,
                                  by=args.by)
    if args.json_out == "-":
        print(json.dumps(explanation))
        return 0
    if args.json_out:
        atomic_write_json(args.json_out, explanation)
    if args.out:
        draw_pathway(explanation, args.out)
    labels = dict(zip(explanation["tokens"], explanation["labels"], strict=True))
    for layer in explanation["layers"]:
        if layer["pathway"] is not None:
            kept = [labels[t] for t in layer["pathway"]]
            print(f"layer {layer['layer']}: {len(kept)}/{len(explanation['tokens'])} on the "
                  f"pathway: {', '.join(kept)}")
        else:
            print(f"layer {layer['layer']}: attention only (no router)")
    if not explanation["layers"]:
        print(f"{explanation['model']} returns no attention or routes")
    recs = ", ".join(r["label"] for r in explanation["recommendations"])
    print(f"recommendations: {recs}")
    relied = explanation["relied_on"]
    if relied is not None:
        top = ", ".join(labels[t] for t in relied["items"][:5])
        print(f"relied on most ({relied['method']}): {top}")
    for what, path in (("heatmap", args.out), ("json", args.json_out)):
        if path:
            print(f"{what}: {path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """ONNX export and its parity check; exit 1 when the check exceeds the tolerance."""

    rec = Recommender.load(args.run_dir)
    report = export_onnx(rec, args.out, opset=args.opset, check=not args.no_check)
    print(f"wrote {report.path} (opset {report.opset}): seqs int64 [B, {rec.max_len}] -> "
          f"scores [B, {rec.n_items + 1}] (column 0 = padding, -inf), user_state [B, d]")
    if args.no_check:
        return 0
    verdict = "ok" if report.passed else "FAILED"
    print(f"onnxruntime vs PyTorch on {report.n_checked} histories: max abs diff "
          f"{report.max_abs_diff:.3g}, tolerance {report.tolerance:.3g} "
          f"(= {RTOL:g} x max(1, max |score|)): {verdict}")
    return 0 if report.passed else 1


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the HTTP API until interrupted."""
    for name in ("port", "max_batch", "max_body_bytes", "limit_concurrency", "max_idle"):
        _check_positive(f"--{name.replace('_', '-')}", getattr(args, name))
    if not args.read_timeout > 0:
        raise ConfigError(f"--read-timeout must be > 0 seconds, got {args.read_timeout}")
    if args.threads < 0:
        raise ConfigError(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    rec = _load(args)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"retr: note: listening on {args.host}, reachable from other machines; the API "
              "has no authentication", file=sys.stderr)
    print(f"serving {rec.model_name} on http://{args.host}:{args.port} (docs at /docs)",
          file=sys.stderr, flush=True)
    serve(rec, host=args.host, port=args.port, max_batch=args.max_batch,
          max_body_bytes=args.max_body_bytes, titles=_titles(rec, args.data_dir),
          limit_concurrency=args.limit_concurrency, read_timeout=args.read_timeout,
          max_idle=args.max_idle)
    return 0


COMMANDS: dict[str, Handler] = {"recommend": cmd_recommend, "explain": cmd_explain,
                                "export": cmd_export, "serve": cmd_serve}
