"""The benchmarks of retr, run as modules from the repository root, e.g.
``python -m benchmarks.grid benchmarks/grids/cpu.toml``; see README.md, "Benchmarks"."""
