"""Performance benchmarks; `python benchmarks/run_all.py` runs them all (see the README's Benchmarks)."""
