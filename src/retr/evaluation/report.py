"""Results as terminal tables (and JSON, which is just the results dicts)."""

from __future__ import annotations

from typing import Any

DEFAULT_COLUMNS = ("HR@10", "NDCG@10", "MRR@10", "MRR")


def _protocol_label(res: dict[str, Any]) -> str:
    if res["protocol"] == "sampled":
        return f"sampled-{res['negatives']}"
    return "full" + ("" if res.get("exclude_history", True) else "+seen")


def results_table(rows: list[tuple[str, dict[str, Any]]], columns: tuple[str, ...] = DEFAULT_COLUMNS) -> str:
    """A fixed-width table; each row is (label, evaluate() result)."""
    cols = [c for c in columns if any(c in r["metrics"] for _, r in rows)]
    header = ["model", "split", "protocol", "users", *cols]
    body = []
    for label, res in rows:
        body.append([label, res.get("split", ""), _protocol_label(res), str(res["n_examples"]),
                     *[f"{res['metrics'][c]:.4f}" if c in res["metrics"] else "-" for c in cols]])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body, strict=True)]

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    line = "-" * len(fmt(header))
    return "\n".join([fmt(header), line, *[fmt(b) for b in body]])


def run_results_rows(results: dict[str, Any], label: str | None = None) -> list[tuple[str, dict[str, Any]]]:
    """Rows of a run's results.json."""
    name = label or results["model"]
    return [(name, r) for r in results["results"]]
