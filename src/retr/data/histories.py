"""Histories from files: one row per history (a list of item ids) or raw interactions.

``retr recommend --input FILE`` reads its requests here. A file of interactions goes through the
same rules as training data (columns user/item/timestamp); a file of histories holds one list
per row (a JSON list, or ids joined by spaces or commas).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pandas as pd

from retr.data.readers import check_input_size, iter_json_objects
from retr.errors import DataError
from retr.limits import json_loads

INPUT_FORMATS = ("csv", "tsv", "jsonl", "parquet")
_EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".txt": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl",
               ".parquet": "parquet", ".pq": "parquet"}
_SPLIT = re.compile(r"[,\s]+")


def parse_history(text: str) -> list[str]:
    """``"a,b,c"`` or ``"a b c"`` -> ["a", "b", "c"] (empty pieces dropped)."""
    return [p for p in _SPLIT.split(text.strip()) if p]


def file_format(path: str, fmt: str | None) -> str:
    if fmt:
        return fmt
    suffixes = [s.lower() for s in Path(path).suffixes if s.lower() != ".gz"]
    found = _EXTENSIONS.get(suffixes[-1]) if suffixes else None
    if found is None:
        raise DataError(f"{path}: cannot tell the format from the extension; pass "
                        f"--input-format ({', '.join(INPUT_FORMATS)})")
    return found


def _read_frame(path: str, fmt: str) -> pd.DataFrame:
    if not Path(path).exists():
        raise DataError(f"{path}: no such file")
    check_input_size(path)  # a regular file, not over the input limit once decompressed
    try:
        if fmt in ("csv", "tsv"):
            return pd.read_csv(path, sep="," if fmt == "csv" else "\t", dtype=str,
                               keep_default_na=False)
        if fmt == "jsonl":
            return _read_jsonl(path)
        return pd.read_parquet(path)
    except (ValueError, OSError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path}: cannot read it as {fmt} ({first})") from None


def _read_jsonl(path: str) -> pd.DataFrame:
    """JSON lines as they are: no type or date guessing on ids and timestamps."""
    return pd.DataFrame.from_records(list(iter_json_objects(path)))


def _item_str(value: Any) -> str:
    """File cells -> external ids: integers (also integral floats from pandas) as decimals."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if hasattr(value, "item"):
        return _item_str(value.item())
    return str(value)


def _cell_history(value: Any) -> list[str]:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                parsed = json_loads(text)
            except json.JSONDecodeError:
                parsed = None
            if isinstance(parsed, list):
                return [_item_str(v) for v in parsed]
        return parse_history(text)
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [_item_str(v) for v in value]
    return [_item_str(value)]


def _pick(columns: list[str], wanted: str | None, defaults: tuple[str, ...], what: str,
          path: str, required: bool) -> str | None:
    if wanted is not None:
        if wanted not in columns:
            raise DataError(f"{path}: no {what} column {wanted!r}; columns: {', '.join(columns)}")
        return wanted
    for name in defaults:
        if name in columns:
            return name
    if required:
        raise DataError(f"{path}: no {what} column (looked for {', '.join(defaults)}); name it "
                        f"with --{what}-col; columns: {', '.join(columns)}")
    return None


def read_histories(path: str, fmt: str | None = None, history_col: str | None = None,
                   id_col: str | None = None, user_col: str | None = None,
                   item_col: str | None = None,
                   time_col: str | None = None) -> tuple[list[str], list[list[str]]]:
    """(ids, histories) from a file of histories or of raw interactions.

    Histories: one row each, ``history_col`` a list or a space/comma-joined string (a JSON list
    string in CSV works too). Interactions: rows user,item[,timestamp] grouped per user, users
    in order of first appearance, each user's items by (timestamp, file row).
    """
    frame = _read_frame(path, file_format(path, fmt))
    columns = [str(c) for c in frame.columns]
    frame.columns = columns
    hist = _pick(columns, history_col, ("history", "items", "sequence"), "history", path,
                 required=False) if not (user_col or item_col) else None
    if hist is not None:
        ident = _pick(columns, id_col, ("id", "user", "user_id"), "id", path, required=False)
        histories = [_cell_history(v) for v in frame[hist].tolist()]
        ids = [_item_str(v) for v in frame[ident].tolist()] if ident else \
            [str(i) for i in range(len(frame))]
        return ids, histories
    user = _pick(columns, user_col or id_col, ("user", "user_id", "userId"), "user", path, True)
    item = _pick(columns, item_col, ("item", "item_id", "itemId"), "item", path, True)
    time = _pick(columns, time_col, ("timestamp", "time"), "time", path, required=False)
    assert user is not None and item is not None
    frame = frame.assign(_row=range(len(frame)))
    if time is not None:
        stamps = pd.to_numeric(frame[time], errors="coerce")
        if stamps.isna().any():
            bad = int(stamps.isna().to_numpy().nonzero()[0][0])
            raise DataError(f"{path}: row {bad + 1}: timestamp {frame[time].iloc[bad]!r} is not "
                            "a number")
        frame = frame.assign(_t=stamps).sort_values(["_t", "_row"], kind="stable")
    users = frame[user].map(_item_str)
    items = frame[item].map(_item_str)
    grouped = items.groupby(users, sort=False)
    first = frame["_row"].groupby(users, sort=False).min().sort_values(kind="stable")
    seqs = {u: list(v) for u, v in grouped}
    ids = [str(u) for u in first.index]
    return ids, [seqs[u] for u in first.index]
