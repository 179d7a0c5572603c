"""Human-readable item labels, keyed by the run's external ids.

The dataset readers live in :mod:`retr.text.item_text`, shared with text-based item
representations: MovieLens-1M ``movies.dat`` and MovieLens-100K ``u.item`` (MovieID -> title),
and Office ``Office.text`` through ``Office.item2index`` (item id -> ASIN -> title, category and
brand). Anything else (synthetic data, a missing file, another dataset) gives no titles, and
labels fall back to ids.
"""

from __future__ import annotations

from retr.text.item_text import item_titles

__all__ = ["item_titles", "shorten"]


def shorten(text: str, width: int = 40) -> str:
    """One-line label of at most ``width`` characters."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"
