"""Stated bounds on what one input value may make retr do.

A single value in a config, a run directory or a data file should never decide whether the
process runs out of memory or stack. These bounds are checked where the value enters, and the
README's reliability section lists them:

* JSON (run-directory files, JSON-lines data and history files) nests at most
  :data:`MAX_JSON_DEPTH` levels (:func:`json_loads`);
* model sizes: each width at most :data:`MAX_WIDTH`, at most :data:`MAX_LAYERS` layers, a window
  (``max_len``) of at most :data:`MAX_LEN`, and the estimated weights (4 bytes a parameter,
  :func:`estimate_parameters`) must fit in the memory available, all checked before a tensor is
  allocated (:func:`check_model_size`);
* a streamed log (Parquet, csv / tsv) may have at most available memory / 40 rows
  (:func:`check_rows`);
* an interaction file read whole (every format but the streamed Parquet path) may hold, after
  decompression, at most :func:`max_input_bytes`: 1/:data:`READ_MEMORY_FACTOR` of the memory
  available (reading a CSV into a DataFrame peaked at 15-20 bytes per byte of text: 1.45 GB for
  a 90 MB CSV of 4M rows, 20 GB for a 1 GiB one), never over :data:`MAX_INPUT_BYTES`, or
  ``$RETR_MAX_INPUT_BYTES``. Gzip input is decompressed in chunks and stopped at that size, and
  once past :data:`RATIO_CHECK_AFTER` bytes it may not inflate more than
  :data:`MAX_COMPRESSION_RATIO` times (a random-id CSV log compressed 2x, text usually 3-10x; zeros 1000x).

This module imports only the standard library and :mod:`retr.errors`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from retr.errors import ConfigError, DataError

MAX_JSON_DEPTH = 64
MAX_WIDTH = 65_536
MAX_LAYERS = 256
MAX_LEN = 65_536
MAX_INPUT_BYTES = 64 * 2**30
READ_MEMORY_FACTOR = 24
STREAMED_BYTES_PER_ROW = 40
MAX_COMPRESSION_RATIO = 100
RATIO_CHECK_AFTER = 64 * 2**20
INPUT_LIMIT_ENV = "RETR_MAX_INPUT_BYTES"
BYTES_PER_PARAMETER = 4

_WIDTHS = ("hidden_size", "ffn_size", "embedding_size", "router_hidden", "num_heads")


def json_loads(text: str | bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` that refuses nesting deeper than ``max_depth`` with a JSONDecodeError.

    Python's parser recurses once per level and fails with RecursionError near 1,000 levels;
    that, and anything deeper than ``max_depth``, becomes an ordinary ``json.JSONDecodeError``
    (a ValueError), so callers that report malformed JSON report this too.
    """
    try:
        obj = json.loads(text)
    except RecursionError:
        raise _too_deep(text, max_depth) from None
    if _opening_brackets(text) > max_depth and _depth_exceeds(obj, max_depth):
        raise _too_deep(text, max_depth)
    return obj


def toml_loads(text: str, max_depth: int = MAX_JSON_DEPTH) -> dict[str, Any]:
    """``tomllib.loads`` with the same nesting bound (arrays and tables count as levels)."""
    import tomllib

    try:
        obj = tomllib.loads(text)
    except RecursionError:
        raise tomllib.TOMLDecodeError(f"nested deeper than {max_depth} levels") from None
    if _opening_brackets(text) > max_depth and _depth_exceeds(obj, max_depth):
        raise tomllib.TOMLDecodeError(f"nested deeper than {max_depth} levels")
    return obj


def _opening_brackets(text: str | bytes) -> int:
    if isinstance(text, bytes):
        return text.count(b"[") + text.count(b"{")
    return text.count("[") + text.count("{")


def _too_deep(text: str | bytes, max_depth: int) -> json.JSONDecodeError:
    doc = text if isinstance(text, str) else text[:0].decode()
    return json.JSONDecodeError(f"nested deeper than {max_depth} levels (the limit on JSON "
                                "nesting)", doc, 0)


