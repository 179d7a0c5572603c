"""Evaluation: metrics with an honest tie policy, full and sampled ranking, reports."""
