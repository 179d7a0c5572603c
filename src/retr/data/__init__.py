"""Data: readers, preprocessing, compact sequences, splits, negatives, registry, synthetic data."""
