"""Benchmarks (`just bench [AREA ...]`): each module prints figures for docs/benchmarks.md."""
