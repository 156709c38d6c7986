"""Benchmarks of the chunked operators (docs/BENCHMARKS.md, "Chunked operators")."""
