"""Benchmarks behind `defocus-vlm bench`, each writing JSON."""
