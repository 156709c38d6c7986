"""Side-by-side benchmarks (see docs/BENCHMARKS.md); not part of the distribution."""