def _depth_exceeds(obj: Any, max_depth: int) -> bool:
    """Whether lists/objects nest more than ``max_depth`` levels (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > max_depth:
            return True
        children = value.values() if isinstance(value, dict) else value
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def estimate_parameters(n_items: int, hidden_size: int = 0, num_layers: int = 0,
                        max_len: int = 0, ffn_size: int | None = None, num_heads: int = 1,
                        router_hidden: int = 0, embedding_size: int | None = None,
                        recurrent: bool = False) -> int:
    """About how many parameters a model of these sizes has (within 10 % for retr's models).

    Transformers: item table (n_items + 1) x d, positions max_len x d, per layer attention
    4(d^2 + d), feed-forward 2 d f + d + f, two layer norms 4 d, and the pathway router's three
    MLPs (about 2 d r + 2 r + d + 3) when ``router_hidden`` is given. Recurrent (GRU4Rec): item
    table (n_items + 1) x e, per layer 3 (in h + h^2 + 2 h) with ``in`` = e then h, output h e + e.
    Plain integers: this is checked before anything is built.
    """
    n, d, layers = int(n_items) + 1, int(hidden_size), int(num_layers)
    if recurrent:
        e = int(embedding_size or d)
        per_layer_first = 3 * (e * d + d * d + 2 * d)
        per_layer = 3 * (d * d + d * d + 2 * d)
        return n * e + per_layer_first + max(layers - 1, 0) * per_layer + d * e + e
    f = int(ffn_size if ffn_size is not None else 4 * d)
    r = int(router_hidden)
    block = 4 * (d * d + d) + 2 * d * f + d + f + 4 * d
    if r:
        block += 2 * d * r + 2 * r + d + 3 + r * 2 + 2
    return n * d + int(max_len) * d + layers * block + 2 * d


def available_memory_bytes() -> int | None:
    """Memory this process can still get: MemAvailable (Linux), else physical memory; None if
    unknown. A cgroup limit (containers) lowers it when it is smaller."""
    found: int | None = None
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    found = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        found = None
    if found is None:
        try:
            found = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            found = None
    for cgroup in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(cgroup, encoding="ascii") as fh:
                text = fh.read().strip()
        except OSError:
            continue
        if text.isdigit() and (found is None or int(text) < found):
            found = int(text)
    return found


def max_input_bytes() -> int:
    """The most bytes (after decompression) an interaction file read whole may hold."""
    given = os.environ.get(INPUT_LIMIT_ENV, "").strip()
    if given:
        try:
            value = int(given)
        except ValueError:
            raise ConfigError(f"${INPUT_LIMIT_ENV} must be a number of bytes, got {given!r}") \
                from None
        if value < 1:
            raise ConfigError(f"${INPUT_LIMIT_ENV} must be >= 1, got {value}")
        return value
    have = available_memory_bytes()
    return MAX_INPUT_BYTES if have is None else min(MAX_INPUT_BYTES, have // READ_MEMORY_FACTOR)


def check_rows(rows: int, where: str, memory_bytes: int | None = None) -> None:
    """Refuse a streamed log (Parquet, csv/tsv) whose rows cannot fit: reading one peaks near
    two times the 16 bytes per row the dataset keeps, so :data:`STREAMED_BYTES_PER_ROW` a row
    must fit in the memory available."""
    have = available_memory_bytes() if memory_bytes is None else memory_bytes
    need = rows * STREAMED_BYTES_PER_ROW
    if have is not None and need > have:
        raise DataError(f"{where}: {rows:,} rows need about {_gib(need)} to read "
                        f"({STREAMED_BYTES_PER_ROW} bytes a row), more than the {_gib(have)} of "
                        "memory available; read it on a larger machine or split it")


def check_model_size(model_name: str, n_items: int, fields: Mapping[str, Any],
                     memory_bytes: int | None = None) -> int:
    """Refuse model sizes that cannot be built here, before any tensor exists.

    ``fields`` is the model's config as a mapping (e.g. ``dataclasses.asdict``). Returns the
    parameter estimate. Raises ConfigError naming the key and the bound.
    """
    for key in _WIDTHS:
        value = fields.get(key)
        if isinstance(value, int) and value > MAX_WIDTH:
            raise ConfigError(f"model.{key} = {value:,} is over the limit of {MAX_WIDTH:,}; "
                              "use a smaller value")
    layers = fields.get("num_layers")
    if isinstance(layers, int) and layers > MAX_LAYERS:
        raise ConfigError(f"model.num_layers = {layers:,} is over the limit of {MAX_LAYERS}; "
                          "use fewer layers")
    max_len = fields.get("max_len")
    if isinstance(max_len, int) and max_len > MAX_LEN:
        raise ConfigError(f"model.max_len = {max_len:,} is over the limit of {MAX_LEN:,} "
                          "positions; histories are cut to their most recent max_len items, so "
                          "use a smaller window")
    hidden = fields.get("hidden_size")
    if not isinstance(hidden, int):
        return 0  # no learned sizes (pop)
    recurrent = "embedding_size" in fields and "num_heads" not in fields
    params = estimate_parameters(
        n_items, hidden_size=hidden, num_layers=int(fields.get("num_layers") or 1),
        max_len=int(max_len or 0), ffn_size=fields.get("ffn_size") or hidden,
        num_heads=int(fields.get("num_heads") or 1),
        router_hidden=int(fields.get("router_hidden") or 0)
        if fields.get("attention", "pathway") == "pathway" else 0,
        embedding_size=fields.get("embedding_size"), recurrent=recurrent)
    need = params * BYTES_PER_PARAMETER
    have = available_memory_bytes() if memory_bytes is None else memory_bytes
    if have is not None and need > have:
        raise ConfigError(f"model {model_name!r} would have about {params:,} parameters "
                          f"({_gib(need)} of weights) for {n_items:,} items, more than the "
                          f"{_gib(have)} of memory available; lower model.hidden_size, "
                          "model.num_layers, model.max_len or model.ffn_size")
    return params


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"
