"""Explanations: which past behaviors (the pathway) a recommendation relied on, as JSON and PNG."""

from retr.explain.pathway import draw_pathway, explain_history
from retr.explain.titles import item_titles

__all__ = ["draw_pathway", "explain_history", "item_titles"]
